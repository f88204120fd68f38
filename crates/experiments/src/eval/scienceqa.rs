//! ScienceQA evaluation: batched greedy decoding over a [`LlavaBundle`] (questions with or without
//! an image), the two pinned answer scorers, and per-class accuracy as Q-VLM's Table 2 reports it.
//!
//! Scorers (no random fallback: an answer without a valid option letter is wrong and counted in
//! `unparsed`):
//! * [`Scorer::AnswerTag`] — Q-VLM's `llava/eval/eval_science_qa.py` for QCM-LEPA outputs: regex
//!   `ANSWER: ([A-Z]).` must match exactly once
//!   (<https://github.com/ChangyuanWang17/QVLM/blob/4faa7f77d6ca477a3dc169716362e7c6e1757793/llava/eval/eval_science_qa.py#L68-L74>;
//!   upstream then picks a random option for a failed parse, L28-L35, which is dropped here).
//! * [`Scorer::Letter`] — LLaVA's `eval_science_qa.py` at 5200b75 for CQM-A outputs: a bare letter,
//!   `"X. "` at the start, or `"The answer is X."` / `"The answer is X"`; unparsable → wrong (−1)
//!   (<https://github.com/haotian-liu/LLaVA/blob/5200b75638cb74e359644359356c2afbb8ce4bca/llava/eval/eval_science_qa.py#L28-L64>,
//!   L95-L129). The older LLaVA scorer (regex "The answer is X." with a random fallback,
//!   8959d5c) is not reproduced.
//!
//! Classes (Q-VLM's scorer, L97-L146): NAT / SOC / LAN by subject; TXT = non-empty hint, IMG = has
//! an image, NO = neither (TXT and IMG overlap); G1-6 / G7-12 by grade. LLaVA-1.5's
//! "IMG-Accuracy" (questions whose prompt has `<image>`) is the IMG class.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use qvlm_core::hook::LinearHook;
use qvlm_core::io::image::{AspectMode, ImageProcessor, ImageProcessorConfig};
use qvlm_core::io::prompt::Template;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::scienceqa::{Problem, ScienceQa, Subject, OPTIONS};
use crate::eval::generate::{first_token_agreement, generate_on, Request};
use crate::prompt::scienceqa::{user_message, PromptFormat, SqaItem};
use crate::vlm::Vlm;

/// Which upstream scorer parses the generated text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scorer {
    /// `ANSWER: X.` exactly once (Q-VLM, QCM-LEPA).
    AnswerTag,
    /// A bare letter, `X. `, or `The answer is X` (LLaVA 5200b75, CQM-A).
    Letter,
}

impl Scorer {
    /// The scorer the format's protocol uses.
    pub fn for_format(format: PromptFormat) -> Self {
        match format {
            PromptFormat::QcmLepa => Scorer::AnswerTag,
            PromptFormat::CqmA => Scorer::Letter,
        }
    }

    /// The option letter the text names, if it names one (not yet checked against the choices).
    pub fn parse(self, text: &str) -> Option<char> {
        match self {
            Scorer::AnswerTag => answer_tag_letter(text),
            Scorer::Letter => llava_letter(text),
        }
    }
}

