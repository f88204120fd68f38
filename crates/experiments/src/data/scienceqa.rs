//! ScienceQA (Lu et al., NeurIPS 2022) in its official layout, and the two LLaVA prompt formats
//! Q-VLM's tables use.
//!
//! Files read (the official download, <https://github.com/lupantech/ScienceQA>):
//! * `<root>/problems.json`: an object pid → `{question, choices[], answer (index), hint, image
//!   (file name or null), subject, grade ("grade1".."grade12"), lecture, solution, split, ...}`
//!   (other fields are ignored);
//! * `<root>/pid_splits.json`: `{"train": [pid, ...], "val": [...], "test": [...], "trainval",
//!   "minitrain", "minival", "minitest"}`;
//! * images as [`ImageLayout`] says: by default `<root>/images/<problem split>/<pid>/<image>`.
//!
//! LLaVA's converted question files (`llava_test_QCM-LEPA.json`, `llava_test_CQM-A.json`: a list of
//! `{id, image?, conversations: [{from: "human", value}, {from: "gpt", value}]}`) are read by
//! [`load_llava_questions`]; scoring still needs `problems.json` (subjects, grades, answers), so they
//! are joined onto a loaded split with [`ScienceQa::items_from_llava`].
//!
//! Only the problems of the requested split are validated; a malformed one is an error naming the
//! file and the pid.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The option letters of LLaVA's conversion and scorers (`options=["A", "B", "C", "D", "E"]`).
pub const OPTIONS: [char; 5] = ['A', 'B', 'C', 'D', 'E'];

/// The keys of `pid_splits.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Val,
    Test,
    Trainval,
    Minitrain,
    Minival,
    Minitest,
}

impl Split {
    pub const ALL: [Split; 7] = [
        Split::Train,
        Split::Val,
        Split::Test,
        Split::Trainval,
        Split::Minitrain,
        Split::Minival,
        Split::Minitest,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::Trainval => "trainval",
            Split::Minitrain => "minitrain",
            Split::Minival => "minival",
            Split::Minitest => "minitest",
        }
    }

    /// The split a problem itself belongs to (its `split` field): train, val or test.
    fn is_base(self) -> bool {
        matches!(self, Split::Train | Split::Val | Split::Test)
    }
}

impl std::str::FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Split::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            anyhow!("unknown ScienceQA split `{s}` (train, val, test, trainval, minitrain, minival, minitest)")
        })
    }
}

/// A problem's `subject`; the scorer's NAT / SOC / LAN classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Natural,
    Social,
    Language,
}

impl Subject {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "natural science" => Some(Subject::Natural),
            "social science" => Some(Subject::Social),
            "language science" => Some(Subject::Language),
            _ => None,
        }
    }
}

/// One validated ScienceQA problem.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Problem {
    pub pid: String,
    pub question: String,
    pub choices: Vec<String>,
    /// Index into `choices`.
    pub answer: usize,
    /// Text context (may be empty).
    pub hint: String,
    /// Image file name inside the problem's folder (`image.png`), if any.
    pub image: Option<String>,
    pub subject: Subject,
    /// 1..=12.
    pub grade: u8,
    pub lecture: String,
    pub solution: String,
    /// The problem's own split (train, val or test): its images live there.
    pub split: Split,
}

impl Problem {
    /// The letter of the right option (`?` only for a problem built by hand with a bad index).
    pub fn answer_letter(&self) -> char {
        OPTIONS.get(self.answer).copied().unwrap_or('?')
    }
}

/// The raw `problems.json` entry (other fields are ignored).
#[derive(Deserialize)]
struct RawProblem {
    question: String,
    choices: Vec<String>,
    answer: usize,
    hint: String,
    image: Option<String>,
    subject: String,
    grade: String,
    lecture: String,
    solution: String,
    split: String,
}

