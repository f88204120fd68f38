//! The evaluated dataset of a run, loaded once: easy-VQA, ScienceQA or VQA-style jsonl. Each
//! gives the same three things to the runner — metric rows, the first-token log-probabilities
//! (for KL / agreement against float) and a per-question CSV — and draws calibration pairs.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use qvlm_core::hook::LinearHook;
use qvlm_core::io::prompt::Template;
use qvlm_core::model::llava::LlavaBundle;
use qvlm_search::calib::CalibrationSet;
use tch::Tensor;

use crate::config::{DatasetConfig, DatasetKind};
use crate::data::easy_vqa::{self, EasyVqa};
use crate::data::scienceqa::{self, ImageLayout, PromptFormat, ScienceQa, SqaItem};
use crate::data::vqa::{Vqa, VqaQuestion};
use crate::data::SplitMix64;
use crate::eval::{easy_vqa as eval_easy, scienceqa as eval_sqa, vqa as eval_vqa};

/// A loaded dataset and the questions a run evaluates.
pub enum EvalData {
    EasyVqa {
        train: EasyVqa,
        test: EasyVqa,
        questions: Vec<easy_vqa::Question>,
        template: Template,
        batch: usize,
    },
    Scienceqa {
        train: Option<ScienceQa>,
        test: ScienceQa,
        items: Vec<SqaItem>,
        opts: eval_sqa::SqaEvalOptions,
    },
    Vqa {
        data: Vqa,
        questions: Vec<VqaQuestion>,
        opts: eval_vqa::VqaEvalOptions,
    },
}

/// What one evaluation produced.
pub struct Evaluated {
    /// (metric, value) rows.
    pub metrics: Vec<(String, f64)>,
    /// `[N, vocab]` log-probabilities of the first generated token.
    pub log_probs: Tensor,
    /// Per-question CSV (with header).
    pub answers_csv: String,
}

fn limit<T: Clone>(all: &[T], n: Option<usize>) -> Vec<T> {
    all[..n.unwrap_or(all.len()).min(all.len())].to_vec()
}

fn csv_field(s: &str) -> String {
    s.replace([',', '\n', '\r'], " ")
}

impl EvalData {
    pub fn load(d: &DatasetConfig) -> Result<Self> {
        Ok(match d.kind {
            DatasetKind::EasyVqa => {
                let root = match &d.path {
                    Some(p) => p.clone(),
                    None => EasyVqa::default_root()?,
                };
                let test = EasyVqa::load(&root, easy_vqa::Split::Test)?;
                let train = EasyVqa::load(&root, easy_vqa::Split::Train)?;
                let questions = limit(&test.questions, d.limit);
                EvalData::EasyVqa {
                    train,
                    test,
                    questions,
                    template: d.template,
                    batch: d.batch_size,
                }
            }
            DatasetKind::Scienceqa => {
                let root = d.path.clone().context("dataset.path is required for scienceqa")?;
                let split: scienceqa::Split = d.split.as_deref().unwrap_or("test").parse()?;
                let format: PromptFormat =
                    d.prompt_format.as_deref().unwrap_or("QCM-LEPA").parse()?;
                let layout = match (d.image_layout.as_deref(), &d.images) {
                    (Some("flat"), Some(dir)) => ImageLayout::Flat(dir.clone()),
                    _ => ImageLayout::official(&root),
                };
                let test = ScienceQa::load(&root, split, layout.clone())?;
                // Calibration pairs come from the training split (Q-VLM's convention) when present.
                let train = match ImageLayout::official(&root) {
                    l if root.join("images").join("train").is_dir() => {
                        Some(ScienceQa::load(&root, scienceqa::Split::Train, l)?)
                    }
                    _ => None,
                };
                let items = limit(&test.items(format), d.limit);
                let mut opts = eval_sqa::SqaEvalOptions::for_format(format);
                opts.batch_size = d.batch_size;
                opts.template = d.template;
                if let Some(n) = d.max_new_tokens {
                    opts.max_new_tokens = n;
                }
                EvalData::Scienceqa { train, test, items, opts }
            }
            DatasetKind::Vqa => {
                let questions_file =
                    d.questions.clone().context("dataset.questions is required for vqa")?;
                let images = d.images.clone().context("dataset.images is required for vqa")?;
                let data = Vqa::load(&questions_file, &images, d.answers.as_deref())?;
                let questions = limit(&data.questions, d.limit);
                let mut opts = eval_vqa::VqaEvalOptions {
                    template: d.template,
                    batch_size: d.batch_size,
                    ..Default::default()
                };
                if let Some(n) = d.max_new_tokens {
                    opts.max_new_tokens = n;
                }
                EvalData::Vqa { data, questions, opts }
            }
        })
    }

