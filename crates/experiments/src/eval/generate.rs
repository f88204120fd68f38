//! Batched greedy generation over a [`LlavaBundle`] (questions with or without an image), and
//! the first generated position's distribution for KL / top-1 agreement against the float model:
//! what every benchmark's evaluation runs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use qvlm_core::hook::LinearHook;
use qvlm_core::io::image::ImageProcessor;
use qvlm_core::io::image::Rgb8;
use qvlm_core::io::prompt::{Piece, PromptTokenizer, Template, IMAGE_PLACEHOLDER};
use qvlm_core::model::llama::KvCache;
use qvlm_core::model::llava::{GenerateOptions, Generation, LlavaBundle};
use qvlm_core::model::qwen2_vl::{Qwen2VlBundle, Qwen2VlPrompt};
use tch::{Device, Kind, Tensor};

use crate::vlm::Vlm;

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
        for r in chunk {
            let prompt = template.render(&r.message);
            let n_images = usize::from(r.image.is_some());
            sequences.push(
                bundle
                    .tokenizer
                    .tokenize_prompt(&prompt, n_images)
                    .with_context(|| format!("tokenizing the prompt {prompt:?}"))?,
            );
        }
        let gen = GenerateOptions {
            max_new_tokens,
            eos_token_ids: eos.clone(),
            ..GenerateOptions::default()
        };
        let image_of =
            |r: &Request| r.image.as_ref().map(|p| paths.binary_search(&p).unwrap_or(0) as i64);
        let out = match (&feats, shared_prefix(&sequences)) {
            // Every row is `prefix <image> question` with one prefix: the prefix and image run
            // once per image, each question continues from its image's keys and values.
            (Some(f), Some((prefix, questions))) => {
                let rows: Vec<i64> = chunk.iter().map(|r| image_of(r).unwrap_or(0)).collect();
                let prefixes: Vec<Vec<Piece>> = (0..f.size()[0])
                    .map(|_| vec![Piece::Tokens(prefix.clone()), Piece::Image(0)])
                    .collect();
                let per_image: Vec<Tensor> = (0..f.size()[0]).map(|i| f.narrow(0, i, 1)).collect();
                let batch = model.prepare(&prefixes, &per_image)?;
                let mut cache = KvCache::new(model.language_model.layers.len());
                let _ = model.decode_hidden(&batch, Some(&mut cache), hook);
                let prefix_len = batch.mask.size()[1];
                let cache = cache.select_rows(&Tensor::from_slice(&rows));
                let mut rest = model.prepare(&questions, &[])?;
                rest.positions += prefix_len;
                model.generate_after(cache, &rest, &gen, hook)?
            }
            _ => {
                let mut row_images = Vec::with_capacity(chunk.len());
                for r in chunk {
                    let row = match (image_of(r), &feats) {
                        (Some(i), Some(f)) => f.narrow(0, i, 1),
                        // No image slot in this row's prompt: `prepare` never reads its features.
                        _ => Tensor::zeros([0], (Kind::Float, Device::Cpu)),
                    };
                    row_images.push(row);
                }
                let batch = model.prepare(&sequences, &row_images)?;
                model.generate(&batch, &gen, hook)?
            }
        };
        push_batch(&out, &bundle.tokenizer, &mut texts, &mut log_probs)?;
        progress.inc(chunk.len() as u64);
    }
    Ok(generated(texts, &log_probs))
}

/// One batch's decoded answers and first-position log-probabilities, appended.
fn push_batch(
    out: &Generation,
    tokenizer: &PromptTokenizer,
    texts: &mut Vec<String>,
    log_probs: &mut Vec<Tensor>,
) -> Result<()> {
    let first = out.first_logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    log_probs.push(first.to_device(Device::Cpu));
    for tokens in &out.tokens {
        texts.push(tokenizer.decode(tokens, true)?.trim().to_string());
    }
    Ok(())
}

