//! Bad input, second round: every command validates its whole input before it writes anything,
//! overwrites nothing it was not asked to, never records a non-finite or impossible result, and
//! answers malformed input with one clean `error:` line (exit 1, file and key named, no panic).
//! Every case runs the real `experiments` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "qvlm-bad-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch");
        Self(p)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn experiments(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run experiments")
}

/// Exit status 1, exactly one `error:` line, naming each of `names`, and no panic or backtrace.
fn assert_clean_error(out: &Output, names: &[&str], case: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{case}: exit status\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{case}: one error line\n{err}");
    for name in names {
        assert!(lines[0].contains(name), "{case}: `{name}` not named in\n{}", lines[0]);
    }
    assert!(!err.contains("panicked") && !err.contains("stack backtrace"), "{case}\n{err}");
}

fn experiment_config(name: &str, results: &Path, extra: &str) -> String {
    format!(
        r#"[experiment]
name = "{name}"
threads = 1
results_dir = "{results}"

[[models]]
name = "tiny"
path = "{model}"

[dataset]
kind = "easy_vqa"
limit = 4
batch_size = 4

[calibration]
samples = 2

[grid]
models = ["tiny"]
bits = ["W8A8"]
methods = ["rtn"]
{extra}"#,
        results = results.display(),
        model = root().join("models/tiny-llava").display(),
    )
}

const TRAIN_TINY: &str = r#"out = "OUT"

[arch]
vision_hidden = 64
vision_intermediate = 256
vision_layers = 4
vision_heads = 4
patch_size = 8
text_hidden = 192
text_intermediate = 384
text_layers = 4
text_heads = 8
text_kv_heads = 4

[train]
seed = 0
threads = 1
batch_size = 64
vision_epochs = 30
vision_lr = 2e-3
lm_epochs = 3
lm_lr = 2e-3
weight_decay = 0.01
warmup_fraction = 0.05
grad_clip = 1.0
"#;

const BENCH: &str = r#"[bench]
name = "tiny-bench"
device = "cpu"
threads = 1
results_dir = "RESULTS"

[model]
memory_headroom_gib = 0.0
shapes = ["tiny"]
schemes = ["bf16"]

[measure]
prefill_tokens = 4
warmup_tokens = 1
decode_tokens = 1

[bandwidth]
mib = 4
repeats = 1

[[shape]]
name = "tiny"
vision_hidden = 64
vision_layers = 1
vision_heads = 2
vision_intermediate = 128
image_size = 28
patch_size = 14
text_hidden = 128
text_layers = 1
text_heads = 2
text_intermediate = 256
vocab = 64
"#;

/// A folder with files that must survive.
fn precious(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    std::fs::create_dir_all(dir).expect("dir");
    ["config.json", "model.safetensors", "tokenizer.json", "report.md"]
        .iter()
        .map(|n| {
            let p = dir.join(n);
            let bytes = format!("precious {n}").into_bytes();
            std::fs::write(&p, &bytes).expect("write");
            (p, bytes)
        })
        .collect()
}

fn assert_untouched(files: &[(PathBuf, Vec<u8>)], case: &str) {
    for (p, bytes) in files {
        assert_eq!(std::fs::read(p).ok().as_ref(), Some(bytes), "{case}: {} changed", p.display());
    }
}

#[test]
fn train_tiny_validates_everything_before_it_writes_and_replaces_only_when_asked() {
    let tmp = Scratch::new("train");
    let out = tmp.0.join("model");
    let files = precious(&out);
    let base = TRAIN_TINY.replace("OUT", &out.display().to_string());
    let cases = [
        (
            "heads not dividing the width",
            base.replace("text_heads = 8", "text_heads = 7"),
            "arch.text_heads",
        ),
        (
            "zero heads (was a division by zero)",
            base.replace("text_heads = 8", "text_heads = 0"),
            "arch.text_heads",
        ),
        (
            "kv heads not dividing the heads",
            base.replace("text_kv_heads = 4", "text_kv_heads = 3"),
            "arch.text_kv_heads",
        ),
        (
            "patch not dividing the image",
            base.replace("patch_size = 8", "patch_size = 7"),
            "arch.patch_size",
        ),
        ("no language epochs", base.replace("lm_epochs = 3", "lm_epochs = 0"), "train.lm_epochs"),
        ("learning rate not finite", base.replace("lm_lr = 2e-3", "lm_lr = nan"), "train.lm_lr"),
        ("negative threads", base.replace("threads = 1", "threads = -1"), "train.threads"),
        ("an existing out without --force", base.clone(), "--force"),
    ];
    for (case, text, key) in &cases {
        let cfg = tmp.write("train.toml", text);
        let run = experiments(&["train-tiny", cfg.to_str().expect("utf8")], &root());
        assert_clean_error(&run, &[key], case);
        assert_untouched(&files, case);
        assert!(!tmp.0.join("model.lock").exists(), "{case}: lock released");
    }
}