/// Where a problem's image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageLayout {
    /// `<dir>/<problem split>/<pid>/<image>`: the official download's `images/` folder.
    BySplit(PathBuf),
    /// `<dir>/<pid>/<image>`: one split's folder, as LLaVA's `--image-folder
    /// .../scienceqa/images/test` with the converted file's `image = "<pid>/image.png"`.
    Flat(PathBuf),
}

impl ImageLayout {
    /// The official layout below a dataset root: `<root>/images/<split>/<pid>/<image>`.
    pub fn official(root: &Path) -> Self {
        ImageLayout::BySplit(root.join("images"))
    }

    pub fn path(&self, pid: &str, split: Split, image: &str) -> PathBuf {
        match self {
            ImageLayout::BySplit(dir) => dir.join(split.name()).join(pid).join(image),
            ImageLayout::Flat(dir) => dir.join(pid).join(image),
        }
    }
}

/// One split of ScienceQA, validated: fields well-formed and every named image present.
#[derive(Clone, Debug)]
pub struct ScienceQa {
    pub root: PathBuf,
    pub split: Split,
    /// In `pid_splits.json` order (the order LLaVA's converted files and scorers use).
    pub problems: Vec<Problem>,
    pub layout: ImageLayout,
    by_pid: BTreeMap<String, usize>,
}

fn read_json(file: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", file.display()))
}

impl ScienceQa {
    /// Loads `split` from `<root>/problems.json` and `<root>/pid_splits.json`.
    pub fn load(root: &Path, split: Split, layout: ImageLayout) -> Result<Self> {
        let splits_file = root.join("pid_splits.json");
        let splits = read_json(&splits_file)?;
        let pids = splits
            .as_object()
            .with_context(|| {
                format!("{}: expected an object of split → pids", splits_file.display())
            })?
            .get(split.name())
            .with_context(|| format!("{}: no `{}` split", splits_file.display(), split.name()))?
            .as_array()
            .with_context(|| {
                format!("{}: `{}` is not a list of pids", splits_file.display(), split.name())
            })?;
        if pids.is_empty() {
            bail!("{}: the `{}` split is empty", splits_file.display(), split.name());
        }
        let problems_file = root.join("problems.json");
        let all = read_json(&problems_file)?;
        let all = all.as_object().with_context(|| {
            format!("{}: expected an object of pid → problem", problems_file.display())
        })?;
        let mut problems = Vec::with_capacity(pids.len());
        let mut by_pid = BTreeMap::new();
        for (i, pid) in pids.iter().enumerate() {
            let pid = pid.as_str().with_context(|| {
                format!("{}: `{}`[{i}] is not a string: {pid}", splits_file.display(), split.name())
            })?;
            if by_pid.insert(pid.to_string(), i).is_some() {
                bail!("{}: pid {pid} appears twice in `{}`", splits_file.display(), split.name());
            }
            let raw = all.get(pid).with_context(|| {
                format!(
                    "{}: pid {pid} of `{}` is not in {}",
                    splits_file.display(),
                    split.name(),
                    problems_file.display()
                )
            })?;
            let problem = parse_problem(pid, raw, split)
                .with_context(|| format!("{}: pid {pid}", problems_file.display()))?;
            if let Some(image) = &problem.image {
                let path = layout.path(pid, problem.split, image);
                if !path.is_file() {
                    bail!(
                        "{}: pid {pid} names image `{image}`, but {} does not exist",
                        problems_file.display(),
                        path.display()
                    );
                }
            }
            problems.push(problem);
        }
        Ok(Self { root: root.to_path_buf(), split, problems, layout, by_pid })
    }

    pub fn problem(&self, pid: &str) -> Option<&Problem> {
        self.by_pid.get(pid).map(|&i| &self.problems[i])
    }

    pub fn image_path(&self, problem: &Problem) -> Option<PathBuf> {
        problem.image.as_ref().map(|image| self.layout.path(&problem.pid, problem.split, image))
    }
}