fn generated(texts: Vec<String>, log_probs: &[Tensor]) -> Generated {
    let first_log_probs = if log_probs.is_empty() {
        Tensor::zeros([0], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(log_probs, 0)
    };
    Generated { texts, first_log_probs }
}

/// Greedy decoding on a Qwen2-VL model: each request's `message` is a LLaVA user turn, asked
/// without its image placeholder ([`without_image_placeholder`]) as one chat turn in the
/// checkpoint's own template with its image (if any) before the text, as `experiments generate`
/// does; batches of `batch_size` left-padded rows, until the checkpoint's EOS or
/// `max_new_tokens`.
pub fn generate_qwen2_vl(
    bundle: &Qwen2VlBundle,
    requests: &[Request],
    batch_size: usize,
    max_new_tokens: usize,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<Generated> {
    let _guard = tch::no_grad_guard();
    let model = &bundle.model;
    let mut texts = Vec::with_capacity(requests.len());
    let mut log_probs = Vec::new();
    for chunk in requests.chunks(batch_size.max(1)) {
        let mut ids = Vec::with_capacity(chunk.len());
        let mut grids = Vec::with_capacity(chunk.len());
        let mut tokens = Vec::with_capacity(chunk.len());
        for r in chunk {
            let Some(path) = &r.image else {
                grids.push(vec![]);
                ids.push(bundle.chat_ids(&without_image_placeholder(&r.message), &[])?);
                tokens.push(None);
                continue;
            };
            let image =
                Rgb8::open(path).with_context(|| format!("preprocessing {}", path.display()))?;
            let (pixels, grid) = bundle.images.preprocess(&image)?;
            ids.push(bundle.chat_ids(&without_image_placeholder(&r.message), &[grid])?);
            tokens.push(Some(model.image_tokens(&pixels, &[grid], hook)?));
            grids.push(vec![grid]);
        }
        let prompts: Vec<Qwen2VlPrompt<'_>> = ids
            .iter()
            .zip(&grids)
            .zip(&tokens)
            .map(|((ids, grids), t)| Qwen2VlPrompt { ids, grids, image_tokens: t.as_ref() })
            .collect();
        let batch = model.prepare(&prompts)?;
        let gen = GenerateOptions {
            max_new_tokens,
            eos_token_ids: bundle.eos_token_ids.clone(),
            ..GenerateOptions::default()
        };
        let out = model.generate(&batch, &gen, hook)?;
        push_batch(&out, &bundle.tokenizer, &mut texts, &mut log_probs)?;
        progress.inc(chunk.len() as u64);
    }
    Ok(generated(texts, &log_probs))
}

/// A LLaVA user turn without its leading image placeholder (`<image>\n`,
/// [`Template::image_question`]): what Qwen2-VL is asked, its image going before the text in its
/// own chat turn. A turn without the placeholder is returned as it is.
pub fn without_image_placeholder(message: &str) -> String {
    let lead = format!("{IMAGE_PLACEHOLDER}\n");
    message.strip_prefix(&lead).unwrap_or(message).to_string()
}

/// Greedy answers on either family: LLaVA renders each request in `template` with
/// `llava_images` (its own processor when `None`), as [`generate`]; Qwen2-VL asks each without
/// LLaVA's image placeholder in the checkpoint's own chat template, its images at their own
/// resolution ([`generate_qwen2_vl`]; `template` and `llava_images` are LLaVA's).
#[allow(clippy::too_many_arguments)]
pub fn generate_on(
    model: &Vlm,
    requests: &[Request],
    template: Template,
    llava_images: Option<&ImageProcessor>,
    batch_size: usize,
    max_new_tokens: usize,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<Generated> {
    match model {
        Vlm::Llava(b) => {
            let images = llava_images.unwrap_or(&b.images);
            generate(b, requests, template, images, batch_size, max_new_tokens, hook, progress)
        }
        Vlm::Qwen2Vl(q) => {
            generate_qwen2_vl(q, requests, batch_size, max_new_tokens, hook, progress)
        }
    }
}

/// When every row is `Tokens(prefix) Image(0) Tokens(question)` with one `prefix`: the prefix and
/// each row's question pieces.
fn shared_prefix(sequences: &[Vec<Piece>]) -> Option<(Vec<i64>, Vec<Vec<Piece>>)> {
    let mut prefix: Option<&Vec<i64>> = None;
    let mut questions = Vec::with_capacity(sequences.len());
    for seq in sequences {
        let [Piece::Tokens(pre), Piece::Image(0), Piece::Tokens(question)] = seq.as_slice() else {
            return None;
        };
        if question.is_empty() || prefix.is_some_and(|p| p != pre) {
            return None;
        }
        prefix = Some(pre);
        questions.push(vec![Piece::Tokens(question.clone())]);
    }
    Some((prefix?.clone(), questions))
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use qvlm_core::model::llava::LoadOptions;

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
