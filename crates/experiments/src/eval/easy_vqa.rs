//! easy-VQA evaluation: batched greedy decoding, exact match per question type, and the answer
//! distribution (first generated position) for KL / top-1 agreement against the float model.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use qvlm_core::io::prompt::{Piece, Template};
use qvlm_core::model::hook::LinearHook;
use qvlm_core::model::llava::{GenerateOptions, LlavaBundle};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::data::easy_vqa::{EasyVqa, Question, QuestionType};

/// The prompt of an easy-VQA question: LLaVA's `<image>\n{question}` in a conversation template.
pub fn prompt(template: Template, question: &str) -> String {
    template.render(&Template::image_question(question, false))
}

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
        let p = &reference.first_log_probs;
        let q = &self.first_log_probs;
        let kl = (p.exp() * (p - q))
            .sum_dim_intlist(-1, false, Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        let agree = p
            .argmax(-1, false)
            .eq_tensor(&q.argmax(-1, false))
            .to_kind(Kind::Double)
            .mean(Kind::Double);
        (kl, 100.0 * agree.double_value(&[]))
    }
}

/// Answers `questions` greedily in batches of `batch_size`; `hook` sees every linear input.
pub fn evaluate(
    bundle: &LlavaBundle,
    data: &EasyVqa,
    questions: &[Question],
    template: Template,
    batch_size: usize,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<EvalOutput> {
    let _guard = tch::no_grad_guard();
    let model = &bundle.model;
    let eos = bundle.eos_ids();
    let mut answered = Vec::with_capacity(questions.len());
    let mut log_probs = Vec::new();
    for chunk in questions.chunks(batch_size.max(1)) {
        // Image features once per distinct image of the batch.
        let mut ids: Vec<u32> = chunk.iter().map(|q| q.image_id).collect();
        ids.dedup();
        let pixels = ids
            .iter()
            .map(|&id| {
                let path = data.image_path(id).context("image id without a file")?;
                bundle
                    .images
                    .preprocess_file(path)
                    .with_context(|| format!("preprocessing {}", path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let feats = model.image_features(&Tensor::stack(&pixels, 0), hook);
        let mut sequences: Vec<Vec<Piece>> = Vec::with_capacity(chunk.len());
        let mut images = Vec::with_capacity(chunk.len());
        for q in chunk {
            sequences.push(bundle.tokenizer.tokenize_prompt(&prompt(template, &q.text), 1)?);
            let row = ids.iter().position(|&i| i == q.image_id).unwrap_or(0) as i64;
            images.push(feats.narrow(0, row, 1));
        }
        let batch = model.prepare(&sequences, &images)?;
        let gen = GenerateOptions { max_new_tokens: 4, eos_token_ids: eos.clone(), stop: None };
        let out = model.generate(&batch, &gen, hook);
        log_probs.push(
            out.first_logits
                .to_kind(Kind::Float)
                .log_softmax(-1, Kind::Float)
                .to_device(tch::Device::Cpu),
        );
        for (q, tokens) in chunk.iter().zip(&out.tokens) {
            let predicted = bundle.tokenizer.decode(tokens, true)?.trim().to_string();
            answered.push(Answered {
                index: q.index,
                kind: q.kind,
                answer: q.answer.clone(),
                correct: predicted == q.answer,
                predicted,
            });
        }
        progress.inc(chunk.len() as u64);
    }
    let first_log_probs = if log_probs.is_empty() {
        Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))
    } else {
        Tensor::cat(&log_probs, 0)
    };
    Ok(EvalOutput { answered, first_log_probs })
}