    pub fn len(&self) -> usize {
        match self {
            EvalData::EasyVqa { questions, .. } => questions.len(),
            EvalData::Scienceqa { items, .. } => items.len(),
            EvalData::Vqa { questions, .. } => questions.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Greedy answers to every evaluated question with `hook` on the model.
    pub fn evaluate(
        &self,
        bundle: &LlavaBundle,
        hook: &mut dyn LinearHook,
        pb: &ProgressBar,
    ) -> Result<Evaluated> {
        match self {
            EvalData::EasyVqa { test, questions, template, batch, .. } => {
                let out =
                    eval_easy::evaluate(bundle, test, questions, *template, *batch, hook, pb)?;
                let acc = out.accuracy();
                let mut metrics = vec![("accuracy".to_string(), acc.overall)];
                for (t, v) in &acc.by_type {
                    metrics.push((
                        format!("accuracy_{}", serde_json::to_value(t)?.as_str().unwrap_or("type")),
                        *v,
                    ));
                }
                metrics.push(("questions".into(), acc.count as f64));
                let mut csv = String::from("index,kind,answer,predicted,correct\n");
                for a in &out.answered {
                    csv.push_str(&format!(
                        "{},{:?},{},{},{}\n",
                        a.index,
                        a.kind,
                        a.answer,
                        csv_field(&a.predicted),
                        a.correct
                    ));
                }
                Ok(Evaluated { metrics, log_probs: out.first_log_probs, answers_csv: csv })
            }
            EvalData::Scienceqa { test, items, opts, .. } => {
                let out = eval_sqa::evaluate(bundle, test, items, opts, hook, pb)?;
                let acc = out.accuracy();
                let mut metrics = vec![
                    ("accuracy".to_string(), acc.average.accuracy),
                    ("questions".into(), acc.average.count as f64),
                    ("unparsed_answers".into(), acc.average.unparsed as f64),
                ];
                for (class, score) in &acc.by_class {
                    metrics.push((format!("accuracy_{}", class.name()), score.accuracy));
                }
                let mut csv = String::from("pid,answer,parsed,correct,prediction\n");
                for r in &out.rows {
                    let parsed = r.parsed.map(String::from).unwrap_or_default();
                    csv.push_str(&format!(
                        "{},{},{},{},{}\n",
                        r.pid,
                        r.answer,
                        parsed,
                        r.correct,
                        csv_field(&r.prediction)
                    ));
                }
                Ok(Evaluated { metrics, log_probs: out.first_log_probs, answers_csv: csv })
            }
            EvalData::Vqa { data, questions, opts } => {
                let out = eval_vqa::evaluate(bundle, data, questions, opts, hook, pb)?;
                let mut metrics = vec![("questions".to_string(), out.rows.len() as f64)];
                if let Some(acc) = out.accuracy() {
                    metrics.push(("accuracy".into(), acc.accuracy));
                    metrics.push(("scored_questions".into(), acc.scored as f64));
                }
                let mut csv = String::from("question_id,accuracy,normalized,prediction\n");
                for r in &out.rows {
                    let a = r.accuracy.map(|a| format!("{a:.6}")).unwrap_or_default();
                    csv.push_str(&format!(
                        "{},{},{},{}\n",
                        r.question_id,
                        a,
                        csv_field(&r.normalized),
                        csv_field(&r.prediction)
                    ));
                }
                Ok(Evaluated { metrics, log_probs: out.first_log_probs, answers_csv: csv })
            }
        }
    }

    /// `n` calibration pairs drawn with `seed`: easy-VQA's and ScienceQA's training splits (image
    /// questions only — a calibration sample carries one image), or, for VQA files, the evaluated
    /// file itself (as Q-VLM's VQA path does).
    pub fn calibration(&self, bundle: &LlavaBundle, n: usize, seed: u64) -> Result<CalibrationSet> {
        match self {
            EvalData::EasyVqa { train, template, .. } => {
                crate::calib::easy_vqa_calibration(bundle, train, *template, n, seed)
            }
            EvalData::Scienceqa { train, test, opts, .. } => {
                let source = train.as_ref().unwrap_or(test);
                let items: Vec<SqaItem> =
                    source.items(opts.format).into_iter().filter(|i| i.image.is_some()).collect();
                let pairs = pick(&items, n, seed).into_iter().map(|item| {
                    let problem =
                        source.problem(&item.pid).context("calibration item without a problem")?;
                    let message = scienceqa::user_message(
                        item,
                        opts.format.single_pred(),
                        bundle.model.cfg.use_im_start_end,
                    );
                    let target = scienceqa::target_text(problem, opts.format);
                    Ok((
                        opts.template.render(&message),
                        item.image.clone().context("image")?,
                        target,
                    ))
                });
                build(bundle, pairs.collect::<Result<Vec<_>>>()?)
            }
            EvalData::Vqa { data, questions, opts } => {
                let pairs = pick(questions, n, seed)
                    .into_iter()
                    .map(|q| {
                        let message = eval_vqa::user_message(
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
                    .collect();
                build(bundle, pairs)
            }
        }
    }
}

fn pick<T>(items: &[T], n: usize, seed: u64) -> Vec<&T> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    order.into_iter().take(n).map(|i| &items[i]).collect()
}

/// Prompts, images and answer texts (truncated to 64 tokens, EOS appended) → a calibration set.
fn build(
    bundle: &LlavaBundle,
    pairs: Vec<(String, std::path::PathBuf, String)>,
) -> Result<CalibrationSet> {
    if pairs.is_empty() {
        anyhow::bail!("no calibration pairs with an image in the dataset");
    }
    let eos = bundle.eos_ids().first().copied();
    let mut pixels = Vec::new();
    let mut prompts = Vec::new();
    let mut answers = Vec::new();
    for (prompt, image, answer) in pairs {
        pixels.push(
            bundle
                .images
                .preprocess_file(&image)
                .with_context(|| format!("reading {}", image.display()))?,
        );
        prompts.push(bundle.tokenizer.tokenize_prompt(&prompt, 1)?);
        let mut ids = bundle.tokenizer.encode_text(&answer, false)?;
        ids.truncate(64);
        ids.extend(eos);
        answers.push(ids);
    }
    Ok(CalibrationSet { pixels: Tensor::stack(&pixels, 0), prompts, answers })
}