#[test]
fn runs_never_write_outside_their_folder_or_over_another_runs_results() {
    let tmp = Scratch::new("owner");
    let work = tmp.0.join("work");
    let files = precious(&work);
    // `name = ".."` would have written cells, tables and report.md into the working directory.
    for name in ["..", ".", "a/b", ""] {
        let text = experiment_config(name, &tmp.0.join("unused"), "")
            .replace(&format!("results_dir = \"{}\"\n", tmp.0.join("unused").display()), "");
        let cfg = tmp.write("name.toml", &text);
        let run = experiments(&[cfg.to_str().expect("utf8")], &work);
        assert_clean_error(&run, &["experiment.name", "name.toml"], &format!("name {name:?}"));
        assert_untouched(&files, name);
    }
    // A results folder owned by another experiment is refused, naming both.
    let results = tmp.0.join("results");
    std::fs::create_dir_all(&results).expect("dir");
    std::fs::write(
        results.join("owner.json"),
        r#"{"command": "experiments", "name": "other", "config": "configs/other.toml", "config_sha256": "00"}"#,
    )
    .expect("owner");
    let report = results.join("report.md");
    std::fs::write(&report, "the other experiment's report").expect("report");
    let cfg = tmp.write("mine.toml", &experiment_config("mine", &results, ""));
    let run = experiments(&[cfg.to_str().expect("utf8")], &root());
    assert_clean_error(&run, &["`other`", "`mine`", "configs/other.toml"], "another's folder");
    assert_eq!(
        std::fs::read_to_string(&report).ok().as_deref(),
        Some("the other experiment's report")
    );
    // The bench is refused on a folder another bench holds the lock of (this test's own pid).
    let bench_results = tmp.0.join("bench");
    std::fs::create_dir_all(&bench_results).expect("dir");
    std::fs::write(bench_results.join(".lock"), std::process::id().to_string()).expect("lock");
    let bench =
        tmp.write("bench.toml", &BENCH.replace("RESULTS", &bench_results.display().to_string()));
    let run = experiments(&["bench", bench.to_str().expect("utf8")], &root());
    assert_clean_error(&run, &["another run", ".lock"], "a second bench");
    assert!(!bench_results.join("efficiency.csv").exists());
}