fn parse_problem(pid: &str, raw: &serde_json::Value, split: Split) -> Result<Problem> {
    let raw = RawProblem::deserialize(raw).context("malformed entry")?;
    if raw.question.trim().is_empty() {
        bail!("empty question");
    }
    if raw.choices.is_empty() || raw.choices.len() > OPTIONS.len() {
        bail!("{} choices (expected 1 to {})", raw.choices.len(), OPTIONS.len());
    }
    if raw.answer >= raw.choices.len() {
        bail!("answer {} is not an index into its {} choices", raw.answer, raw.choices.len());
    }
    let subject = Subject::parse(&raw.subject).with_context(|| {
        format!(
            "unknown subject `{}` (natural science, social science, language science)",
            raw.subject
        )
    })?;
    let grade = raw
        .grade
        .strip_prefix("grade")
        .and_then(|g| g.parse::<u8>().ok())
        .filter(|g| (1..=12).contains(g))
        .with_context(|| format!("grade `{}` is not grade1..grade12", raw.grade))?;
    let own: Split = raw.split.parse().with_context(|| format!("split `{}`", raw.split))?;
    if !own.is_base() || (split.is_base() && own != split) {
        bail!("its split is `{}`, but it is listed in `{}`", raw.split, split.name());
    }
    if raw.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
        bail!("empty image name");
    }
    Ok(Problem {
        pid: pid.to_string(),
        question: raw.question,
        choices: raw.choices,
        answer: raw.answer,
        hint: raw.hint,
        image: raw.image,
        subject,
        grade,
        lecture: raw.lecture,
        solution: raw.solution,
        split: own,
    })
}

/// One question of a LLaVA converted ScienceQA file.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaQuestion {
    pub id: String,
    /// Relative to LLaVA's `--image-folder` (`<pid>/image.png`).
    pub image: Option<String>,
    /// The first (human) turn's value.
    pub human: String,
    /// The second (gpt) turn's value, when present.
    pub gpt: Option<String>,
}

