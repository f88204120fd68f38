//! Calibration sets for the searches, one path for every dataset: `n` vision-language pairs
//! (prompt, image, answer) drawn without replacement with a seed, tokenized and preprocessed.
//! easy-VQA draws from its train split without the validation images (so tuning on validation
//! never sees its own images in calibration), ScienceQA from its train split (image questions
//! only — a calibration sample carries one image); VQA files draw from the evaluated file
//! itself, as Q-VLM's VQA path does. A pair is the benchmark's user turn, its image and its answer:
//! LLaVA renders the turn in the run's conversation template, Qwen2-VL asks it (without LLaVA's
//! `<image>` placeholder) as one chat turn in the checkpoint's own template, the image at its own
//! resolution.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use qvlm_core::io::image::Rgb8;
use qvlm_core::io::prompt::Template;
use qvlm_core::model::llava::LlavaBundle;
use qvlm_core::model::qwen2_vl::Qwen2VlBundle;
use qvlm_core::rng::SplitMix64;
use qvlm_search::calib::CalibrationSet;
use tch::Tensor;

use crate::eval::dataset::EvalData;
use crate::eval::generate::without_image_placeholder;
use crate::prompt;
use crate::prompt::scienceqa::{items, target_text, SqaItem};
use crate::vlm::Vlm;

/// Answers longer than this many tokens are cut (VEO's L_reg needs the first few only).
const MAX_ANSWER_TOKENS: usize = 64;

/// `n` calibration pairs of `data`, drawn with `seed`; fewer only when the source has fewer and
/// `allow_fewer` (else an error naming both counts).
pub fn calibration(
    data: &EvalData,
    model: &Vlm,
    n: usize,
    allow_fewer: bool,
    seed: u64,
) -> Result<CalibrationSet> {
    let use_im_start_end = match model {
        Vlm::Llava(bundle) => bundle.model.cfg.use_im_start_end,
        Vlm::Qwen2Vl(_) => false,
    };
    let (template, pairs) = pairs(data, n, seed, use_im_start_end)?;
    if pairs.len() < n && !allow_fewer {
        bail!(
            "key `calibration.samples`: {n} pairs requested, but the calibration source ({}) has only {} usable ones; lower `samples` or set `calibration.allow_fewer = true`",
            data.calibration_source(),
            pairs.len()
        );
    }
    if pairs.is_empty() {
        bail!("no calibration pairs with an image in the dataset");
    }
    match model {
        Vlm::Llava(bundle) => build(bundle, template, pairs),
        Vlm::Qwen2Vl(bundle) => build_qwen2_vl(bundle, pairs),
    }
}

/// One calibration pair: the user turn (LLaVA's, with its image placeholder), the image and the
/// answer text.
type Pair = (String, PathBuf, String);

/// Up to `n` pairs of `data` drawn with `seed`, and the conversation template LLaVA renders
/// their user turns with.
fn pairs(
    data: &EvalData,
    n: usize,
    seed: u64,
    use_im_start_end: bool,
) -> Result<(Template, Vec<Pair>)> {
    Ok(match data {
        EvalData::EasyVqa { train, calibration, template, .. } => {
            let pairs = pick(calibration, n, seed)
                .into_iter()
                .map(|q| {
                    let image = train.image_path(q.image_id).context("image id without a file")?;
                    let message = prompt::easy_vqa::user_message(&q.text);
                    Ok((message, image.to_path_buf(), q.answer.clone()))
                })
                .collect::<Result<_>>()?;
            (*template, pairs)
        }
        EvalData::Scienceqa { train, test, opts, .. } => {
            let source = train.as_ref().unwrap_or(test);
            let with_image: Vec<SqaItem> =
                items(source, opts.format).into_iter().filter(|i| i.image.is_some()).collect();
            let pairs = pick(&with_image, n, seed)
                .into_iter()
                .map(|item| {
                    let problem =
                        source.problem(&item.pid).context("calibration item without a problem")?;
                    let message = prompt::scienceqa::user_message(
                        item,
                        opts.format.single_pred(),
                        use_im_start_end,
                    );
                    Ok((
                        message,
                        item.image.clone().context("image")?,
                        target_text(problem, opts.format),
                    ))
                })
                .collect::<Result<_>>()?;
            (opts.template, pairs)
        }
        EvalData::Vqa { data, questions, opts } => {
            let pairs = pick(questions, n, seed)
                .into_iter()
                .map(|q| {
                    let message = prompt::vqa::user_message(q, opts.short_answer, use_im_start_end);
                    let answer = data
                        .answers(&q.question_id)
                        .and_then(|a| a.first().cloned())
                        .unwrap_or_default();
                    (message, data.image_path(q), answer)
                })
                .collect();
            (opts.template, pairs)
        }
    })
}

/// Qwen2-VL: each user turn (without LLaVA's image placeholder) as one chat turn in the
/// checkpoint's own template, the image slot expanded per image by the search; each image
/// preprocessed at its own resolution.
fn build_qwen2_vl(bundle: &Qwen2VlBundle, pairs: Vec<Pair>) -> Result<CalibrationSet> {
    let eos = bundle.eos_token_ids.first().copied();
    let (mut pixels, mut grids, mut prompts, mut answers) = (vec![], vec![], vec![], vec![]);
    for (message, path, answer) in pairs {
        let image = Rgb8::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let (p, grid) = bundle.images.preprocess(&image)?;
        pixels.push(p);
        grids.push(grid);
        prompts.push(bundle.chat_pieces(&without_image_placeholder(&message))?);
        let mut ids = bundle.tokenizer.encode_text(&answer, false)?;
        ids.truncate(MAX_ANSWER_TOKENS);
        ids.extend(eos);
        answers.push(ids);
    }
    Ok(CalibrationSet { pixels: Tensor::cat(&pixels, 0), grids, prompts, answers })
}

/// `n` of `items` drawn without replacement with `seed` (all when there are fewer).
fn pick<T>(items: &[T], n: usize, seed: u64) -> Vec<&T> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    order.into_iter().take(n).map(|i| &items[i]).collect()
}

/// Prompts, images and answer texts (truncated to [`MAX_ANSWER_TOKENS`], EOS appended) → a
/// calibration set.
fn build(bundle: &LlavaBundle, template: Template, pairs: Vec<Pair>) -> Result<CalibrationSet> {
    let eos = bundle.eos_ids().first().copied();
    let mut pixels = Vec::with_capacity(pairs.len());
    let mut prompts = Vec::with_capacity(pairs.len());
    let mut answers = Vec::with_capacity(pairs.len());
    for (message, image, answer) in pairs {
        let prompt = template.render(&message);
        pixels.push(
            bundle
                .images
                .preprocess_file(&image)
                .with_context(|| format!("reading {}", image.display()))?,
        );
        prompts.push(bundle.tokenizer.tokenize_prompt(&prompt, 1)?);
        let mut ids = bundle.tokenizer.encode_text(&answer, false)?;
        ids.truncate(MAX_ANSWER_TOKENS);
        ids.extend(eos);
        answers.push(ids);
    }
    Ok(CalibrationSet { pixels: Tensor::stack(&pixels, 0), grids: vec![], prompts, answers })
}
