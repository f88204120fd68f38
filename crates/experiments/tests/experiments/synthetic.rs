//! Synthetic benchmarks in the real file layouts, on easy-VQA images (issue #21 item 4): shared by
//! the dataset tests and the real-config test.
//!
//! * ScienceQA as the official download (<https://github.com/lupantech/ScienceQA>):
//!   `problems.json` (pid → the official fields), `pid_splits.json`, and
//!   `images/<split>/<pid>/image.png`. Test pids 1–3 cover every scored class (NAT/SOC/LAN,
//!   TXT/IMG/NO, G1-6/G7-12; pid 3 has no image); train pids 10–14 give four image questions for
//!   calibration and one without an image.
//! * VQA as LLaVA-1.5's `model_vqa_loader` files: a questions jsonl (`question_id`, `image`,
//!   `text` with the short-answer suffix, `category`), an image folder, and an answers jsonl in
//!   the official annotation form (ten `{answer, answer_confidence, answer_id}` per question).

use std::path::{Path, PathBuf};

use serde_json::json;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

pub fn easy_vqa_image(id: u32) -> PathBuf {
    let lib = root().join(".venv/lib");
    let py = std::fs::read_dir(&lib).expect(".venv/lib").flatten().next().expect("python").path();
    py.join("site-packages/easy_vqa/data/test/images").join(format!("{id}.png"))
}

/// Test questions of [`write_scienceqa`].
pub const SQA_TEST_QUESTIONS: usize = 3;
/// Train questions with an image (the calibration pairs) of [`write_scienceqa`].
pub const SQA_TRAIN_IMAGES: usize = 4;

/// pid, split, subject, grade, easy-VQA image (none: text only), hint, question, choices, answer.
type Row = (&'static str, &'static str, &'static str, u8, Option<u32>, &'static str, Question);
type Question = (&'static str, &'static [&'static str], usize);

const PROBLEMS: [Row; 8] = [
    ("1", "test", "natural science", 2, Some(0), "", ("What color is it?", &["red", "blue"], 1)),
    ("2", "test", "social science", 8, Some(1), "It is small.", COLOR3),
    ("3", "test", "language science", 3, None, "", ("Which is a color?", &["circle", "red"], 1)),
    ("10", "train", "natural science", 4, Some(2), "", ("What color is it?", &["red", "blue"], 0)),
    ("11", "train", "natural science", 5, Some(3), "", ("What shape?", &["circle", "square"], 0)),
    ("12", "train", "social science", 9, Some(4), "", ("Is there a circle?", &["yes", "no"], 1)),
    ("13", "train", "language science", 11, Some(5), "A hint.", COLOR3),
    ("14", "train", "language science", 1, None, "", ("Which is a shape?", &["circle", "blue"], 0)),
];
const COLOR3: Question = ("What color is the shape?", &["green", "red", "blue"], 2);

/// Writes ScienceQA's official layout into `dir` (see the module docs).
pub fn write_scienceqa(dir: &Path) {
    let mut problems = serde_json::Map::new();
    let mut splits: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (pid, split, subject, grade, image, hint, (question, choices, answer)) in PROBLEMS {
        let problem = json!({
            "question": question, "choices": choices, "answer": answer, "hint": hint,
            "image": image.map(|_| "image.png"), "task": "closed choice",
            "grade": format!("grade{grade}"), "subject": subject, "topic": "colors",
            "category": "Identify colors", "skill": "Identify shapes and colors",
            "lecture": "Shapes have colors.", "solution": "Look at the shape.", "split": split,
        });
        problems.insert(pid.into(), problem);
        splits.entry(split).or_default().push(pid);
        if let Some(id) = image {
            let d = dir.join("images").join(split).join(pid);
            std::fs::create_dir_all(&d).expect("image dir");
            std::fs::copy(easy_vqa_image(id), d.join("image.png")).expect("copy image");
        }
    }
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("problems.json"), serde_json::Value::Object(problems).to_string())
        .expect("problems.json");
    std::fs::write(dir.join("pid_splits.json"), json!(splits).to_string())
        .expect("pid_splits.json");
}

/// The files of a VQA jsonl set.
pub struct VqaFiles {
    pub questions: PathBuf,
    pub answers: PathBuf,
    pub images: PathBuf,
}

/// Questions of [`write_vqa`].
pub const VQA_QUESTIONS: usize = 4;
/// Each question's ten human answers, as VQAv2 has.
const HUMAN_ANSWERS: [&str; 10] =
    ["blue", "blue", "blue", "red", "blue", "navy", "blue", "blue", "red", "blue"];

/// Writes a VQA jsonl set into `dir` (see the module docs).
pub fn write_vqa(dir: &Path) -> VqaFiles {
    let files = VqaFiles {
        questions: dir.join("llava_vqa_val.jsonl"),
        answers: dir.join("val_answers.jsonl"),
        images: dir.join("val"),
    };
    std::fs::create_dir_all(&files.images).expect("dir");
    let (mut questions, mut answers) = (String::new(), String::new());
    for id in 0..VQA_QUESTIONS as u32 {
        let image = format!("VQA_val_{id:08}.png");
        std::fs::copy(easy_vqa_image(id), files.images.join(&image)).expect("copy image");
        let text = "What color is the shape?\nAnswer the question using a single word or phrase.";
        let q = json!({
            "question_id": 1000 + id, "image": image, "text": text, "category": "default",
        });
        let human: Vec<_> = HUMAN_ANSWERS
            .iter()
            .enumerate()
            .map(|(i, a)| json!({"answer": a, "answer_confidence": "yes", "answer_id": i + 1}))
            .collect();
        questions.push_str(&format!("{q}\n"));
        answers.push_str(&format!("{}\n", json!({"question_id": 1000 + id, "answers": human})));
    }
    std::fs::write(&files.questions, questions).expect("questions");
    std::fs::write(&files.answers, answers).expect("answers");
    files
}
