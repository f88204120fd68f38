//! ScienceQA and VQA-jsonl evaluation run end to end through the binary on small synthetic
//! datasets (`synthetic.rs`: the real layouts on easy-VQA images; the tiny model): metrics and
//! per-class rows come out, unparsable answers are counted, nothing panics.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::synthetic::{self, root};

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
    synthetic::write_scienceqa(&dir);
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
    assert!(m.contains(&format!("questions,{}", synthetic::SQA_TEST_QUESTIONS)), "{m}");
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
    let vqa = synthetic::write_vqa(&dir);
    let cfg = config(&dir, &format!(
        "[dataset]\nkind = \"vqa\"\nquestions = \"{}\"\nanswers = \"{}\"\nimages = \"{}\"\ntemplate = \"llava_v1\"\nbatch_size = 4\nmax_new_tokens = 3",
        vqa.questions.display(),
        vqa.answers.display(),
        vqa.images.display()
    ));
    let (ok, err) = run(&cfg);
    assert!(ok, "{err}");
    let m = metrics(&dir.join("results"));
    assert!(
        m.contains("accuracy,")
            && m.contains(&format!("scored_questions,{}", synthetic::VQA_QUESTIONS)),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