/// `re.compile(r'ANSWER: ([A-Z]).').findall(text)` with exactly one match. The trailing `.` is
/// any character but a newline, and matches do not overlap.
pub fn answer_tag_letter(text: &str) -> Option<char> {
    const TAG: &[char] = &['A', 'N', 'S', 'W', 'E', 'R', ':', ' '];
    let chars: Vec<char> = text.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i + TAG.len() + 2 <= chars.len() {
        let letter = chars[i + TAG.len()];
        let any = chars[i + TAG.len() + 1];
        if chars[i..i + TAG.len()] == *TAG && letter.is_ascii_uppercase() && any != '\n' {
            found.push(letter);
            i += TAG.len() + 2;
        } else {
            i += 1;
        }
    }
    match found.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// The first `"The answer is X"` with X in A–E, followed by `"."` when `with_period`.
fn the_answer_is(text: &str, with_period: bool) -> Option<char> {
    const PHRASE: &str = "The answer is ";
    text.match_indices(PHRASE).find_map(|(at, _)| {
        let mut rest = text[at + PHRASE.len()..].chars();
        let letter = rest.next().filter(|c| OPTIONS.contains(c))?;
        (!with_period || rest.next() == Some('.')).then_some(letter)
    })
}

/// LLaVA 5200b75's answer extraction (`__main__`, L101-L127): newlines become `". "`; then a bare
/// letter (after stripping), `"X. "` at the very start, or the first `"The answer is X."`, else the
/// first `"The answer is X"`.
pub fn llava_letter(text: &str) -> Option<char> {
    let text = text.replace('\n', ". ");
    let stripped = text.trim();
    let mut chars = stripped.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        if OPTIONS.contains(&c) {
            return Some(c);
        }
    }
    let mut chars = text.chars();
    if let (Some(c), Some('.'), Some(' ')) = (chars.next(), chars.next(), chars.next()) {
        if OPTIONS.contains(&c) {
            return Some(c);
        }
    }
    if text.contains("The answer is ") {
        return the_answer_is(&text, true).or_else(|| the_answer_is(&text, false));
    }
    None
}

/// A question's classes in Q-VLM's per-class table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SqaClass {
    #[serde(rename = "NAT")]
    Nat,
    #[serde(rename = "SOC")]
    Soc,
    #[serde(rename = "LAN")]
    Lan,
    #[serde(rename = "TXT")]
    Txt,
    #[serde(rename = "IMG")]
    Img,
    #[serde(rename = "NO")]
    No,
    #[serde(rename = "G1-6")]
    G1To6,
    #[serde(rename = "G7-12")]
    G7To12,
}

impl SqaClass {
    pub const ALL: [SqaClass; 8] = [
        SqaClass::Nat,
        SqaClass::Soc,
        SqaClass::Lan,
        SqaClass::Txt,
        SqaClass::Img,
        SqaClass::No,
        SqaClass::G1To6,
        SqaClass::G7To12,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SqaClass::Nat => "NAT",
            SqaClass::Soc => "SOC",
            SqaClass::Lan => "LAN",
            SqaClass::Txt => "TXT",
            SqaClass::Img => "IMG",
            SqaClass::No => "NO",
            SqaClass::G1To6 => "G1-6",
            SqaClass::G7To12 => "G7-12",
        }
    }

    /// The classes of a problem: one subject, TXT and/or IMG or else NO, one grade band.
    pub fn of(problem: &Problem) -> Vec<SqaClass> {
        let mut classes = vec![match problem.subject {
            Subject::Natural => SqaClass::Nat,
            Subject::Social => SqaClass::Soc,
            Subject::Language => SqaClass::Lan,
        }];
        // Upstream: `len(hint) != 0` (not stripped) and `image != None`.
        let (txt, img) = (!problem.hint.is_empty(), problem.image.is_some());
        if txt {
            classes.push(SqaClass::Txt);
        }
        if img {
            classes.push(SqaClass::Img);
        }
        if !txt && !img {
            classes.push(SqaClass::No);
        }
        classes.push(if problem.grade <= 6 { SqaClass::G1To6 } else { SqaClass::G7To12 });
        classes
    }
}

/// One scored question.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SqaRow {
    pub pid: String,
    /// The generated text.
    pub prediction: String,
    /// The letter the scorer found, if any.
    pub parsed: Option<char>,
    /// The chosen option: the parsed letter when it is one of the problem's choices.
    pub predicted: Option<usize>,
    pub answer: usize,
    pub correct: bool,
    pub classes: Vec<SqaClass>,
}

