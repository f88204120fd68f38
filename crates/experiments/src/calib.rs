//! Calibration sets for the searches: vision-language pairs drawn (seeded) from a dataset's
//! training split.

use anyhow::{Context, Result};
use qvlm_core::io::prompt::Template;
use qvlm_core::model::llava::LlavaBundle;
use qvlm_search::calib::CalibrationSet;
use tch::Tensor;

use crate::data::easy_vqa::EasyVqa;
use crate::data::SplitMix64;
use crate::eval::easy_vqa::prompt;

/// `n` questions of easy-VQA's training split drawn without replacement with `seed`; each
/// sample is the prompt, its image and the answer tokens (answer + EOS) for VEO's L_reg.
pub fn easy_vqa_calibration(
    bundle: &LlavaBundle,
    train: &EasyVqa,
    template: Template,
    n: usize,
    seed: u64,
) -> Result<CalibrationSet> {
    let mut order: Vec<usize> = (0..train.questions.len()).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    let eos = bundle.eos_ids().first().copied();
    let mut pixels = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    let mut answers = Vec::with_capacity(n);
    for &i in order.iter().take(n) {
        let q = &train.questions[i];
        let path = train.image_path(q.image_id).context("image id without a file")?;
        pixels.push(
            bundle
                .images
                .preprocess_file(path)
                .with_context(|| format!("reading {}", path.display()))?,
        );
        prompts.push(bundle.tokenizer.tokenize_prompt(&prompt(template, &q.text), 1)?);
        let mut ans = bundle.tokenizer.encode_text(&q.answer, false)?;
        ans.extend(eos);
        answers.push(ans);
    }
    Ok(CalibrationSet { pixels: Tensor::stack(&pixels, 0), prompts, answers })
}