/// Reads `llava_<split>_<format>.json` (a list of `{id, image?, conversations}`); the first turn
/// must be from "human", a second from "gpt".
pub fn load_llava_questions(file: &Path) -> Result<Vec<LlavaQuestion>> {
    let raw = read_json(file)?;
    let list = raw.as_array().with_context(|| {
        format!("{}: expected a list of {{id, image?, conversations}}", file.display())
    })?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(list.len());
    for (index, entry) in list.iter().enumerate() {
        let id = entry
            .get("id")
            .and_then(|v| v.as_str())
            .with_context(|| format!("{}: entry {index}: no string `id`", file.display()))?;
        let bad = |what: &str| anyhow!("{}: id {id}: {what}", file.display());
        if !seen.insert(id.to_string()) {
            return Err(bad("appears twice"));
        }
        let image = match entry.get("image") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .filter(|s| !s.trim().is_empty())
                    .ok_or_else(|| bad("`image` is not a file name"))?
                    .to_string(),
            ),
        };
        let turns = entry
            .get("conversations")
            .and_then(|v| v.as_array())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("`conversations` is not a non-empty list"))?;
        let turn = |i: usize, from: &str| -> Result<Option<String>> {
            let Some(t) = turns.get(i) else { return Ok(None) };
            if t.get("from").and_then(|v| v.as_str()) != Some(from) {
                return Err(bad(&format!("turn {i} is not from \"{from}\"")));
            }
            let value = t
                .get("value")
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad(&format!("turn {i} has no string `value`")))?;
            Ok(Some(value.to_string()))
        };
        let human = turn(0, "human")?.ok_or_else(|| bad("no human turn"))?;
        // (The question as `model_vqa_science` reads it: the turn without `<image>`.)
        if human.replace("<image>", "").trim().is_empty() {
            return Err(bad("empty question"));
        }
        let gpt = turn(1, "gpt")?;
        out.push(LlavaQuestion { id: id.to_string(), image, human, gpt });
    }
    if out.is_empty() {
        bail!("{}: no questions", file.display());
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A fresh, empty directory under the system temp dir.
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qvlm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    /// A hand-written problem with text context and an image.
    pub(crate) fn magnet_problem() -> Problem {
        Problem {
            pid: "42".into(),
            question: "Will these magnets attract or repel each other?".into(),
            choices: vec!["repel".into(), "attract".into()],
            answer: 1,
            hint: "Two magnets are placed as shown.  ".into(),
            image: Some("image.png".into()),
            subject: Subject::Natural,
            grade: 3,
            lecture: "Magnets can pull or push.\nOpposite poles attract.".into(),
            solution: "The S pole faces the N pole.".into(),
            split: Split::Test,
        }
    }

    pub(crate) fn raw(p: &Problem) -> serde_json::Value {
        json!({
            "question": p.question, "choices": p.choices, "answer": p.answer, "hint": p.hint,
            "image": p.image, "task": "closed choice",
            "subject": match p.subject {
                Subject::Natural => "natural science",
                Subject::Social => "social science",
                Subject::Language => "language science",
            },
            "grade": format!("grade{}", p.grade), "lecture": p.lecture, "solution": p.solution,
            "split": p.split.name(), "topic": "physics",
        })
    }

    pub(crate) fn text_problem() -> Problem {
        Problem {
            pid: "7".into(),
            question: "Which word would you find on a dictionary page?".into(),
            choices: vec!["ship".into(), "gave".into(), "zoo".into()],
            answer: 0,
            hint: String::new(),
            image: None,
            subject: Subject::Language,
            grade: 8,
            lecture: String::new(),
            solution: String::new(),
            split: Split::Test,
        }
    }

    /// Writes problems.json, pid_splits.json (all problems in `test`) and the images.
    pub(crate) fn write_dataset(dir: &Path, problems: &[serde_json::Value], pids: &[&str]) {
        let map: serde_json::Map<String, serde_json::Value> =
            pids.iter().zip(problems).map(|(p, v)| (p.to_string(), v.clone())).collect();
        std::fs::write(dir.join("problems.json"), serde_json::Value::Object(map).to_string())
            .expect("write");
        let splits = json!({"train": [], "val": [], "test": pids, "minitest": pids});
        std::fs::write(dir.join("pid_splits.json"), splits.to_string()).expect("write");
        for (pid, v) in pids.iter().zip(problems) {
            if let Some(image) = v.get("image").and_then(|i| i.as_str()).filter(|i| !i.is_empty()) {
                let d = dir.join("images").join("test").join(pid);
                std::fs::create_dir_all(&d).expect("mkdir");
                std::fs::write(d.join(image), b"png").expect("write");
            }
        }
    }

    #[test]
    fn loads_the_official_layout() {
        let dir = temp_dir("sqa-load");
        let (a, b) = (magnet_problem(), text_problem());
        write_dataset(&dir, &[raw(&a), raw(&b)], &["42", "7"]);
        let data = ScienceQa::load(&dir, Split::Test, ImageLayout::official(&dir)).expect("load");
        assert_eq!(data.problems, vec![a.clone(), b.clone()]);
        assert_eq!(data.problem("7"), Some(&b));
        assert_eq!(data.image_path(&a), Some(dir.join("images/test/42/image.png")));
        assert_eq!(data.image_path(&b), None);
        // The mini split reads the same problems; a flat layout points into one split's folder.
        let flat = ImageLayout::Flat(dir.join("images").join("test"));
        let mini = ScienceQa::load(&dir, Split::Minitest, flat).expect("load");
        assert_eq!(mini.image_path(&a), Some(dir.join("images/test/42/image.png")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn load_err(dir: &Path, problem: serde_json::Value) -> String {
        write_dataset(dir, &[problem], &["42"]);
        match ScienceQa::load(dir, Split::Test, ImageLayout::official(dir)) {
            Ok(_) => panic!("a malformed problem loaded"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn malformed_problems_name_the_file_and_pid() {
        let dir = temp_dir("sqa-bad");
        let p = magnet_problem();
        // (field, new value, expected message); a null hint is a missing string.
        let cases = [
            ("answer", json!(2), "not an index"),
            ("subject", json!("math"), "unknown subject"),
            ("grade", json!("grade13"), "grade13"),
            ("choices", json!([]), "0 choices"),
            ("choices", json!(["a", "b", "c", "d", "e", "f"]), "6 choices"),
            ("question", json!(" "), "empty question"),
            ("split", json!("train"), "its split is `train`"),
            ("image", json!(""), "empty image name"),
            ("hint", json!(null), "malformed entry"),
            ("choices", json!("A"), "malformed entry"),
        ];
        for (field, value, want) in cases {
            let mut v = raw(&p);
            v[field] = value;
            let err = load_err(&dir, v);
            assert!(err.contains("problems.json: pid 42"), "{field}: {err}");
            assert!(err.contains(want), "{field}: {err}");
        }
        // A missing image names the path it looked for.
        write_dataset(&dir, &[raw(&p)], &["42"]);
        std::fs::remove_file(dir.join("images/test/42/image.png")).expect("rm");
        let err = ScienceQa::load(&dir, Split::Test, ImageLayout::official(&dir))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
            .expect_err("missing image");
        assert!(err.contains("pid 42 names image") && err.contains("images/test/42/image.png"));
        // pid_splits.json naming an unknown pid, a duplicate, or lacking the split.
        std::fs::write(dir.join("pid_splits.json"), json!({"test": ["42", "99"]}).to_string())
            .expect("write");
        std::fs::create_dir_all(dir.join("images/test/42")).expect("mkdir");
        std::fs::write(dir.join("images/test/42/image.png"), b"png").expect("write");
        let err = format!(
            "{:#}",
            ScienceQa::load(&dir, Split::Test, ImageLayout::official(&dir)).expect_err("99")
        );
        assert!(err.contains("pid_splits.json: pid 99"), "{err}");
        std::fs::write(dir.join("pid_splits.json"), json!({"test": ["42", "42"]}).to_string())
            .expect("write");
        let err = format!(
            "{:#}",
            ScienceQa::load(&dir, Split::Test, ImageLayout::official(&dir)).expect_err("dup")
        );
        assert!(err.contains("appears twice"), "{err}");
        let err = format!(
            "{:#}",
            ScienceQa::load(&dir, Split::Val, ImageLayout::official(&dir)).expect_err("val")
        );
        assert!(err.contains("no `val` split"), "{err}");
        std::fs::write(dir.join("problems.json"), "{not json").expect("write");
        let err = format!(
            "{:#}",
            ScienceQa::load(&dir, Split::Test, ImageLayout::official(&dir)).expect_err("json")
        );
        assert!(err.contains("problems.json: not valid JSON"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_llava_files_name_the_file_and_id() {
        let dir = temp_dir("sqa-llava-bad");
        let file = dir.join("llava_test_CQM-A.json");
        let cases = [
            (json!([{"id": "1", "conversations": []}]), "id 1: `conversations`"),
            (
                json!([{"id": "1", "conversations": [{"from": "gpt", "value": "x"}]}]),
                "id 1: turn 0 is not from \"human\"",
            ),
            (
                json!([{"id": "1", "image": 3, "conversations": [{"from": "human", "value": "q"}]}]),
                "id 1: `image`",
            ),
            (json!([{"conversations": []}]), "entry 0: no string `id`"),
            (
                json!([{"id": "1", "conversations": [{"from": "human", "value": "q"}]},
                       {"id": "1", "conversations": [{"from": "human", "value": "q"}]}]),
                "id 1: appears twice",
            ),
            (json!({"id": "1"}), "expected a list"),
        ];
        for (content, want) in cases {
            std::fs::write(&file, content.to_string()).expect("write");
            let err = format!("{:#}", load_llava_questions(&file).expect_err(want));
            assert!(err.contains("llava_test_CQM-A.json") && err.contains(want), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
