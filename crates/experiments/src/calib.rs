//! Calibration sets for the searches, one path for every dataset: `n` vision-language pairs
//! (prompt, image, answer) drawn without replacement with a seed, tokenized and preprocessed.
//! easy-VQA draws from its train split without the validation images (so tuning on validation
//! never sees its own images in calibration), ScienceQA from its train split (image questions
//! only — a calibration sample carries one image); VQA files draw from the evaluated file
//! itself, as Q-VLM's VQA path does. Qwen2-VL models calibrate on easy-VQA (each question as a
//! chat turn in the checkpoint's own template, the image at its native resolution); the other
//! benchmarks' prompts are LLaVA's and are refused for them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use qvlm_core::io::image::Rgb8;
use qvlm_core::model::llava::LlavaBundle;
use qvlm_core::model::qwen2_vl::Qwen2VlBundle;
use qvlm_core::rng::SplitMix64;
use qvlm_search::calib::CalibrationSet;
use tch::Tensor;

use crate::eval::dataset::EvalData;
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
    match model {
        Vlm::Llava(bundle) => llava_calibration(data, bundle, n, allow_fewer, seed),
        Vlm::Qwen2Vl(bundle) => qwen2_vl_calibration(data, bundle, n, allow_fewer, seed),
    }
}

fn too_few(data: &EvalData, n: usize, found: usize, allow_fewer: bool) -> Result<()> {
    if found < n && !allow_fewer {
        bail!(
            "key `calibration.samples`: {n} pairs requested, but the calibration source ({}) has only {found} usable ones; lower `samples` or set `calibration.allow_fewer = true`",
            data.calibration_source(),
        );
    }
    Ok(())
}

/// Qwen2-VL: easy-VQA questions as chat turns (the checkpoint's chat template, the image slot
/// expanded per image by the search), each image preprocessed at its own resolution.
fn qwen2_vl_calibration(
    data: &EvalData,
    bundle: &Qwen2VlBundle,
    n: usize,
    allow_fewer: bool,
    seed: u64,
) -> Result<CalibrationSet> {
    let EvalData::EasyVqa { train, calibration, .. } = data else {
        bail!(
            "Qwen2-VL models are calibrated and evaluated on easy-VQA only so far (the ScienceQA and VQA prompts are LLaVA's); the dataset is {}",
            data.calibration_source()
        );
    };
    let picked = pick(calibration, n, seed);
    too_few(data, n, picked.len(), allow_fewer)?;
    if picked.is_empty() {
        bail!("no calibration pairs with an image in the dataset");
    }
    let eos = bundle.eos_token_ids.first().copied();
    let (mut pixels, mut grids, mut prompts, mut answers) = (vec![], vec![], vec![], vec![]);
    for q in picked {
        let path = train.image_path(q.image_id).context("image id without a file")?;
        let image = Rgb8::open(path).with_context(|| format!("reading {}", path.display()))?;
        let (p, grid) = bundle.images.preprocess(&image)?;
        pixels.push(p);
        grids.push(grid);
        prompts.push(bundle.chat_pieces(&q.text)?);
        let mut ids = bundle.tokenizer.encode_text(&q.answer, false)?;
        ids.truncate(MAX_ANSWER_TOKENS);
        ids.extend(eos);
        answers.push(ids);
    }
    Ok(CalibrationSet { pixels: Tensor::cat(&pixels, 0), grids, prompts, answers })
}

fn llava_calibration(
    data: &EvalData,
    bundle: &LlavaBundle,
    n: usize,
    allow_fewer: bool,
    seed: u64,
) -> Result<CalibrationSet> {
    let pairs: Vec<(String, PathBuf, String)> = match data {
        EvalData::EasyVqa { train, calibration, template, .. } => pick(calibration, n, seed)
            .into_iter()
            .map(|q| {
                let image = train.image_path(q.image_id).context("image id without a file")?;
                let prompt = prompt::easy_vqa::prompt(*template, &q.text);
                Ok((prompt, image.to_path_buf(), q.answer.clone()))
            })
            .collect::<Result<_>>()?,
        EvalData::Scienceqa { train, test, opts, .. } => {
            let source = train.as_ref().unwrap_or(test);
            let with_image: Vec<SqaItem> =
                items(source, opts.format).into_iter().filter(|i| i.image.is_some()).collect();
            pick(&with_image, n, seed)
                .into_iter()
                .map(|item| {
                    let problem =
                        source.problem(&item.pid).context("calibration item without a problem")?;
                    let message = prompt::scienceqa::user_message(
                        item,
                        opts.format.single_pred(),
                        bundle.model.cfg.use_im_start_end,
                    );
                    Ok((
                        opts.template.render(&message),
                        item.image.clone().context("image")?,
                        target_text(problem, opts.format),
                    ))
                })
                .collect::<Result<_>>()?
        }
        EvalData::Vqa { data, questions, opts } => pick(questions, n, seed)
            .into_iter()
            .map(|q| {
                let message = prompt::vqa::user_message(
                    q,
                    opts.short_answer,
                    bundle.model.cfg.use_im_start_end,
                );
                let answer = data
                    .answers(&q.question_id)
                    .and_then(|a| a.first().cloned())
                    .unwrap_or_default();
                (opts.template.render(&message), data.image_path(q), answer)
            })
            .collect(),
    };
    too_few(data, n, pairs.len(), allow_fewer)?;
    build(bundle, pairs)
}

/// `n` of `items` drawn without replacement with `seed` (all when there are fewer).
fn pick<T>(items: &[T], n: usize, seed: u64) -> Vec<&T> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    order.into_iter().take(n).map(|i| &items[i]).collect()
}

/// Prompts, images and answer texts (truncated to [`MAX_ANSWER_TOKENS`], EOS appended) → a
/// calibration set.
fn build(bundle: &LlavaBundle, pairs: Vec<(String, PathBuf, String)>) -> Result<CalibrationSet> {
    if pairs.is_empty() {
        bail!("no calibration pairs with an image in the dataset");
    }
    let eos = bundle.eos_ids().first().copied();
    let mut pixels = Vec::with_capacity(pairs.len());
    let mut prompts = Vec::with_capacity(pairs.len());
    let mut answers = Vec::with_capacity(pairs.len());
    for (prompt, image, answer) in pairs {
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
