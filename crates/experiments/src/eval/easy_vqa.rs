//! easy-VQA evaluation: batched greedy decoding, exact match per question type, and the answer
//! distribution (first generated position) for KL / top-1 agreement against the float model.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use qvlm_core::hook::LinearHook;
use qvlm_core::io::prompt::Template;
use qvlm_core::model::llava::LlavaBundle;
use qvlm_core::model::qwen2_vl::Qwen2VlBundle;
use serde::Serialize;
use tch::Tensor;

use crate::data::easy_vqa::{EasyVqa, Question, QuestionType};
use crate::eval::generate::{first_token_agreement, generate, generate_qwen2_vl, Request};
use crate::prompt::easy_vqa::user_message;

#[derive(Clone, Debug, Serialize)]
pub struct Answered {
    pub index: usize,
    pub kind: QuestionType,
    pub answer: String,
    pub predicted: String,
    pub correct: bool,
}

#[derive(Debug)]
pub struct EvalOutput {
    pub answered: Vec<Answered>,
    /// `[N, vocab]` f32 log-probabilities of the first generated token (CPU).
    pub first_log_probs: Tensor,
}

/// Accuracy overall and per question type.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Accuracy {
    pub overall: f64,
    pub by_type: BTreeMap<QuestionType, f64>,
    pub count: usize,
}

impl EvalOutput {
    pub fn accuracy(&self) -> Accuracy {
        let pct = |xs: &[&Answered]| {
            if xs.is_empty() {
                0.0
            } else {
                100.0 * xs.iter().filter(|a| a.correct).count() as f64 / xs.len() as f64
            }
        };
        let all: Vec<&Answered> = self.answered.iter().collect();
        let mut by_type = BTreeMap::new();
        for t in QuestionType::ALL {
            let of: Vec<&Answered> = all.iter().copied().filter(|a| a.kind == t).collect();
            if !of.is_empty() {
                by_type.insert(t, pct(&of));
            }
        }
        Accuracy { overall: pct(&all), by_type, count: all.len() }
    }

    /// Mean KL(reference ‖ self) of the answer distributions and the top-1 agreement (%).
    pub fn agreement_with(&self, reference: &EvalOutput) -> (f64, f64) {
        first_token_agreement(&reference.first_log_probs, &self.first_log_probs)
    }
}

/// Answers `questions` greedily in batches of `batch_size` (at most 4 new tokens: every
/// easy-VQA answer is one word) through [`generate`]; `hook` sees every linear input.
pub fn evaluate(
    bundle: &LlavaBundle,
    data: &EasyVqa,
    questions: &[Question],
    template: Template,
    batch_size: usize,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<EvalOutput> {
    let requests = requests(data, questions)?;
    let generated =
        generate(bundle, &requests, template, &bundle.images, batch_size, 4, hook, progress)?;
    Ok(score(questions, generated))
}

/// [`evaluate`] on a Qwen2-VL model: each question as one chat turn in the checkpoint's own
/// template (the question's text after the image), at most 4 new tokens.
pub fn evaluate_qwen2_vl(
    bundle: &Qwen2VlBundle,
    data: &EasyVqa,
    questions: &[Question],
    batch_size: usize,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<EvalOutput> {
    let generated =
        generate_qwen2_vl(bundle, &requests(data, questions)?, batch_size, 4, hook, progress)?;
    Ok(score(questions, generated))
}

/// Each question's user turn (LLaVA's form, `<image>\n{question}`) with its image.
fn requests(data: &EasyVqa, questions: &[Question]) -> Result<Vec<Request>> {
    questions
        .iter()
        .map(|q| {
            let path = data.image_path(q.image_id).context("image id without a file")?;
            Ok(Request { message: user_message(&q.text), image: Some(path.to_path_buf()) })
        })
        .collect()
}

/// Exact match of each generated answer.
fn score(questions: &[Question], generated: crate::eval::generate::Generated) -> EvalOutput {
    let answered = questions
        .iter()
        .zip(generated.texts)
        .map(|(q, predicted)| Answered {
            index: q.index,
            kind: q.kind,
            answer: q.answer.clone(),
            correct: predicted == q.answer,
            predicted,
        })
        .collect();
    EvalOutput { answered, first_log_probs: generated.first_log_probs }
}
