//! VQA-style question files as LLaVA-1.5's `model_vqa_loader` reads them (VQAv2, VizWiz, ...), the
//! EvalAI answer normalization, and the VQA accuracy.
//!
//! Question file (jsonl, one object a line; blank lines skipped):
//! `{"question_id": 1 | "id", "image": "file.jpg", "text": "question", "category"?: ...}` — images
//! relative to an image folder (LLaVA's `--image-folder`). LLaVA's own files already carry the
//! short-answer suffix in `text`; see [`prompt_text`].
//!
//! Answer file (optional; public VQAv2 test-dev/VizWiz test answers are not released, so those runs
//! only produce predictions): a question id → list of human answers, in any of
//! * jsonl: one `{"question_id": ..., "answers": [...]}` a line;
//! * json: a list of such objects, the official VQA annotation file `{"annotations": [...]}`, or an
//!   object `{"<question_id>": [...]}`;
//!
//! where each answer is a string or an object with a string `answer` (the official
//! `{answer, answer_confidence, answer_id}`). Answers for ids not in the question file are ignored;
//! a question without answers is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// LLaVA-1.5's short-answer prompt (docs/Evaluation.md; the VQAv2/VizWiz question files end with
/// `"\nAnswer the question using a single word or phrase."`).
pub const SHORT_ANSWER_PROMPT: &str = "Answer the question using a single word or phrase.";

/// A question id: VQAv2 uses integers; other files may use strings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuestionId {
    Int(i64),
    Text(String),
}

impl std::fmt::Display for QuestionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuestionId::Int(i) => write!(f, "{i}"),
            QuestionId::Text(s) => write!(f, "{s}"),
        }
    }
}

impl QuestionId {
    fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::Number(n) => n.as_i64().map(QuestionId::Int),
            serde_json::Value::String(s) if !s.is_empty() => Some(QuestionId::Text(s.clone())),
            _ => None,
        }
    }

    /// A JSON object key: an integer id when it parses as one (the key of `{"<id>": [...]}`).
    fn from_key(key: &str) -> Self {
        key.parse::<i64>().map_or_else(|_| QuestionId::Text(key.to_string()), QuestionId::Int)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct VqaQuestion {
    /// 1-based line in the question file.
    pub line: usize,
    pub question_id: QuestionId,
    /// Relative to the image folder.
    pub image: String,
    pub text: String,
}

/// A question file with its image folder and, optionally, human answers.
#[derive(Clone, Debug)]
pub struct Vqa {
    pub question_file: PathBuf,
    pub image_folder: PathBuf,
    pub questions: Vec<VqaQuestion>,
    answers: Option<BTreeMap<QuestionId, Vec<String>>>,
}

impl Vqa {
    /// Loads and validates: ids unique, every image present, every question answered when an
    /// answer file is given.
    pub fn load(
        question_file: &Path,
        image_folder: &Path,
        answer_file: Option<&Path>,
    ) -> Result<Self> {
        let questions = load_questions(question_file)?;
        let mut checked = BTreeSet::new();
        for q in &questions {
            if checked.insert(q.image.as_str()) {
                let path = image_folder.join(&q.image);
                if !path.is_file() {
                    bail!(
                        "{}: question {} names image `{}`, but {} does not exist",
                        question_file.display(),
                        q.question_id,
                        q.image,
                        path.display()
                    );
                }
            }
        }
        let answers = match answer_file {
            None => None,
            Some(file) => {
                let mut all = load_answers(file)?;
                let mut mine = BTreeMap::new();
                for q in &questions {
                    let a = all.remove(&q.question_id).with_context(|| {
                        format!(
                            "{}: no answers for question {} of {}",
                            file.display(),
                            q.question_id,
                            question_file.display()
                        )
                    })?;
                    mine.insert(q.question_id.clone(), a);
                }
                Some(mine)
            }
        };
        Ok(Self {
            question_file: question_file.to_path_buf(),
            image_folder: image_folder.to_path_buf(),
            questions,
            answers,
        })
    }

    pub fn image_path(&self, question: &VqaQuestion) -> PathBuf {
        self.image_folder.join(&question.image)
    }

    /// The human answers of a question (`None` without an answer file).
    pub fn answers(&self, id: &QuestionId) -> Option<&[String]> {
        self.answers.as_ref().and_then(|a| a.get(id)).map(Vec::as_slice)
    }

    pub fn has_answers(&self) -> bool {
        self.answers.is_some()
    }
}

/// Reads a jsonl question file.
pub fn load_questions(file: &Path) -> Result<Vec<VqaQuestion>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| anyhow!("{}: line {line}: {what}", file.display());
        let v: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
        let question_id = v
            .get("question_id")
            .and_then(QuestionId::from_json)
            .ok_or_else(|| bad("no integer or string `question_id`"))?;
        let bad =
            |what: &str| anyhow!("{}: line {line}: question {question_id}: {what}", file.display());
        let image = v
            .get("image")
            .and_then(|x| x.as_str())
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| bad("no `image` file name"))?
            .to_string();
        let text = v
            .get("text")
            .and_then(|x| x.as_str())
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| bad("no non-empty `text`"))?
            .to_string();
        if !seen.insert(question_id.clone()) {
            return Err(bad("duplicate question_id"));
        }
        out.push(VqaQuestion { line, question_id, image, text });
    }
    if out.is_empty() {
        bail!("{}: no questions", file.display());
    }
    Ok(out)
}