impl SqaRow {
    /// No valid option: nothing parsed, or a letter beyond the choices.
    pub fn unparsed(&self) -> bool {
        self.predicted.is_none()
    }
}

/// Scores one generated text against its problem (pure).
pub fn score(scorer: Scorer, prediction: &str, problem: &Problem) -> SqaRow {
    let parsed = scorer.parse(prediction);
    let predicted = parsed
        .and_then(|c| OPTIONS.iter().position(|&o| o == c))
        .filter(|&i| i < problem.choices.len());
    SqaRow {
        pid: problem.pid.clone(),
        prediction: prediction.to_string(),
        parsed,
        predicted,
        answer: problem.answer,
        correct: predicted == Some(problem.answer),
        classes: SqaClass::of(problem),
    }
}

/// Counts and accuracy (%) of a set of rows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClassScore {
    pub count: usize,
    pub correct: usize,
    pub unparsed: usize,
    pub accuracy: f64,
}

impl ClassScore {
    fn of<'a>(rows: impl Iterator<Item = &'a SqaRow>) -> Self {
        let mut s = ClassScore::default();
        for r in rows {
            s.count += 1;
            s.correct += usize::from(r.correct);
            s.unparsed += usize::from(r.unparsed());
        }
        s.accuracy = if s.count == 0 { 0.0 } else { 100.0 * s.correct as f64 / s.count as f64 };
        s
    }
}

/// Average and per-class accuracy; classes without questions are absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SqaAccuracy {
    pub average: ClassScore,
    pub by_class: BTreeMap<SqaClass, ClassScore>,
}

impl SqaAccuracy {
    /// LLaVA-1.5's IMG-Accuracy (the metric of the CQM-A protocol).
    pub fn img_accuracy(&self) -> Option<f64> {
        self.by_class.get(&SqaClass::Img).map(|s| s.accuracy)
    }
}

pub fn accuracy(rows: &[SqaRow]) -> SqaAccuracy {
    let mut by_class = BTreeMap::new();
    for class in SqaClass::ALL {
        let score = ClassScore::of(rows.iter().filter(|r| r.classes.contains(&class)));
        if score.count > 0 {
            by_class.insert(class, score);
        }
    }
    SqaAccuracy { average: ClassScore::of(rows.iter()), by_class }
}

/// How ScienceQA is asked and scored.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SqaEvalOptions {
    pub format: PromptFormat,
    pub template: Template,
    pub scorer: Scorer,
    pub batch_size: usize,
    /// Q-VLM and LLaVA generate up to 1024 new tokens (QCM-LEPA writes lecture and solution).
    pub max_new_tokens: usize,
    /// Overrides the checkpoint's `image_aspect_ratio`: `model_vqa_science` calls
    /// `image_processor.preprocess` directly, i.e. resize + center crop even for LLaVA-1.5
    /// (Q-VLM's copy; `None` keeps the bundle's processor).
    pub aspect: Option<AspectMode>,
}

impl SqaEvalOptions {
    /// The protocol of a format: QCM-LEPA → `llava_v1` + `ANSWER:` scorer (Q-VLM's LLaVA-v1.3
    /// runs); CQM-A → `vicuna_v1` + letter scorer (LLaVA-1.5's `sqa.sh`). Greedy decoding either
    /// way (upstream samples at T = 0.2 for QCM-LEPA).
    pub fn for_format(format: PromptFormat) -> Self {
        Self {
            format,
            template: match format {
                PromptFormat::QcmLepa => Template::LlavaV1,
                PromptFormat::CqmA => Template::VicunaV1,
            },
            scorer: Scorer::for_format(format),
            batch_size: 8,
            max_new_tokens: 1024,
            aspect: Some(AspectMode::Crop),
        }
    }
}

#[derive(Debug)]
pub struct SqaEvalOutput {
    pub rows: Vec<SqaRow>,
    /// `[N, vocab]` f32 log-probabilities of the first generated token (CPU).
    pub first_log_probs: Tensor,
}

