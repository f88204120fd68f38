//! VQA-style evaluation (VQAv2, VizWiz, ... as LLaVA-1.5's `model_vqa_loader` runs them): batched
//! greedy decoding, EvalAI-normalized answers and the VQA accuracy, plus the first-token
//! distribution for KL / top-1 agreement against the float model. The batched generation here is
//! shared with the ScienceQA evaluation (questions with or without an image).

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use qvlm_core::hook::LinearHook;
use qvlm_core::io::image::ImageProcessor;
use qvlm_core::io::prompt::{Piece, Template};
use qvlm_core::model::llava::{GenerateOptions, LlavaBundle};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::vqa::{normalize_answer, prompt_text, vqa_accuracy, QuestionId, Vqa, VqaQuestion};

/// One prompt for the model: the user turn (with the image placeholder when there is an image).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub message: String,
    pub image: Option<PathBuf>,
}

/// Decoded answers and the first generated position's log-probabilities.
#[derive(Debug)]
pub struct Generated {
    /// Decoded new tokens (special tokens skipped), trimmed — `model_vqa_*`'s `outputs`.
    pub texts: Vec<String>,
    /// `[N, vocab]` f32 log-probabilities of the first generated token (CPU).
    pub first_log_probs: Tensor,
}

/// Greedy decoding of `requests` in batches of `batch_size` under `template`, until EOS or
/// `max_new_tokens`; images through `images` (rows without an image get no image slot).
pub fn generate(
    bundle: &LlavaBundle,
    requests: &[Request],
    template: Template,
    images: &ImageProcessor,
    batch_size: usize,
    max_new_tokens: usize,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<Generated> {
    let _guard = tch::no_grad_guard();
    let model = &bundle.model;
    let eos = bundle.eos_ids();
    let mut texts = Vec::with_capacity(requests.len());
    let mut log_probs = Vec::new();
    for chunk in requests.chunks(batch_size.max(1)) {
        // Image features once per distinct image of the batch.
        let mut paths: Vec<&PathBuf> = chunk.iter().filter_map(|r| r.image.as_ref()).collect();
        paths.sort();
        paths.dedup();
        let feats = if paths.is_empty() {
            None
        } else {
            let pixels = paths
                .iter()
                .map(|p| {
                    images
                        .preprocess_file(p)
                        .with_context(|| format!("preprocessing {}", p.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            Some(model.image_features(&Tensor::stack(&pixels, 0), hook))
        };
        let mut sequences: Vec<Vec<Piece>> = Vec::with_capacity(chunk.len());
        let mut row_images = Vec::with_capacity(chunk.len());
        for r in chunk {
            let prompt = template.render(&r.message);
            let n_images = usize::from(r.image.is_some());
            sequences.push(
                bundle
                    .tokenizer
                    .tokenize_prompt(&prompt, n_images)
                    .with_context(|| format!("tokenizing the prompt {prompt:?}"))?,
            );
            let row = match (&r.image, &feats) {
                (Some(p), Some(f)) => {
                    let i = paths.binary_search(&p).unwrap_or(0) as i64;
                    f.narrow(0, i, 1)
                }
                // No image slot in this row's prompt: `prepare` never reads its features.
                _ => Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            };
            row_images.push(row);
        }
        let batch = model.prepare(&sequences, &row_images)?;
        let gen = GenerateOptions { max_new_tokens, eos_token_ids: eos.clone(), stop: None };
        let out = model.generate(&batch, &gen, hook);
        log_probs.push(
            out.first_logits
                .to_kind(Kind::Float)
                .log_softmax(-1, Kind::Float)
                .to_device(Device::Cpu),
        );
        for tokens in &out.tokens {
            texts.push(bundle.tokenizer.decode(tokens, true)?.trim().to_string());
        }
        progress.inc(chunk.len() as u64);
    }
    let first_log_probs = if log_probs.is_empty() {
        Tensor::zeros([0], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(&log_probs, 0)
    };
    Ok(Generated { texts, first_log_probs })
}

/// Mean KL(reference ‖ other) of first-token distributions (`[N, vocab]` log-probabilities) and
/// the top-1 agreement (%).
pub fn first_token_agreement(reference: &Tensor, other: &Tensor) -> (f64, f64) {
    let (p, q) = (reference, other);
    let kl = (p.exp() * (p - q))
        .sum_dim_intlist(-1, false, Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    let agree = p
        .argmax(-1, false)
        .eq_tensor(&q.argmax(-1, false))
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    (kl, 100.0 * agree)
}

/// How a VQA-style set is asked (LLaVA-1.5: `vicuna_v1`, `--temperature 0`, `model_vqa_loader`'s
/// default `--max_new_tokens 128`,
/// <https://github.com/haotian-liu/LLaVA/blob/524a75b74254717057ee196b507668ebd314a280/scripts/v1_5/eval/vqav2.sh>).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct VqaEvalOptions {
    pub template: Template,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// Append [`crate::data::vqa::SHORT_ANSWER_PROMPT`] when a question's text lacks it.
    pub short_answer: bool,
}

impl Default for VqaEvalOptions {
    fn default() -> Self {
        Self {
            template: Template::VicunaV1,
            batch_size: 8,
            max_new_tokens: 128,
            short_answer: true,
        }
    }
}

/// One answered question.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VqaRow {
    pub question_id: QuestionId,
    /// The decoded answer.
    pub prediction: String,
    /// What LLaVA's submission scripts upload: [`normalize_answer`] of the prediction.
    pub normalized: String,
    /// VQA accuracy in [0, 1]; `None` without human answers.
    pub accuracy: Option<f64>,
}

/// Scores one prediction (pure).
pub fn score(question_id: &QuestionId, prediction: &str, answers: Option<&[String]>) -> VqaRow {
    VqaRow {
        question_id: question_id.clone(),
        prediction: prediction.to_string(),
        normalized: normalize_answer(prediction),
        accuracy: answers.map(|a| vqa_accuracy(prediction, a)),
    }
}

#[derive(Debug)]
pub struct VqaEvalOutput {
    pub rows: Vec<VqaRow>,
    /// `[N, vocab]` f32 log-probabilities of the first generated token (CPU).
    pub first_log_probs: Tensor,
}

/// The VQA accuracy (%) over the scored rows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VqaAccuracy {
    pub accuracy: f64,
    /// Rows with human answers.
    pub scored: usize,
    pub count: usize,
}

/// Mean VQA accuracy (%) of the rows that have answers; `None` when none has.
pub fn accuracy(rows: &[VqaRow]) -> Option<VqaAccuracy> {
    let scored: Vec<f64> = rows.iter().filter_map(|r| r.accuracy).collect();
    if scored.is_empty() {
        return None;
    }
    Some(VqaAccuracy {
        accuracy: 100.0 * scored.iter().sum::<f64>() / scored.len() as f64,
        scored: scored.len(),
        count: rows.len(),
    })
}

impl VqaEvalOutput {
    pub fn accuracy(&self) -> Option<VqaAccuracy> {
        accuracy(&self.rows)
    }

    /// Mean KL(reference ‖ self) of the answer distributions and the top-1 agreement (%).
    pub fn agreement_with(&self, reference: &VqaEvalOutput) -> (f64, f64) {
        first_token_agreement(&reference.first_log_probs, &self.first_log_probs)
    }
}

/// The user turn of `model_vqa_loader`: `"<image>\n" + text` (wrapped in `<im_start>`/`<im_end>`
/// when the model uses them)
/// (<https://github.com/haotian-liu/LLaVA/blob/10462fee8afae4fdea9330e450af0bab1e0c9a44/llava/eval/model_vqa_loader.py>).
pub fn user_message(question: &VqaQuestion, short_answer: bool, use_im_start_end: bool) -> String {
    Template::image_question(&prompt_text(&question.text, short_answer), use_im_start_end)
}

/// Answers `questions` (of `data`) greedily; `hook` sees every linear input.
pub fn evaluate(
    bundle: &LlavaBundle,
    data: &Vqa,
    questions: &[VqaQuestion],
    opts: &VqaEvalOptions,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<VqaEvalOutput> {
    let im_start_end = bundle.model.cfg.use_im_start_end;
    let requests: Vec<Request> = questions
        .iter()
        .map(|q| Request {
            message: user_message(q, opts.short_answer, im_start_end),
            image: Some(data.image_path(q)),
        })
        .collect();
    let gen = generate(
        bundle,
        &requests,
        opts.template,
        &bundle.images,
        opts.batch_size,
        opts.max_new_tokens,
        hook,
        progress,
    )?;
    let rows = questions
        .iter()
        .zip(&gen.texts)
        .map(|(q, text)| score(&q.question_id, text, data.answers(&q.question_id)))
        .collect();
    Ok(VqaEvalOutput { rows, first_log_probs: gen.first_log_probs })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::scienceqa::tests::temp_dir;
    use qvlm_core::hook::NoHook;
    use qvlm_core::model::llava::LoadOptions;
    use serde_json::json;

    /// The committed tiny LLaVA (llava-hf layout, trained on easy-VQA).
    pub(crate) fn tiny_bundle() -> LlavaBundle {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llava");
        LlavaBundle::load(&dir, &LoadOptions::default()).expect("load the tiny model")
    }

    /// An easy-VQA test image from the bootstrap's environment.
    pub(crate) fn easy_vqa_image(id: u32) -> PathBuf {
        let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/lib");
        let py = std::fs::read_dir(&lib).expect(".venv/lib").flatten().next().expect("python dir");
        py.path().join(format!("site-packages/easy_vqa/data/test/images/{id}.png"))
    }

    /// Batching (left padding, shared image features) must not change a row's answer.
    pub(crate) fn assert_same_first_tokens(a: &Tensor, b: &Tensor) {
        assert_eq!(a.size(), b.size());
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d < 1e-3, "batched and single-row log-probabilities differ by {d}");
    }

    #[test]
    fn tiny_model_answers_a_question_file() {
        let bundle = tiny_bundle();
        let dir = temp_dir("vqa-tiny");
        let images = dir.join("images");
        std::fs::create_dir_all(&images).expect("mkdir");
        for id in [0, 1] {
            std::fs::copy(easy_vqa_image(id), images.join(format!("{id}.png"))).expect("copy");
        }
        let qfile = dir.join("q.jsonl");
        let lines: Vec<String> = [
            (1, "0.png", "what shape is in the image?"),
            (2, "1.png", "what color is the shape?"),
            (3, "0.png", "is there a circle?"),
        ]
        .iter()
        .map(|(id, image, text)| {
            json!({"question_id": id, "image": image, "text": text}).to_string()
        })
        .collect();
        std::fs::write(&qfile, lines.join("\n")).expect("write");
        let afile = dir.join("a.json");
        std::fs::write(&afile, json!({"1": ["circle"], "2": ["red"], "3": ["yes"]}).to_string())
            .expect("write");
        let data = Vqa::load(&qfile, &images, Some(&afile)).expect("load");
        let opts = VqaEvalOptions {
            template: crate::tiny::train::TEMPLATE,
            batch_size: 3,
            max_new_tokens: 4,
            short_answer: false,
        };
        let pb = ProgressBar::hidden();
        let out = evaluate(&bundle, &data, &data.questions, &opts, &mut NoHook, &pb).expect("eval");
        assert_eq!(out.rows.len(), 3);
        let vocab = bundle.model.cfg.text.vocab_size;
        assert_eq!(out.first_log_probs.size(), vec![3, vocab]);
        let acc = out.accuracy().expect("answers given");
        assert_eq!((acc.scored, acc.count), (3, 3));
        let single = VqaEvalOptions { batch_size: 1, ..opts };
        let one =
            evaluate(&bundle, &data, &data.questions, &single, &mut NoHook, &pb).expect("eval");
        assert_same_first_tokens(&out.first_log_probs, &one.first_log_probs);
        assert_eq!(out.rows, one.rows);
        let (kl, top1) = out.agreement_with(&one);
        assert!(kl.abs() < 1e-4 && top1 == 100.0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rows_and_accuracy() {
        let answers: Vec<String> = ["two"; 10].iter().map(|s| s.to_string()).collect();
        let a = score(&QuestionId::Int(1), "2.", Some(&answers));
        assert_eq!(a.normalized, "2");
        assert_eq!(a.accuracy, Some(1.0));
        let b = score(&QuestionId::Int(2), "three", Some(&answers));
        assert_eq!(b.accuracy, Some(0.0));
        let c = score(&QuestionId::Text("x".into()), "Yes", None);
        assert_eq!((c.normalized.as_str(), c.accuracy), ("yes", None));
        let acc = accuracy(&[a, b, c.clone()]).expect("scored rows");
        assert_eq!(acc, VqaAccuracy { accuracy: 50.0, scored: 2, count: 3 });
        assert_eq!(accuracy(&[c]), None);
    }

    #[test]
    fn loader_prompt_puts_the_image_first() {
        let q = VqaQuestion {
            line: 1,
            question_id: QuestionId::Int(7),
            image: "a.jpg".into(),
            text: "What color is the bus?".into(),
        };
        let msg = user_message(&q, true, false);
        assert_eq!(
            msg,
            "<image>\nWhat color is the bus?\nAnswer the question using a single word or phrase."
        );
        assert_eq!(
            Template::VicunaV1.render(&msg),
            "A chat between a curious user and an artificial intelligence assistant. The assistant \
             gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n\
             What color is the bus?\nAnswer the question using a single word or phrase. ASSISTANT:"
        );
    }

    #[test]
    fn agreement_of_identical_distributions() {
        let p = Tensor::from_slice(&[0.1f32, 0.7, 0.2, 0.5, 0.25, 0.25]).view([2, 3]).log();
        let (kl, top1) = first_token_agreement(&p, &p);
        assert!(kl.abs() < 1e-9);
        assert_eq!(top1, 100.0);
        let q = Tensor::from_slice(&[0.7f32, 0.1, 0.2, 0.5, 0.25, 0.25]).view([2, 3]).log();
        let (kl, top1) = first_token_agreement(&p, &q);
        assert!(kl > 0.0);
        assert_eq!(top1, 50.0);
    }
}