/// Reads an answer file (see the module docs for the accepted shapes).
pub fn load_answers(file: &Path) -> Result<BTreeMap<QuestionId, Vec<String>>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let is_jsonl = file.extension().is_some_and(|e| e == "jsonl");
    let mut out = BTreeMap::new();
    let mut insert = |id: QuestionId, answers: Vec<String>, place: &str| -> Result<()> {
        if out.insert(id.clone(), answers).is_some() {
            bail!("{}: {place}: question {id} has answers twice", file.display());
        }
        Ok(())
    };
    if is_jsonl {
        for (i, raw) in text.lines().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            let place = format!("line {}", i + 1);
            let v: serde_json::Value = serde_json::from_str(raw)
                .with_context(|| format!("{}: {place}: not valid JSON", file.display()))?;
            let (id, answers) =
                answer_record(&v).with_context(|| format!("{}: {place}", file.display()))?;
            insert(id, answers, &place)?;
        }
    } else {
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", file.display()))?;
        let list = match &v {
            serde_json::Value::Array(list) => Some(list),
            serde_json::Value::Object(map) => map.get("annotations").and_then(|a| a.as_array()),
            _ => None,
        };
        match (list, &v) {
            (Some(list), _) => {
                for (i, record) in list.iter().enumerate() {
                    let place = format!("entry {i}");
                    let (id, answers) =
                        answer_record(record).with_context(|| format!("{}: {place}", file.display()))?;
                    insert(id, answers, &place)?;
                }
            }
            (None, serde_json::Value::Object(map)) => {
                for (key, answers) in map {
                    let place = format!("key {key}");
                    let answers = answer_list(answers)
                        .with_context(|| format!("{}: {place}", file.display()))?;
                    insert(QuestionId::from_key(key), answers, &place)?;
                }
            }
            _ => bail!(
                "{}: expected a list of {{question_id, answers}}, {{\"annotations\": [...]}} or {{id: answers}}",
                file.display()
            ),
        }
    }
    if out.is_empty() {
        bail!("{}: no answers", file.display());
    }
    Ok(out)
}

fn answer_record(v: &serde_json::Value) -> Result<(QuestionId, Vec<String>)> {
    let id = v
        .get("question_id")
        .and_then(QuestionId::from_json)
        .context("no integer or string `question_id`")?;
    let answers = v
        .get("answers")
        .context("no `answers`")
        .and_then(answer_list)
        .with_context(|| format!("question {id}"))?;
    Ok((id, answers))
}

fn answer_list(v: &serde_json::Value) -> Result<Vec<String>> {
    let list = v.as_array().context("`answers` is not a list")?;
    if list.is_empty() {
        bail!("`answers` is empty");
    }
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            a.as_str()
                .or_else(|| a.get("answer").and_then(|x| x.as_str()))
                .map(str::to_string)
                .with_context(|| {
                    format!("answer {i} is neither a string nor {{\"answer\": string}}")
                })
        })
        .collect()
}

/// The question text sent to the model: `text` as the file has it, with `"\n" +`
/// [`SHORT_ANSWER_PROMPT`] appended when `short_answer` is set and the text does not end with it
/// already (LLaVA's files do; `model_vqa_loader` then uses `text` verbatim).
pub fn prompt_text(text: &str, short_answer: bool) -> String {
    if short_answer && !text.trim_end().ends_with(SHORT_ANSWER_PROMPT) {
        format!("{text}\n{SHORT_ANSWER_PROMPT}")
    } else {
        text.to_string()
    }
}

