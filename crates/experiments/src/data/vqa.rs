//! VQA-style question files as LLaVA-1.5's `model_vqa_loader` reads them (VQAv2, VizWiz, ...).
//!
//! Question file (jsonl, one object a line; blank lines skipped):
//! `{"question_id": 1 | "id", "image": "file.jpg", "text": "question", "category"?: ...}` — images
//! relative to an image folder (LLaVA's `--image-folder`). LLaVA's own files already carry the
//! short-answer suffix in `text`; see [`crate::prompt::vqa::prompt_text`].
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scienceqa::tests::temp_dir;
    use serde_json::json;

    fn s(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|x| x.to_string()).collect()
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