#[test]
fn non_finite_results_and_short_calibration_sets_are_errors_not_results() {
    let tmp = Scratch::new("finite");
    // Outliers of 3e38 overflow the float model: every metric of the cell would be NaN.
    let results = tmp.0.join("results");
    let text = experiment_config("huge", &results, "")
        .replace("path = \"", "outliers = { channels = 4, scale = 3e38, seed = 0 }\npath = \"");
    let cfg = tmp.write("huge.toml", &text);
    let run = experiments(&[cfg.to_str().expect("utf8")], &root());
    assert_clean_error(&run, &["is NaN", "not saved"], "non-finite metrics");
    let saved = std::fs::read_dir(results.join("cells")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(saved, 0, "nothing of the failed cell is kept");
    // More calibration pairs than the split has: an error, unless asked for; then the manifest
    // says how many were used.
    let data = tmp.0.join("data");
    let train = r#"[["is there a circle?", "yes", 0], ["what color is the shape?", "red", 1], ["is there a triangle?", "no", 0]]"#;
    let test =
        r#"[["is there a circle?", "yes", 0], ["what shape is in the image?", "circle", 1]]"#;
    let src = {
        let lib = root().join(".venv/lib");
        let py = std::fs::read_dir(&lib).expect(".venv").flatten().next().expect("py").path();
        py.join("site-packages/easy_vqa/data")
    };
    std::fs::create_dir_all(&data).expect("dir");
    std::fs::copy(src.join("answers.txt"), data.join("answers.txt")).expect("answers");
    for (split, questions) in [("train", train), ("test", test)] {
        let images = data.join(split).join("images");
        std::fs::create_dir_all(&images).expect("dir");
        for id in 0..2 {
            let name = format!("{id}.png");
            std::fs::copy(src.join(split).join("images").join(&name), images.join(&name))
                .expect("copy");
        }
        std::fs::write(data.join(split).join("questions.json"), questions).expect("write");
    }
    let results = tmp.0.join("short");
    let text = experiment_config("short", &results, "")
        .replace("batch_size = 4", &format!("batch_size = 4\npath = \"{}\"", data.display()))
        .replace("samples = 2", "samples = 5");
    let cfg = tmp.write("short.toml", &text);
    let run = experiments(&[cfg.to_str().expect("utf8")], &root());
    // Train: 3 questions on 2 images, the last image the validation slice: 2 usable pairs.
    assert_clean_error(
        &run,
        &["calibration.samples", "5 pairs requested", "only 2"],
        "short split",
    );
    let cfg =
        tmp.write("short.toml", &text.replace("samples = 5", "samples = 5\nallow_fewer = true"));
    let run = experiments(&[cfg.to_str().expect("utf8")], &root());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let manifests: Vec<String> = std::fs::read_dir(results.join("cells"))
        .expect("cells")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path().join("manifest.json")).expect("manifest"))
        .collect();
    assert!(
        manifests.iter().any(|m| m.contains("\"calibration_samples_requested\": 5")
            && m.contains("\"calibration_samples_used\": 2")),
        "{manifests:?}"
    );
}