impl SqaEvalOutput {
    pub fn accuracy(&self) -> SqaAccuracy {
        accuracy(&self.rows)
    }

    /// Mean KL(reference ‖ self) of the first-token distributions and the top-1 agreement (%).
    pub fn agreement_with(&self, reference: &SqaEvalOutput) -> (f64, f64) {
        first_token_agreement(&reference.first_log_probs, &self.first_log_probs)
    }
}

/// Answers `items` (questions of `data`) greedily and scores them; `hook` sees every linear input.
/// On Qwen2-VL the question is asked in the checkpoint's chat template and the image goes
/// through its own processor at its own resolution (`template` and `aspect` are LLaVA's).
pub fn evaluate(
    model: &Vlm,
    data: &ScienceQa,
    items: &[SqaItem],
    opts: &SqaEvalOptions,
    hook: &mut dyn LinearHook,
    progress: &ProgressBar,
) -> Result<SqaEvalOutput> {
    let problems = items
        .iter()
        .map(|item| {
            data.problem(&item.pid).with_context(|| {
                format!("question {} is not in the loaded `{}` split", item.pid, data.split.name())
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let im_start_end = match model {
        Vlm::Llava(bundle) => bundle.model.cfg.use_im_start_end,
        Vlm::Qwen2Vl(_) => false,
    };
    let single_pred = opts.format.single_pred();
    let requests: Vec<Request> = items
        .iter()
        .map(|item| Request {
            message: user_message(item, single_pred, im_start_end),
            image: item.image.clone(),
        })
        .collect();
    let images = match (model, opts.aspect) {
        (Vlm::Llava(bundle), Some(aspect)) => {
            Some(ImageProcessor::new(ImageProcessorConfig { aspect, ..bundle.images.cfg.clone() }))
        }
        _ => None,
    };
    let gen = generate_on(
        model,
        &requests,
        opts.template,
        images.as_ref(),
        opts.batch_size,
        opts.max_new_tokens,
        hook,
        progress,
    )?;
    let rows =
        problems.iter().zip(&gen.texts).map(|(p, text)| score(opts.scorer, text, p)).collect();
    Ok(SqaEvalOutput { rows, first_log_probs: gen.first_log_probs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scienceqa::tests::{magnet_problem, temp_dir};
    use crate::data::scienceqa::{ImageLayout, Split};
    use crate::eval::generate::tests::{assert_same_first_tokens, easy_vqa_image, tiny_bundle};
    use crate::prompt::scienceqa::items;
    use qvlm_core::hook::NoHook;
    use serde_json::json;

    /// Image and text-only questions in one batch: a text-only row has no image slot, and batching
    /// does not change any row.
    #[test]
    fn tiny_model_answers_questions_with_and_without_images() {
        let bundle = tiny_bundle();
        let vocab_size = bundle.model.cfg.text.vocab_size;
        let model = crate::vlm::Vlm::Llava(bundle);
        let dir = temp_dir("sqa-tiny");
        let mut problems = serde_json::Map::new();
        let pids = ["10", "11", "12"];
        for (i, pid) in pids.iter().enumerate() {
            let image = (i != 1).then_some("image.png");
            problems.insert(
                pid.to_string(),
                json!({"question": "what shape is in the image?", "choices": ["circle", "triangle"],
                       "answer": 0, "hint": "", "image": image, "subject": "natural science",
                       "grade": "grade2", "lecture": "", "solution": "", "split": "test"}),
            );
            if image.is_some() {
                let d = dir.join("images/test").join(pid);
                std::fs::create_dir_all(&d).expect("mkdir");
                std::fs::copy(easy_vqa_image(i as u32), d.join("image.png")).expect("copy");
            }
        }
        std::fs::write(dir.join("problems.json"), serde_json::Value::Object(problems).to_string())
            .expect("write");
        std::fs::write(dir.join("pid_splits.json"), json!({"test": pids}).to_string())
            .expect("write");
        let data = ScienceQa::load(&dir, Split::Test, ImageLayout::official(&dir)).expect("load");
        let pb = ProgressBar::hidden();
        for format in [PromptFormat::QcmLepa, PromptFormat::CqmA] {
            let questions = items(&data, format);
            assert_eq!(questions[1].image, None);
            let opts = SqaEvalOptions {
                template: crate::tiny::train::TEMPLATE,
                batch_size: 3,
                max_new_tokens: 4,
                ..SqaEvalOptions::for_format(format)
            };
            let out = evaluate(&model, &data, &questions, &opts, &mut NoHook, &pb).expect("eval");
            assert_eq!(out.rows.len(), 3);
            assert_eq!(out.rows[1].classes, vec![SqaClass::Nat, SqaClass::No, SqaClass::G1To6]);
            let vocab = vocab_size;
            assert_eq!(out.first_log_probs.size(), vec![3, vocab]);
            // The tiny model answers in easy-VQA words, never an option letter: every row is
            // unparsed and wrong (no random fallback).
            let acc = out.accuracy();
            assert_eq!((acc.average.count, acc.average.unparsed, acc.average.correct), (3, 3, 0));
            let single = SqaEvalOptions { batch_size: 1, ..opts };
            let one = evaluate(&model, &data, &questions, &single, &mut NoHook, &pb).expect("eval");
            assert_same_first_tokens(&out.first_log_probs, &one.first_log_probs);
            assert_eq!(out.rows, one.rows);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn answer_tag_needs_exactly_one_match() {
        assert_eq!(answer_tag_letter("LECTURE: x\nSOLUTION: y\n###\nANSWER: B."), Some('B'));
        assert_eq!(answer_tag_letter("ANSWER: C!"), Some('C'));
        // The regex's trailing `.` needs one more character (not a newline).
        assert_eq!(answer_tag_letter("ANSWER: B"), None);
        assert_eq!(answer_tag_letter("ANSWER: B\nmore"), None);
        assert_eq!(answer_tag_letter("ANSWER: b."), None);
        assert_eq!(answer_tag_letter("ANSWER: A. ANSWER: B."), None);
        assert_eq!(answer_tag_letter("The answer is A."), None);
        // Matches do not overlap: the second tag's "A" is eaten by the first match.
        assert_eq!(answer_tag_letter("ANSWER: AANSWER: B."), Some('A'));
        assert_eq!(answer_tag_letter(""), None);
    }

    #[test]
    fn llava_letter_forms() {
        assert_eq!(llava_letter("B"), Some('B'));
        assert_eq!(llava_letter("  C  "), Some('C'));
        // "C\n" becomes "C. ", the letter-period-space form; "C \n" becomes "C . ", neither.
        assert_eq!(llava_letter("C\n"), Some('C'));
        assert_eq!(llava_letter("C \n"), None);
        assert_eq!(llava_letter("A. repel"), Some('A'));
        assert_eq!(llava_letter("A\nrepel"), Some('A'));
        assert_eq!(llava_letter("I think so. The answer is D."), Some('D'));
        assert_eq!(llava_letter("The answer is E"), Some('E'));
        // The first "The answer is X." wins over an earlier one without the period.
        assert_eq!(llava_letter("The answer is A, no: The answer is B."), Some('B'));
        // Not matched by 5200b75's rules.
        assert_eq!(llava_letter("A."), None);
        assert_eq!(llava_letter("(A)"), None);
        assert_eq!(llava_letter("F"), None);
        assert_eq!(llava_letter("b"), None);
        assert_eq!(llava_letter("The answer is F."), None);
        assert_eq!(llava_letter("attract"), None);
    }

    #[test]
    fn scoring_counts_unparsable_as_wrong() {
        let p = magnet_problem(); // answer B of two choices
        let right = score(Scorer::Letter, "B", &p);
        assert!(right.correct && !right.unparsed());
        let wrong = score(Scorer::Letter, "A", &p);
        assert!(!wrong.correct && !wrong.unparsed());
        let none = score(Scorer::Letter, "attract", &p);
        assert_eq!((none.parsed, none.predicted, none.correct), (None, None, false));
        // A letter beyond the choices is parsed but is no option.
        let beyond = score(Scorer::Letter, "C", &p);
        assert_eq!((beyond.parsed, beyond.predicted), (Some('C'), None));
        assert!(beyond.unparsed() && !beyond.correct);
        let tag = score(Scorer::AnswerTag, "SOLUTION: ...\n###\nANSWER: B.", &p);
        assert!(tag.correct);
        assert!(score(Scorer::AnswerTag, "B", &p).unparsed());
    }

    fn problem(pid: &str, subject: Subject, hint: &str, image: bool, grade: u8) -> Problem {
        Problem {
            pid: pid.into(),
            subject,
            hint: hint.into(),
            image: image.then(|| "image.png".to_string()),
            grade,
            split: Split::Test,
            ..magnet_problem()
        }
    }

    #[test]
    fn classes_overlap_like_the_reference() {
        use SqaClass::*;
        let both = problem("1", Subject::Natural, "hint", true, 3);
        assert_eq!(SqaClass::of(&both), vec![Nat, Txt, Img, G1To6]);
        let neither = problem("2", Subject::Language, "", false, 7);
        assert_eq!(SqaClass::of(&neither), vec![Lan, No, G7To12]);
        // A whitespace-only hint still counts as text (`len(hint) != 0`).
        let blank = problem("3", Subject::Social, " ", false, 12);
        assert_eq!(SqaClass::of(&blank), vec![Soc, Txt, G7To12]);
        let img = problem("4", Subject::Social, "", true, 6);
        assert_eq!(SqaClass::of(&img), vec![Soc, Img, G1To6]);
    }

    #[test]
    fn per_class_accuracy() {
        let rows = vec![
            score(Scorer::Letter, "B", &problem("1", Subject::Natural, "h", true, 3)),
            score(Scorer::Letter, "A", &problem("2", Subject::Natural, "", true, 8)),
            score(Scorer::Letter, "B", &problem("3", Subject::Language, "", false, 8)),
            score(Scorer::Letter, "??", &problem("4", Subject::Natural, "h", false, 1)),
        ];
        let acc = accuracy(&rows);
        assert_eq!(acc.average, ClassScore { count: 4, correct: 2, unparsed: 1, accuracy: 50.0 });
        let get = |c: SqaClass| acc.by_class.get(&c).cloned().unwrap_or_default();
        assert_eq!(get(SqaClass::Nat).count, 3);
        assert!((get(SqaClass::Nat).accuracy - 100.0 / 3.0).abs() < 1e-12);
        assert_eq!(get(SqaClass::Lan).accuracy, 100.0);
        assert!(!acc.by_class.contains_key(&SqaClass::Soc));
        // TXT and IMG overlap on question 1.
        assert_eq!(
            get(SqaClass::Txt),
            ClassScore { count: 2, correct: 1, unparsed: 1, accuracy: 50.0 }
        );
        assert_eq!(
            get(SqaClass::Img),
            ClassScore { count: 2, correct: 1, unparsed: 0, accuracy: 50.0 }
        );
        assert_eq!(acc.img_accuracy(), Some(50.0));
        assert_eq!(get(SqaClass::No).count, 1);
        assert_eq!(get(SqaClass::G1To6).count, 2);
        assert_eq!(get(SqaClass::G7To12).count, 2);
        let sum: usize =
            [SqaClass::Txt, SqaClass::Img, SqaClass::No].iter().map(|&c| get(c).count).sum();
        assert!(sum > rows.len(), "context classes overlap");
    }
}
