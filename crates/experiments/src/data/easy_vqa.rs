//! The easy-VQA dataset (pip package `easy-vqa==1.0`): `data/{train,test}/questions.json` — a list
//! of `[question, answer, image_id]` — and `data/{train,test}/images/<id>.png` (64×64 RGB).
//! The question type (yes/no, shape, color) follows from the answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The share of the train split's images held out for validation.
pub const VALIDATION_FRACTION: f64 = 0.1;

/// The 13 answers of easy-VQA, by type.
pub const SHAPES: [&str; 3] = ["circle", "rectangle", "triangle"];
pub const COLORS: [&str; 8] = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"];
pub const YES_NO: [&str; 2] = ["yes", "no"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionType {
    YesNo,
    Shape,
    Color,
}

impl QuestionType {
    pub const ALL: [QuestionType; 3] =
        [QuestionType::YesNo, QuestionType::Shape, QuestionType::Color];

    pub fn of_answer(answer: &str) -> Option<Self> {
        if YES_NO.contains(&answer) {
            Some(QuestionType::YesNo)
        } else if SHAPES.contains(&answer) {
            Some(QuestionType::Shape)
        } else if COLORS.contains(&answer) {
            Some(QuestionType::Color)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuestionType::YesNo => "yes/no",
            QuestionType::Shape => "shape",
            QuestionType::Color => "color",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// Position in questions.json (a stable id).
    pub index: usize,
    pub text: String,
    pub answer: String,
    pub image_id: u32,
    pub kind: QuestionType,
}

/// One split of easy-VQA, validated: every question's answer is known and its image exists.
#[derive(Clone, Debug)]
pub struct EasyVqa {
    pub root: PathBuf,
    pub split: Split,
    pub questions: Vec<Question>,
    images: BTreeMap<u32, PathBuf>,
}

impl EasyVqa {
    /// The dataset inside the bootstrap's environment (`.venv/lib/python3.*/site-packages/easy_vqa/data`).
    pub fn default_root() -> Result<PathBuf> {
        let lib = Path::new(".venv").join("lib");
        let entries = std::fs::read_dir(&lib).with_context(|| {
            format!("{}: no project environment (run `make bootstrap`)", lib.display())
        })?;
        for entry in entries.flatten() {
            let candidate = entry.path().join("site-packages").join("easy_vqa").join("data");
            if candidate.join("answers.txt").is_file() {
                return Ok(candidate);
            }
        }
        bail!("easy-VQA is not installed in {} (run `make bootstrap`)", lib.display())
    }

    pub fn load(root: &Path, split: Split) -> Result<Self> {
        let dir = root.join(split.name());
        let file = dir.join("questions.json");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let raw: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| {
            format!("{}: expected a JSON list of [question, answer, image_id]", file.display())
        })?;
        if raw.is_empty() {
            bail!("{}: the {} split has no questions", file.display(), split.name());
        }
        let image_dir = dir.join("images");
        let mut images = BTreeMap::new();
        let mut questions = Vec::with_capacity(raw.len());
        for (index, item) in raw.iter().enumerate() {
            let bad =
                |what: &str| anyhow::anyhow!("{}: entry {index}: {what}: {item}", file.display());
            let arr = item
                .as_array()
                .filter(|a| a.len() == 3)
                .ok_or_else(|| bad("expected [question, answer, image_id]"))?;
            let text = arr[0].as_str().ok_or_else(|| bad("question is not a string"))?.to_string();
            let answer = arr[1].as_str().ok_or_else(|| bad("answer is not a string"))?.to_string();
            let image_id = arr[2]
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad("image_id is not an integer"))?;
            let kind = QuestionType::of_answer(&answer)
                .ok_or_else(|| bad("answer is not one of easy-VQA's 13"))?;
            if text.trim().is_empty() {
                return Err(bad("empty question"));
            }
            if let std::collections::btree_map::Entry::Vacant(e) = images.entry(image_id) {
                let path = image_dir.join(format!("{image_id}.png"));
                if !path.is_file() {
                    bail!(
                        "{}: entry {index} names image {image_id}, but {} does not exist",
                        file.display(),
                        path.display()
                    );
                }
                e.insert(path);
            }
            questions.push(Question { index, text, answer, image_id, kind });
        }
        Ok(Self { root: root.to_path_buf(), split, questions, images })
    }

    pub fn image_path(&self, id: u32) -> Option<&Path> {
        self.images.get(&id).map(PathBuf::as_path)
    }

    /// Image ids in ascending order.
    pub fn image_ids(&self) -> Vec<u32> {
        self.images.keys().copied().collect()
    }

    /// The validation slice of the train split: the last [`VALIDATION_FRACTION`] of its images by
    /// id (at least one). Hyper-parameters are tuned on their questions; calibration pairs never
    /// come from them.
    pub fn validation_images(&self) -> std::collections::BTreeSet<u32> {
        let ids = self.image_ids();
        let n = ((ids.len() as f64 * VALIDATION_FRACTION).ceil() as usize).clamp(1, ids.len());
        ids[ids.len() - n..].iter().copied().collect()
    }

    pub fn answers() -> Vec<&'static str> {
        YES_NO.iter().chain(SHAPES.iter()).chain(COLORS.iter()).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_type_follows_the_answer() {
        assert_eq!(QuestionType::of_answer("yes"), Some(QuestionType::YesNo));
        assert_eq!(QuestionType::of_answer("triangle"), Some(QuestionType::Shape));
        assert_eq!(QuestionType::of_answer("teal"), Some(QuestionType::Color));
        assert_eq!(QuestionType::of_answer("maybe"), None);
        assert_eq!(EasyVqa::answers().len(), 13);
    }

    #[test]
    fn the_validation_slice_is_the_last_tenth_of_the_images() {
        let images: BTreeMap<u32, PathBuf> = (0..25).map(|i| (i, PathBuf::new())).collect();
        let data = EasyVqa { root: PathBuf::new(), split: Split::Train, questions: vec![], images };
        assert_eq!(data.validation_images().into_iter().collect::<Vec<_>>(), vec![22, 23, 24]);
    }
}