/// Every command on malformed input: one clean error line naming the file and the key.
#[test]
fn every_command_answers_malformed_input_with_one_clean_error_line() {
    let tmp = Scratch::new("clean");
    let results = tmp.0.join("results");
    let exp = experiment_config("clean", &results, "");
    let method = "\n[[methods]]\nname = \"mine\"\nweights = \"rtn\"\n";
    let bench = BENCH.replace("RESULTS", &tmp.0.join("bench").display().to_string());
    let train = TRAIN_TINY.replace("OUT", &tmp.0.join("model").display().to_string());
    // (command, file name, text, the key or words the message must name)
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("run", "e.toml", exp.replace("scale", "x").replace("path = \"", "outliers = { channels = 4, scale = nan, seed = 0 }\npath = \""), "models.outliers"),
        ("run", "e.toml", exp.replace("path = \"", "outliers = { channels = 4, scale = inf, seed = 0 }\npath = \""), "models.outliers"),
        ("run", "e.toml", exp.replace("path = \"", "shifted_outliers = { channels = 0, shift = 250.0, seed = 0 }\npath = \""), "models.shifted_outliers"),
        ("run", "e.toml", exp.replace("path = \"", "shifted_outliers = { channels = 2, shift = nan, seed = 0 }\npath = \""), "models.shifted_outliers"),
        ("run", "e.toml", exp.replace("path = \"", "shifted_outliers = { channels = 2, shift = 250.0, scale = 2.0 }\npath = \""), "shifted_outliers"),
        ("run", "e.toml", format!("{exp}{method}strategy = {{ kind = \"lp_init\", p = nan }}\n").replace("methods = [\"rtn\"]", "methods = [\"mine\"]"), "methods[0].strategy"),
        ("run", "e.toml", format!("{exp}{method}strategy = {{ kind = \"oracle\", window = 0 }}\n"), "methods[0].strategy"),
        ("run", "e.toml", format!("{exp}{method}strategy = {{ kind = \"entropy_blocked\", h0 = {{ kind = \"quantile\", value = 2.0 }} }}\n"), "h0.value"),
        ("run", "e.toml", format!("{exp}{method}strategy = {{ kind = \"entropy_blocked\", h0 = {{ kind = \"quantile\", value = 0.5, extra = 1 }} }}\n"), "methods[0].strategy"),
        ("run", "e.toml", format!("{exp}{method}strategy = {{ kind = \"sequential\", candidates = {{ kind = \"ratio\", values = [1.0], extra = 1 }} }}\n"), "methods[0].strategy"),
        ("run", "e.toml", format!("{exp}\n[quant]\nvision_act = {{ granularity = {{ kind = \"per_token\", size = 3 }}, range = \"static\" }}\n"), "quant.vision_act"),
        ("run", "e.toml", format!("{exp}\n[quant]\nvision_act = {{ granularity = {{ kind = \"per_group\", size = 0 }}, range = \"static\" }}\n"), "quant.vision_act"),
        ("run", "e.toml", format!("{exp}{method}strategy = {{ kind = \"rtn\" }}\n{method}strategy = {{ kind = \"rtn\" }}\n"), "`methods`: `mine` is listed twice"),
        ("run", "e.toml", exp.replace("methods = [\"rtn\"]", "methods = [\"rtn\", \"rtn\"]"), "grid.methods"),
        ("run", "e.toml", exp.replace("bits = [\"W8A8\"]", "bits = [\"W8A8\", \"W8A8\"]"), "grid.bits"),
        ("run", "e.toml", exp.replace("limit = 4", "limit = 4\nsplit = \"train\""), "dataset.split"),
        ("run", "e.toml", exp.replace("kind = \"easy_vqa\"", "kind = \"vqa\"\nquestions = \"q.jsonl\"\nimages = \"img\"\nsplit = \"val\""), "dataset.split"),
        ("run", "e.toml", exp.replace("kind = \"easy_vqa\"", "kind = \"vqa\"\nquestions = \"q.jsonl\"\nimages = \"img\"\npath = \"x\""), "dataset.path"),
        ("run", "e.toml", exp.replace("threads = 1", "threads = 1\nseed = -1"), "experiment.seed"),
        ("run", "e.toml", bench.clone(), "experiments bench"),
        ("run", "e.toml", train.clone(), "experiments train-tiny"),
        ("bench", "b.toml", bench.replace("memory_headroom_gib = 0.0", "memory_headroom_gib = inf"), "model.memory_headroom_gib"),
        ("bench", "b.toml", bench.replace("vision_hidden = 64", "vision_hidden = 1099511627776"), "shape[0]"),
        ("bench", "b.toml", bench.replace("text_layers = 1", "text_layers = 100000000000"), "shape[0]"),
        ("bench", "b.toml", bench.replace("mib = 4", "mib = 9223372036854775807"), "bandwidth.mib"),
        ("bench", "b.toml", bench.replace("schemes = [\"bf16\"]", "schemes = [\"bf16\"]\ncolour = 1"), "model.colour"),
        ("bench", "b.toml", exp.clone(), "experiments "),
        ("train-tiny", "t.toml", train.replace("text_heads = 8", "text_heads = 0"), "arch.text_heads"),
        ("train-tiny", "t.toml", train.replace("[train]", "[train]\nepochs = 1"), "train.epochs"),
        ("train-tiny", "t.toml", exp.clone(), "experiments "),
    ];
    assert!(cases.len() >= 25);
    for (i, (command, file, text, key)) in cases.iter().enumerate() {
        let path = tmp.write(file, text);
        let p = path.to_str().expect("utf8");
        let args: Vec<&str> = match *command {
            "run" => vec![p, "--dry-run"],
            other => vec![other, p],
        };
        let out = experiments(&args, &root());
        assert_clean_error(&out, &[file, key], &format!("case {i} ({command}, {key})"));
    }
    // An activation group that does not divide a layer's width (a reshape deep in the forward
    // pass once) is refused before any cell runs.
    let groups = tmp.write(
        "g.toml",
        &format!("{exp}\n[quant]\nlanguage_act = {{ granularity = {{ kind = \"per_group\", size = 7 }}, range = \"dynamic\" }}\n"),
    );
    let out = experiments(&[groups.to_str().expect("utf8")], &root());
    assert_clean_error(&out, &["activation granularity", "group size 7"], "activation group");
    assert_eq!(std::fs::read_dir(results.join("cells")).map(|d| d.count()).unwrap_or(0), 0);
    // `generate` refuses to overwrite a logits file, before loading anything.
    let logits = tmp.write("logits.safetensors", "keep");
    let out = experiments(
        &[
            "generate",
            "--model",
            root().join("models/tiny-llava").to_str().expect("utf8"),
            "--image",
            "nonexistent.png",
            "--prompt",
            "what?",
            "--dump-logits",
            logits.to_str().expect("utf8"),
        ],
        &root(),
    );
    assert_clean_error(&out, &["--dump-logits", "--force"], "generate over a file");
    assert_eq!(std::fs::read_to_string(&logits).ok().as_deref(), Some("keep"));
}
