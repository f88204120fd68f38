//! ScienceQA and VQA-jsonl evaluation run end to end through the binary on small synthetic
//! datasets (easy-VQA images, the tiny model): metrics and per-class rows come out, unparsable
//! answers are counted, nothing panics.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

fn easy_vqa_image(id: u32) -> PathBuf {
    let lib = root().join(".venv/lib");
    let py = std::fs::read_dir(&lib).expect(".venv/lib").flatten().next().expect("python").path();
    py.join("site-packages/easy_vqa/data/test/images").join(format!("{id}.png"))
}

fn run(config: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_experiments"))
        .arg(config)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn metrics(results: &Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(results.join("cells")).expect("cells").flatten() {
        all.push_str(&std::fs::read_to_string(e.path().join("metrics.csv")).expect("metrics"));
    }
    all
}

fn config(dir: &Path, dataset: &str) -> PathBuf {
    let text = format!(
        r#"[experiment]
name = "ds"
threads = 1
results_dir = "{results}"

[[models]]
name = "tiny"
path = "{model}"

{dataset}

[calibration]
samples = 2

[grid]
models = ["tiny"]
bits = ["W8A8"]
methods = ["rtn"]
"#,
        results = dir.join("results").display(),
        model = root().join("models/tiny-llava").display(),
    );
    let path = dir.join("ds.toml");
    std::fs::write(&path, text).expect("config");
    path
}

#[test]
fn scienceqa_runs_end_to_end_with_per_class_metrics() {
    let dir = std::env::temp_dir().join(format!("qvlm-sqa-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let problem = |q: &str, hint: &str, image: bool, subject: &str, grade: &str, split: &str| {
        serde_json::json!({
            "question": q, "choices": ["red", "blue"], "answer": 1, "hint": hint,
            "image": if image { serde_json::json!("image.png") } else { serde_json::Value::Null },
            "task": "closed choice", "category": "x", "subject": subject, "grade": grade,
            "lecture": "", "solution": "", "split": split,
        })
    };
    let problems = serde_json::json!({
        "1": problem("what color is the shape?", "", true, "natural science", "grade2", "test"),
        "2": problem("what color is the shape?", "a hint", true, "social science", "grade8", "test"),
        "3": problem("is there a circle?", "", false, "language science", "grade3", "test"),
        "10": problem("what color is the shape?", "", true, "natural science", "grade4", "train"),
        "11": problem("what shape is present?", "", true, "natural science", "grade4", "train"),
    });
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("problems.json"), problems.to_string()).expect("problems");
    std::fs::write(
        dir.join("pid_splits.json"),
        serde_json::json!({"train": ["10", "11"], "test": ["1", "2", "3"]}).to_string(),
    )
    .expect("splits");
    for (split, pid, img) in
        [("test", "1", 0), ("test", "2", 1), ("train", "10", 2), ("train", "11", 3)]
    {
        let d = dir.join("images").join(split).join(pid);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::copy(easy_vqa_image(img), d.join("image.png")).expect("copy");
    }
    let cfg = config(&dir, &format!(
        "[dataset]\nkind = \"scienceqa\"\npath = \"{}\"\nprompt_format = \"CQM-A\"\ntemplate = \"vicuna_v1\"\nbatch_size = 3\nmax_new_tokens = 3",
        dir.display()
    ));
    let (ok, err) = run(&cfg);
    assert!(ok, "{err}");
    let m = metrics(&dir.join("results"));
    for metric in [
        "accuracy,",
        "unparsed_answers,",
        "accuracy_NAT,",
        "accuracy_SOC,",
        "accuracy_LAN,",
        "accuracy_IMG,",
        "accuracy_NO,",
        "accuracy_G1-6,",
        "accuracy_G7-12,",
        "kl_vs_float,",
    ] {
        assert!(m.contains(metric), "{metric} missing:\n{m}");
    }
    assert!(m.contains("questions,3"), "{m}");
    // Without train images, calibrating on the evaluated split must be asked for.
    std::fs::remove_dir_all(dir.join("images").join("train")).expect("rm train");
    let _ = std::fs::remove_dir_all(dir.join("results"));
    let (ok, err) = run(&cfg);
    assert!(
        !ok && err.contains("images/train") && err.contains("calibrate_on_evaluated_split"),
        "{err}"
    );
    let text = std::fs::read_to_string(&cfg).expect("cfg");
    std::fs::write(
        &cfg,
        text.replace(
            "max_new_tokens = 3",
            "max_new_tokens = 3\ncalibrate_on_evaluated_split = true",
        ),
    )
    .expect("cfg");
    let (ok, err) = run(&cfg);
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vqa_jsonl_runs_end_to_end_with_vqa_accuracy() {
    let dir = std::env::temp_dir().join(format!("qvlm-vqa-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("dir");
    let mut questions = String::new();
    let mut answers = String::new();
    for id in 0..4u32 {
        std::fs::copy(easy_vqa_image(id), images.join(format!("{id}.png"))).expect("copy");
        questions.push_str(&format!("{{\"question_id\": {id}, \"image\": \"{id}.png\", \"text\": \"what color is the shape?\"}}\n"));
        answers.push_str(&format!(
            "{{\"question_id\": {id}, \"answers\": [\"blue\", \"blue\", \"red\"]}}\n"
        ));
    }
    std::fs::write(dir.join("q.jsonl"), questions).expect("q");
    std::fs::write(dir.join("a.jsonl"), answers).expect("a");
    let cfg = config(&dir, &format!(
        "[dataset]\nkind = \"vqa\"\nquestions = \"{}\"\nanswers = \"{}\"\nimages = \"{}\"\ntemplate = \"llava_v1\"\nbatch_size = 4\nmax_new_tokens = 3",
        dir.join("q.jsonl").display(),
        dir.join("a.jsonl").display(),
        images.display()
    ));
    let (ok, err) = run(&cfg);
    assert!(ok, "{err}");
    let m = metrics(&dir.join("results"));
    assert!(m.contains("accuracy,") && m.contains("scored_questions,4"), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}