// EvalAI's answer processing, as LLaVA's `llava/eval/m4c_evaluator.py` (`EvalAIAnswerProcessor`,
// copied from https://github.com/facebookresearch/mmf/blob/c46b3b3391275b4181567db80943473a89ab98ab/pythia/tasks/processors.py#L897,
// itself from the official VQA eval
// https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py)
// applies it before `scripts/convert_vqav2_for_submission.py` / `convert_vizwiz_for_submission.py`
// upload; read from LLaVA's copy at
// https://github.com/pixas/LLaVA/blob/fbd51158da0dd4528a900727050a0fdae28052f4/llava/eval/m4c_evaluator.py
// (identical to haotian-liu/LLaVA's).

const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

const NUMBER_MAP: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: [&str; 3] = ["a", "an", "the"];

const PUNCTUATIONS: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// `re.sub`'s third positional argument is `count`: upstream passes `re.UNICODE` (= 32) there, so
/// at most 32 periods are stripped.
const PERIOD_STRIP_COUNT: usize = 32;

/// `COMMA_STRIP = (?<=\d)(\,)+(?=\d)`: a run of commas between two digits.
fn has_comma_between_digits(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == ',' && i > 0 && chars[i - 1].is_ascii_digit() {
            let run = chars[i..].iter().take_while(|&&c| c == ',').count();
            if chars.get(i + run).is_some_and(char::is_ascii_digit) {
                return true;
            }
            i += run;
        } else {
            i += 1;
        }
    }
    false
}

/// `process_punctuation`: each mark is deleted when it touches a space in the input (or the input
/// has a digit,digit comma), else replaced by a space; then `PERIOD_STRIP = (?!<=\d)(\.)(?!\d)` —
/// upstream's typo makes the first group a lookahead that always holds, so it deletes every period
/// not followed by a digit (at most 32).
pub fn process_punctuation(text: &str) -> String {
    let comma = has_comma_between_digits(text);
    let mut out = text.to_string();
    for p in PUNCTUATIONS {
        let touches_space = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        let with = if touches_space || comma { "" } else { " " };
        out = out.replace(p, with);
    }
    let chars: Vec<char> = out.chars().collect();
    let mut stripped = String::with_capacity(out.len());
    let mut removed = 0;
    for (i, &c) in chars.iter().enumerate() {
        let next_is_digit = chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if c == '.' && !next_is_digit && removed < PERIOD_STRIP_COUNT {
            removed += 1;
        } else {
            stripped.push(c);
        }
    }
    stripped
}

/// `process_digit_article`: lower-case, split on whitespace, number words → digits, articles
/// dropped, contractions restored, joined by single spaces.
pub fn process_digit_article(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split_whitespace()
        .map(|w| NUMBER_MAP.iter().find(|(k, _)| *k == w).map_or(w, |(_, v)| *v))
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| CONTRACTIONS.iter().find(|(k, _)| *k == w).map_or(w, |(_, v)| *v))
        .collect();
    words.join(" ")
}

/// `EvalAIAnswerProcessor.__call__`: `word_tokenize` (lower-case; drop `,` and `?`; `'s` → ` 's`),
/// newlines and tabs to spaces, then [`process_punctuation`] and [`process_digit_article`].
/// Digits are ASCII here (Python's `\d` also matches other Unicode decimal digits).
pub fn normalize_answer(answer: &str) -> String {
    let word = answer.to_lowercase().replace([',', '?'], "").replace("'s", " 's");
    let item = word.trim().replace(['\n', '\t'], " ");
    let item = process_punctuation(item.trim());
    process_digit_article(&item)
}

