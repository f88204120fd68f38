//! The evaluated dataset of a run, loaded once: easy-VQA, ScienceQA or VQA-style jsonl. Each
//! gives the same three things to the runner — metric rows, the first-token log-probabilities
//! (for KL / agreement against float) and a per-question CSV; `calib` draws its calibration pairs.

use anyhow::Result;
use indicatif::ProgressBar;
use qvlm_core::hook::LinearHook;
use qvlm_core::io::prompt::Template;
use tch::Tensor;

use crate::config::{Benchmark, DatasetConfig, SqaImages};
use crate::data::easy_vqa::{self, EasyVqa};
use crate::data::scienceqa::{self, ImageLayout, ScienceQa};
use crate::data::vqa::{Vqa, VqaQuestion};
use crate::eval::{easy_vqa as eval_easy, scienceqa as eval_sqa, vqa as eval_vqa};
use crate::prompt::scienceqa::{items, PromptFormat, SqaItem};
use crate::table::csv_field;
use crate::vlm::Vlm;

/// A loaded dataset and the questions a run evaluates.
pub enum EvalData {
    EasyVqa {
        /// The train split: calibration pairs come from `calibration`, its questions whose
        /// images are not in the validation slice.
        train: EasyVqa,
        calibration: Vec<easy_vqa::Question>,
        /// The split the evaluated `questions` come from (test, or train for validation).
        evaluated: EasyVqa,
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
    /// Per-question scores for paired tests (empty when questions cannot be scored, e.g. VQA
    /// without human answers).
    pub scores: Vec<QuestionScore>,
}

/// One evaluated question's score, keyed so that two cells' scores pair up.
#[derive(Clone, Debug, PartialEq)]
pub struct QuestionScore {
    /// A stable question id (easy-VQA: its index; ScienceQA: the pid; VQA: the question id).
    pub question: String,
    /// The unit questions are resampled by in the paired bootstrap: questions about one image
    /// are not independent (easy-VQA: the image id; ScienceQA: the pid; VQA: the image file).
    pub cluster: String,
    /// In [0, 1]: correct or not, or the VQA accuracy.
    pub score: f64,
    /// The classes the question counts toward, named as in the cell's `accuracy_<class>`
    /// metrics (easy-VQA: its question type; ScienceQA: subject, context and grade band, which
    /// overlap; VQA: none), so that Table 2's per-class differences get the same paired test.
    pub classes: Vec<String>,
}

/// `scores.csv` of a cell: `question,cluster,classes,score`, the classes joined by `;`.
pub fn scores_csv(scores: &[QuestionScore]) -> String {
    let mut s = String::from("question,cluster,classes,score\n");
    for q in scores {
        s.push_str(&format!(
            "{},{},{},{}\n",
            csv_field(&q.question),
            csv_field(&q.cluster),
            csv_field(&q.classes.join(";")),
            q.score
        ));
    }
    s
}

fn limit<T: Clone>(all: &[T], n: Option<std::num::NonZeroUsize>) -> Vec<T> {
    all[..n.map_or(all.len(), |n| n.get()).min(all.len())].to_vec()
}

impl EvalData {
    pub fn load(d: &DatasetConfig) -> Result<Self> {
        let batch = d.batch_size.get();
        let max_new_tokens = d.max_new_tokens.map(|n| n.get());
        Ok(match &d.benchmark {
            Benchmark::EasyVqa { path, validation } => {
                let root = match path {
                    Some(p) => p.clone(),
                    None => EasyVqa::default_root()?,
                };
                let train = EasyVqa::load(&root, easy_vqa::Split::Train)?;
                let held_out = train.validation_images();
                let (calibration, validation_questions): (Vec<_>, Vec<_>) =
                    train.questions.iter().cloned().partition(|q| !held_out.contains(&q.image_id));
                let (evaluated, questions) = if *validation {
                    (train.clone(), limit(&validation_questions, d.limit))
                } else {
                    let test = EasyVqa::load(&root, easy_vqa::Split::Test)?;
                    let questions = limit(&test.questions, d.limit);
                    (test, questions)
                };
                EvalData::EasyVqa {
                    train,
                    calibration,
                    evaluated,
                    questions,
                    template: d.template,
                    batch,
                }
            }
            Benchmark::Scienceqa {
                path: root,
                split,
                prompt_format,
                images,
                calibrate_on_evaluated_split,
            } => {
                let split = split.unwrap_or(scienceqa::Split::Test);
                let format = prompt_format.unwrap_or(PromptFormat::QcmLepa);
                let layout = match images {
                    Some(SqaImages::Flat(dir)) => ImageLayout::Flat(dir.clone()),
                    None | Some(SqaImages::Official) => ImageLayout::official(root),
                };
                let test = ScienceQa::load(root, split, layout)?;
                // Calibration pairs come from the training split (Q-VLM's convention); the
                // evaluated split only when the config says so.
                let train_images = root.join("images").join("train");
                let train = if *calibrate_on_evaluated_split {
                    None
                } else if train_images.is_dir() {
                    Some(ScienceQa::load(
                        root,
                        scienceqa::Split::Train,
                        ImageLayout::official(root),
                    )?)
                } else {
                    anyhow::bail!(
                        "{}: no train images to calibrate on; set `dataset.calibrate_on_evaluated_split = true` to draw calibration pairs from the evaluated split",
                        train_images.display()
                    );
                };
                let items = limit(&items(&test, format), d.limit);
                let mut opts = eval_sqa::SqaEvalOptions::for_format(format);
                opts.batch_size = batch;
                opts.template = d.template;
                if let Some(n) = max_new_tokens {
                    opts.max_new_tokens = n;
                }
                EvalData::Scienceqa { train, test, items, opts }
            }
            Benchmark::Vqa { questions: questions_file, images, answers } => {
                let data = Vqa::load(questions_file, images, answers.as_deref())?;
                let questions = limit(&data.questions, d.limit);
                let mut opts = eval_vqa::VqaEvalOptions {
                    template: d.template,
                    batch_size: batch,
                    ..Default::default()
                };
                if let Some(n) = max_new_tokens {
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

    /// Where calibration pairs come from, for messages.
    pub fn calibration_source(&self) -> &'static str {
        match self {
            EvalData::EasyVqa { .. } => "easy-VQA's train split without its validation images",
            EvalData::Scienceqa { train: Some(_), .. } => {
                "ScienceQA's train split, image questions"
            }
            EvalData::Scienceqa { train: None, .. } => {
                "the evaluated ScienceQA split, image questions (calibrate_on_evaluated_split)"
            }
            EvalData::Vqa { .. } => "the evaluated VQA questions",
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Greedy answers to every evaluated question with `hook` on the model (Qwen2-VL: asked in
    /// the checkpoint's chat template; `template` is LLaVA's).
    pub fn evaluate(
        &self,
        model: &Vlm,
        hook: &mut dyn LinearHook,
        pb: &ProgressBar,
    ) -> Result<Evaluated> {
        match self {
            EvalData::EasyVqa { evaluated, questions, template, batch, .. } => {
                let out = match model {
                    Vlm::Llava(bundle) => eval_easy::evaluate(
                        bundle, evaluated, questions, *template, *batch, hook, pb,
                    )?,
                    Vlm::Qwen2Vl(qwen) => {
                        eval_easy::evaluate_qwen2_vl(qwen, evaluated, questions, *batch, hook, pb)?
                    }
                };
                easy_vqa_evaluated(questions, out)
            }
            EvalData::Scienceqa { test, items, opts, .. } => {
                let out = eval_sqa::evaluate(model, test, items, opts, hook, pb)?;
                let acc = out.accuracy();
                let mut metrics = vec![
                    ("accuracy".to_string(), acc.average.accuracy),
                    ("questions".into(), acc.average.count as f64),
                    ("unparsed_answers".into(), acc.average.unparsed as f64),
                ];
                for (class, score) in &acc.by_class {
                    metrics.push((format!("accuracy_{}", class.name()), score.accuracy));
                }
                let scores = out
                    .rows
                    .iter()
                    .map(|r| QuestionScore {
                        question: r.pid.clone(),
                        cluster: r.pid.clone(),
                        score: f64::from(u8::from(r.correct)),
                        classes: r.classes.iter().map(|c| c.name().to_string()).collect(),
                    })
                    .collect();
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
                Ok(Evaluated { metrics, log_probs: out.first_log_probs, answers_csv: csv, scores })
            }
            EvalData::Vqa { data, questions, opts } => {
                let out = eval_vqa::evaluate(model, data, questions, opts, hook, pb)?;
                let mut metrics = vec![("questions".to_string(), out.rows.len() as f64)];
                if let Some(acc) = out.accuracy() {
                    metrics.push(("accuracy".into(), acc.accuracy));
                    metrics.push(("scored_questions".into(), acc.scored as f64));
                }
                let scores = out
                    .rows
                    .iter()
                    .zip(questions)
                    .filter_map(|(r, q)| {
                        Some(QuestionScore {
                            question: r.question_id.to_string(),
                            cluster: q.image.clone(),
                            score: r.accuracy?,
                            classes: Vec::new(),
                        })
                    })
                    .collect();
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
                Ok(Evaluated { metrics, log_probs: out.first_log_probs, answers_csv: csv, scores })
            }
        }
    }
}

/// An easy-VQA evaluation's metrics (overall and per question type), per-question scores
/// (clustered by image) and answers.
fn easy_vqa_evaluated(
    questions: &[easy_vqa::Question],
    out: eval_easy::EvalOutput,
) -> Result<Evaluated> {
    let acc = out.accuracy();
    let mut metrics = vec![("accuracy".to_string(), acc.overall)];
    let type_name = |t: &easy_vqa::QuestionType| -> Result<String> {
        match serde_json::to_value(t)? {
            serde_json::Value::String(name) => Ok(name),
            other => {
                anyhow::bail!("easy-VQA question type {t:?} serialises as {other}, not a name")
            }
        }
    };
    for (t, v) in &acc.by_type {
        metrics.push((format!("accuracy_{}", type_name(t)?), *v));
    }
    metrics.push(("questions".into(), acc.count as f64));
    let image_of: std::collections::BTreeMap<usize, u32> =
        questions.iter().map(|q| (q.index, q.image_id)).collect();
    let scores = out
        .answered
        .iter()
        .map(|a| -> Result<QuestionScore> {
            Ok(QuestionScore {
                question: a.index.to_string(),
                cluster: image_of.get(&a.index).map_or_else(String::new, u32::to_string),
                score: f64::from(u8::from(a.correct)),
                classes: vec![type_name(&a.kind)?],
            })
        })
        .collect::<Result<Vec<_>>>()?;
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
    Ok(Evaluated { metrics, log_probs: out.first_log_probs, answers_csv: csv, scores })
}
