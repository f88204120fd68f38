//! VQA-style evaluation (VQAv2, VizWiz, ... as LLaVA-1.5's `model_vqa_loader` runs them): greedy
//! answers, EvalAI-normalized, and the VQA accuracy.

use anyhow::Result;
use indicatif::ProgressBar;
use qvlm_core::hook::LinearHook;
use qvlm_core::io::prompt::Template;
use serde::Serialize;
use tch::Tensor;

use crate::data::vqa::{QuestionId, Vqa, VqaQuestion};
use crate::eval::evalai::{normalize_answer, vqa_accuracy};
use crate::eval::generate::{first_token_agreement, generate_on, Request};
use crate::prompt::vqa::user_message;
use crate::vlm::Vlm;

/// How a VQA-style set is asked (LLaVA-1.5: `vicuna_v1`, `--temperature 0`, `model_vqa_loader`'s
/// default `--max_new_tokens 128`,
/// <https://github.com/haotian-liu/LLaVA/blob/524a75b74254717057ee196b507668ebd314a280/scripts/v1_5/eval/vqav2.sh>).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct VqaEvalOptions {
    pub template: Template,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// Append [`crate::prompt::vqa::SHORT_ANSWER_PROMPT`] when a question's text lacks it.
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

/// Answers `questions` (of `data`) greedily; `hook` sees every linear input. On Qwen2-VL the
/// question is asked in the checkpoint's chat template (`template` is LLaVA's).
pub fn evaluate(
    model: &Vlm,
    data: &Vqa,
    questions: &[VqaQuestion],
    opts: &VqaEvalOptions,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<VqaEvalOutput> {
    let im_start_end = match model {
        Vlm::Llava(bundle) => bundle.model.cfg.use_im_start_end,
        Vlm::Qwen2Vl(_) => false,
    };
    let requests: Vec<Request> = questions
        .iter()
        .map(|q| Request {
            message: user_message(q, opts.short_answer, im_start_end),
            image: Some(data.image_path(q)),
        })
        .collect();
    let gen = generate_on(
        model,
        &requests,
        opts.template,
        None,
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
    use crate::eval::generate::tests::{assert_same_first_tokens, easy_vqa_image, tiny_bundle};
    use qvlm_core::hook::NoHook;
    use serde_json::json;

    #[test]
    fn tiny_model_answers_a_question_file() {
        let bundle = tiny_bundle();
        let vocab_size = bundle.model.cfg.text.vocab_size;
        let model = crate::vlm::Vlm::Llava(bundle);
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
        let out = evaluate(&model, &data, &data.questions, &opts, &mut NoHook, &pb).expect("eval");
        assert_eq!(out.rows.len(), 3);
        let vocab = vocab_size;
        assert_eq!(out.first_log_probs.size(), vec![3, vocab]);
        let acc = out.accuracy().expect("answers given");
        assert_eq!((acc.scored, acc.count), (3, 3));
        let single = VqaEvalOptions { batch_size: 1, ..opts };
        let one =
            evaluate(&model, &data, &data.questions, &single, &mut NoHook, &pb).expect("eval");
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
}