/// The VQA accuracy of one prediction, in [0, 1]: prediction and human answers normalized with
/// [`normalize_answer`], then `min(1, #matching others / 3)` averaged over the leave-one-out subsets
/// of the human answers — for VQAv2/VizWiz's 10 answers, the 10-choose-9 average of EvalAI's
/// `vqaEval.py` and LLaVA's `TextVQAAccuracyEvaluator._compute_answer_scores`. With a single human
/// answer there is no leave-one-out subset: the score is exact match (1 or 0); with none it is 0.
///
/// EvalAI's server skips normalization when all answers agree; since it receives predictions
/// already normalized by LLaVA's submission scripts, the two differ only for unnormalized
/// annotations.
pub fn vqa_accuracy(prediction: &str, answers: &[String]) -> f64 {
    let pred = normalize_answer(prediction);
    let gts: Vec<String> = answers.iter().map(|a| normalize_answer(a)).collect();
    match gts.len() {
        0 => 0.0,
        1 => f64::from(u8::from(gts[0] == pred)),
        n => {
            let matching = gts.iter().filter(|g| **g == pred).count();
            let total: f64 = gts
                .iter()
                .map(|g| {
                    let others = matching - usize::from(*g == pred);
                    (others as f64 / 3.0).min(1.0)
                })
                .sum();
            total / n as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scienceqa::tests::temp_dir;
    use serde_json::json;

    fn s(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn normalization_follows_evalai() {
        let cases = [
            ("Yes", "yes"),
            ("yes.", "yes"),
            ("Two", "2"),
            ("none", "0"),
            ("The dog", "dog"),
            ("a red apple", "red apple"),
            ("an", ""),
            ("dont", "don't"),
            ("isnt it?", "isn't it"),
            ("Dog's bowl", "dog 's bowl"),
            ("1,000", "1000"),
            ("2.5", "2.5"),
            ("t-shirt", "t shirt"),
            ("black - white", "black white"),
            ("yes!", "yes"),
            ("red/white", "red white"),
            ("(left)", "left"),
            ("  multiple   spaces\tand\ttabs \n", "multiple spaces and tabs"),
            ("The poster shows a 10% discount.", "poster shows 10% discount"),
            ("Im here", "im here"),
            ("somebody'd", "somebodyd"),
            ("youve", "you've"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_answer(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn punctuation_rules_keep_upstream_quirks() {
        // A mark next to a space is deleted everywhere, otherwise replaced by a space.
        assert_eq!(process_punctuation("a -b c-d"), "a b cd");
        assert_eq!(process_punctuation("c-d"), "c d");
        // A digit,digit comma anywhere deletes every mark.
        assert_eq!(process_punctuation("1,2 c-d"), "12 cd");
        assert!(has_comma_between_digits("9,,,9") && !has_comma_between_digits("9, 9"));
        // Periods before a digit stay; at most 32 are stripped.
        assert_eq!(process_punctuation("..5"), ".5");
        let many = ".".repeat(40);
        assert_eq!(process_punctuation(&many), ".".repeat(8));
        assert_eq!(CONTRACTIONS.len(), 120);
    }

    #[test]
    fn vqa_accuracy_is_the_leave_one_out_average() {
        let ten = |k: usize, other: &str| {
            let mut v = vec!["2".to_string(); k];
            v.resize(10, other.to_string());
            v
        };
        // ≥4 matches: every subset has ≥3 → 1.
        assert_eq!(vqa_accuracy("two", &ten(4, "3")), 1.0);
        // 3 matches: 7 subsets keep 3 (1.0), 3 subsets keep 2 (2/3) → 0.9.
        assert!((vqa_accuracy("2", &ten(3, "3")) - 0.9).abs() < 1e-12);
        // 2 matches: 8 subsets × 2/3 + 2 × 1/3 → 0.6.
        assert!((vqa_accuracy("2", &ten(2, "3")) - 0.6).abs() < 1e-12);
        // 1 match: 9 × 1/3 / 10 → 0.3.
        assert!((vqa_accuracy("2", &ten(1, "3")) - 0.3).abs() < 1e-12);
        assert_eq!(vqa_accuracy("4", &ten(1, "3")), 0.0);
        // Normalization applies to both sides.
        assert_eq!(vqa_accuracy("The Dog.", &s(&["dog", "dog", "a dog", "Dog"])), 1.0);
        // One answer: exact match; none: 0.
        assert_eq!(vqa_accuracy("Yes", &s(&["yes"])), 1.0);
        assert_eq!(vqa_accuracy("no", &s(&["yes"])), 0.0);
        assert_eq!(vqa_accuracy("no", &[]), 0.0);
    }

    #[test]
    fn prompt_suffix_is_added_once() {
        assert_eq!(
            prompt_text("What color is the bus?", true),
            "What color is the bus?\nAnswer the question using a single word or phrase."
        );
        let llava = "What color is the bus?\nAnswer the question using a single word or phrase.";
        assert_eq!(prompt_text(llava, true), llava);
        assert_eq!(prompt_text("What?", false), "What?");
    }

    #[test]
    fn loads_questions_and_answers() {
        let dir = temp_dir("vqa-load");
        std::fs::create_dir_all(dir.join("img")).expect("mkdir");
        std::fs::write(dir.join("img/a.jpg"), b"jpg").expect("write");
        let qfile = dir.join("q.jsonl");
        std::fs::write(
            &qfile,
            format!(
                "{}\n\n{}\n",
                json!({"question_id": 1, "image": "a.jpg", "text": "What?", "category": "default"}),
                json!({"question_id": "x2", "image": "a.jpg", "text": "Why?"})
            ),
        )
        .expect("write");
        let shapes = [
            (
                "a.jsonl",
                format!(
                    "{}\n{}\n{}\n",
                    json!({"question_id": 1, "answers": ["yes", "no"]}),
                    json!({"question_id": "x2", "answers": [{"answer": "because"}]}),
                    json!({"question_id": 99, "answers": ["unused"]})
                ),
            ),
            (
                "b.json",
                json!([{"question_id": 1, "answers": ["yes", "no"]},
                       {"question_id": "x2", "answers": ["because"]}])
                .to_string(),
            ),
            (
                "c.json",
                json!({"annotations": [
                    {"question_id": 1, "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1},
                                                   {"answer": "no", "answer_id": 2}]},
                    {"question_id": "x2", "answers": [{"answer": "because"}]}]})
                .to_string(),
            ),
            ("d.json", json!({"1": ["yes", "no"], "x2": ["because"]}).to_string()),
        ];
        for (name, content) in shapes {
            let afile = dir.join(name);
            std::fs::write(&afile, content).expect("write");
            let data = Vqa::load(&qfile, &dir.join("img"), Some(&afile)).expect(name);
            assert_eq!(data.questions.len(), 2);
            assert_eq!(data.questions[1].line, 3);
            assert_eq!(data.questions[1].question_id, QuestionId::Text("x2".into()));
            assert_eq!(data.answers(&QuestionId::Int(1)), Some(&s(&["yes", "no"])[..]), "{name}");
            assert_eq!(data.answers(&QuestionId::Text("x2".into())), Some(&s(&["because"])[..]));
            assert_eq!(data.image_path(&data.questions[0]), dir.join("img/a.jpg"));
        }
        let data = Vqa::load(&qfile, &dir.join("img"), None).expect("no answers");
        assert!(!data.has_answers() && data.answers(&QuestionId::Int(1)).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_files_name_the_file_and_question() {
        let dir = temp_dir("vqa-bad");
        std::fs::create_dir_all(dir.join("img")).expect("mkdir");
        std::fs::write(dir.join("img/a.jpg"), b"jpg").expect("write");
        let qfile = dir.join("q.jsonl");
        let q = |v: serde_json::Value| v.to_string();
        let cases = [
            (
                q(json!({"image": "a.jpg", "text": "t"})),
                "q.jsonl: line 1: no integer or string `question_id`",
            ),
            (q(json!({"question_id": 5, "text": "t"})), "line 1: question 5: no `image`"),
            (
                q(json!({"question_id": 5, "image": "a.jpg", "text": ""})),
                "question 5: no non-empty `text`",
            ),
            (
                q(json!({"question_id": 5, "image": "b.jpg", "text": "t"})),
                "question 5 names image `b.jpg`",
            ),
            ("{oops".to_string(), "line 1: not valid JSON"),
            (
                format!(
                    "{}\n{}",
                    q(json!({"question_id": 5, "image": "a.jpg", "text": "t"})),
                    q(json!({"question_id": 5, "image": "a.jpg", "text": "u"}))
                ),
                "line 2: question 5: duplicate question_id",
            ),
            (String::new(), "no questions"),
        ];
        for (content, want) in cases {
            std::fs::write(&qfile, content).expect("write");
            let err = format!("{:#}", Vqa::load(&qfile, &dir.join("img"), None).expect_err(want));
            assert!(err.contains("q.jsonl") && err.contains(want), "{err}");
        }
        std::fs::write(&qfile, q(json!({"question_id": 5, "image": "a.jpg", "text": "t"})))
            .expect("write");
        let afile = dir.join("a.jsonl");
        let cases = [
            (q(json!({"question_id": 6, "answers": ["x"]})), "no answers for question 5"),
            (q(json!({"question_id": 5, "answers": []})), "line 1: question 5: `answers` is empty"),
            (q(json!({"question_id": 5, "answers": [3]})), "question 5: answer 0 is neither"),
            (q(json!({"question_id": 5})), "line 1: question 5: no `answers`"),
            (
                format!(
                    "{}\n{}",
                    q(json!({"question_id": 5, "answers": ["x"]})),
                    q(json!({"question_id": 5, "answers": ["y"]}))
                ),
                "line 2: question 5 has answers twice",
            ),
        ];
        for (content, want) in cases {
            std::fs::write(&afile, content).expect("write");
            let err =
                format!("{:#}", Vqa::load(&qfile, &dir.join("img"), Some(&afile)).expect_err(want));
            assert!(err.contains("a.jsonl") && err.contains(want), "{err}");
        }
        let jfile = dir.join("a.json");
        std::fs::write(&jfile, "3").expect("write");
        let err =
            format!("{:#}", Vqa::load(&qfile, &dir.join("img"), Some(&jfile)).expect_err("shape"));
        assert!(err.contains("a.json: expected a list"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
