//! Bad input never panics or loses data; interrupted runs resume exactly; the same config gives
//! the same numbers. Every case runs the real `experiments` binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use qvlm_core::io::safetensors::{write_safetensors, SafetensorsFile};
use tch::{Kind, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

fn fixtures() -> PathBuf {
    root().join("crates/core/tests/fixtures/llava")
}

fn easy_vqa_data() -> PathBuf {
    let lib = root().join(".venv/lib");
    let py = std::fs::read_dir(&lib).expect(".venv/lib").flatten().next().expect("python").path();
    py.join("site-packages/easy_vqa/data")
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "qvlm-rel-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("scratch");
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn experiments(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run experiments")
}

/// Exits non-zero, does not panic, and names `culprit`.
fn assert_rejected(out: &Output, culprit: &str, case: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{case}: accepted although broken\n{err}");
    assert!(!err.contains("panicked"), "{case}: panicked\n{err}");
    assert!(err.contains(culprit), "{case}: message does not name `{culprit}`:\n{err}");
}

fn base_config(results: &Path, data: Option<&Path>) -> String {
    let data_line = data.map(|d| format!("path = \"{}\"\n", d.display())).unwrap_or_default();
    format!(
        r#"[experiment]
name = "rel"
threads = 1
results_dir = "{results}"

[[models]]
name = "tiny"
path = "{model}"

[dataset]
kind = "easy_vqa"
limit = 12
batch_size = 12
{data_line}
[calibration]
samples = 4

[grid]
models = ["tiny"]
bits = ["W4A4"]
methods = ["rtn"]
"#,
        results = results.display(),
        model = root().join("models/tiny-llava").display(),
    )
}

#[test]
fn broken_configs_are_refused_naming_the_key() {
    let tmp = Scratch::new("cfg");
    let results = tmp.0.join("results");
    let base = base_config(&results, None);
    let method = "\n[[methods]]\nname = \"mine\"\nweights = \"rtn\"\n";
    // (case, edit, expected text in the message)
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown top-level table", format!("{base}\n[extra]\nx = 1\n"), "unknown field `extra`"),
        ("unknown key in experiment", base.replace("threads = 1", "threads = 1\ncolour = 1"), "unknown field `colour`"),
        ("unknown key in models", base.replace("name = \"tiny\"\npath", "name = \"tiny\"\nweights = 1\npath"), "unknown field `weights`"),
        ("unknown key in dataset", base.replace("limit = 12", "limit = 12\nsubset = \"x\""), "unknown field `subset`"),
        ("key of another dataset kind", base.replace("limit = 12", "limit = 12\nsplit = \"x\""), "dataset.split"),
        ("unknown key in calibration", base.replace("samples = 4", "samples = 4\nsize = 2"), "unknown field `size`"),
        ("unknown key in quant", format!("{base}\n[quant]\nbits = 4\n"), "unknown field `bits`"),
        ("unknown key in grid", base.replace("methods = [\"rtn\"]", "methods = [\"rtn\"]\nmodel = 1"), "unknown field `model`"),
        ("unknown key in outputs", format!("{base}\n[outputs]\nplots = []\n"), "unknown field `plots`"),
        ("unknown key in methods", format!("{base}{method}strategy = {{ kind = \"rtn\" }}\nweight = 1\n"), "unknown field `weight`"),
        ("unknown key in a strategy", format!("{base}{method}strategy = {{ kind = \"sequential\", depth = 3 }}\n"), "unknown field `depth`"),
        ("unknown key in veo", format!("{base}{method}strategy = {{ kind = \"disentangled\", veo = {{ lambda3 = 1.0 }}, then = {{ kind = \"rtn\" }} }}\n"), "unknown field `lambda3`"),
        ("unknown key in an activation setting", format!("{base}\n[quant]\nvision_act = {{ granularity = {{ kind = \"per_token\" }}, range = \"static\", clip = 1 }}\n"), "unknown field `clip`"),
        ("wrong type: threads", base.replace("threads = 1", "threads = \"two\""), "threads"),
        ("wrong type: limit", base.replace("limit = 12", "limit = -5"), "limit"),
        ("wrong type: model path", base.replace(&format!("path = \"{}\"", root().join("models/tiny-llava").display()), "path = 3"), "path"),
        ("wrong type: bits", base.replace("bits = [\"W4A4\"]", "bits = \"W4A4\""), "bits"),
        ("weight bits out of range", base.replace("W4A4", "W9A4"), "grid.bits"),
        ("activation bits out of range", base.replace("W4A4", "W4A1"), "grid.bits"),
        ("malformed bits", base.replace("W4A4", "4bit"), "grid.bits"),
        ("unknown method", base.replace("[\"rtn\"]", "[\"gptq4\"]"), "grid.methods"),
        ("unknown strategy", format!("{base}{method}strategy = {{ kind = \"greedy\" }}\n"), "greedy"),
        ("unknown model in grid", base.replace("models = [\"tiny\"]", "models = [\"nope\"]"), "grid.models"),
        ("empty grid", base.replace("methods = [\"rtn\"]", "methods = []"), "grid"),
        ("zero calibration samples", base.replace("samples = 4", "samples = 0"), "calibration.samples"),
        ("duplicate model", format!("{base}\n[[models]]\nname = \"tiny\"\npath = \"x\"\n"), "defined twice"),
        ("unknown figure", format!("{base}\n[outputs]\nfigures = [\"pie\"]\n"), "outputs.figures"),
        ("missing grid", base[..base.find("[grid]").unwrap_or(base.len())].to_string(), "missing field `grid`"),
        ("static per-token language ranges", format!("{base}\n[quant]\nlanguage_act = {{ granularity = {{ kind = \"per_token\" }}, range = \"static\" }}\n"), "quant.language_act"),
        ("unknown device", base.replace("threads = 1", "threads = 1\ndevice = \"tpu\""), "device"),
        ("not TOML", "[experiment\nname=".to_string(), "rel.toml"),
    ];
    assert!(cases.len() >= 30);
    for (case, text, culprit) in &cases {
        let path = tmp.0.join("rel.toml");
        std::fs::write(&path, text).expect("write config");
        let out = experiments(&[path.to_str().expect("utf8"), "--dry-run"]);
        assert_rejected(&out, culprit, case);
        if !culprit.contains("rel.toml") {
            assert_rejected(&out, "rel.toml", case);
        }
    }
    // Paths are checked when a run starts (a dry run works without the data).
    let path = tmp.0.join("rel.toml");
    std::fs::write(
        &path,
        base.replace("batch_size = 12", "batch_size = 12\npath = \"/nonexistent/easy-vqa\""),
    )
    .expect("write");
    let out = experiments(&[path.to_str().expect("utf8")]);
    assert_rejected(&out, "dataset.path", "missing dataset path");
    std::fs::write(&path, base.replace("models/tiny-llava", "models/no-such-model"))
        .expect("write");
    let out = experiments(&[path.to_str().expect("utf8")]);
    assert_rejected(&out, "models.path", "missing model directory");
    // A group size that does not divide a layer's width is refused before any cell runs.
    let path = tmp.0.join("rel.toml");
    std::fs::write(&path, format!("{base}\n[quant]\nweight_group = 50\n")).expect("write");
    let out = experiments(&[path.to_str().expect("utf8")]);
    assert_rejected(&out, "quant.weight_group", "group size");
    assert!(
        !results.join("cells").read_dir().map(|mut d| d.next().is_some()).unwrap_or(false),
        "no cell ran"
    );
}

/// A copy of a fixture checkpoint with its model.safetensors edited.
fn broken_checkpoint(
    tmp: &Path,
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let src = fixtures().join("hf_mha_mlp");
    for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    let st = SafetensorsFile::open(&src.join("model.safetensors")).expect("open");
    let mut tensors: BTreeMap<String, Tensor> =
        st.names().map(|n| (n.to_string(), st.read(n).expect("read"))).collect();
    edit(&mut tensors);
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    write_safetensors(&dir.join("model.safetensors"), &list, &BTreeMap::new()).expect("write");
    dir
}

fn generate(model: &Path, image: &Path) -> Output {
    experiments(&[
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--prompt",
        "what color?",
        "--max-new-tokens",
        "2",
    ])
}

/// A PNG header declaring `w`×`h` pixels (valid signature, IHDR with a correct CRC, no data).
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png
}

#[test]
fn broken_checkpoints_and_images_are_refused_naming_the_culprit() {
    let tmp = Scratch::new("ckpt");
    let image = fixtures().join("image_rgb.png");
    let up = "language_model.model.layers.1.mlp.up_proj.weight";
    let norm = "language_model.model.layers.0.input_layernorm.weight";
    let cpu = (Kind::Float, tch::Device::Cpu);
    let mut n = 0;
    let mut check = |out: Output, culprit: &str, case: &str| {
        assert_rejected(&out, culprit, case);
        n += 1;
    };
    let d = broken_checkpoint(&tmp.0, "missing", |t| {
        t.remove(up);
    });
    check(generate(&d, &image), up, "missing tensor");
    let d = broken_checkpoint(&tmp.0, "unused", |t| {
        t.insert(
            "language_model.model.layers.0.mlp.extra.weight".into(),
            Tensor::zeros([2, 2], cpu),
        );
    });
    check(generate(&d, &image), "language_model.model.layers.0.mlp.extra.weight", "unused tensor");
    let d = broken_checkpoint(&tmp.0, "shape", |t| {
        t.insert(norm.into(), Tensor::ones([1], cpu));
    });
    check(generate(&d, &image), norm, "wrong shape that would broadcast");
    let d = broken_checkpoint(&tmp.0, "shape2", |t| {
        t.insert(up.into(), Tensor::ones([64, 31], cpu));
    });
    check(generate(&d, &image), up, "wrong shape");
    let d = broken_checkpoint(&tmp.0, "trunc", |_| {});
    let bytes = std::fs::read(d.join("model.safetensors")).expect("read");
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 3]).expect("write");
    check(generate(&d, &image), "model.safetensors", "truncated safetensors");
    std::fs::write(d.join("model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
        .expect("write");
    check(generate(&d, &image), "model.safetensors", "garbage safetensors");
    let d = tmp.0.join("shards");
    std::fs::create_dir_all(&d).expect("dir");
    for e in std::fs::read_dir(fixtures().join("hf_prefixed_sharded")).expect("dir").flatten() {
        std::fs::copy(e.path(), d.join(e.file_name())).expect("copy");
    }
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).expect("rm");
    check(generate(&d, &image), "model-00002-of-00002.safetensors", "index names a missing shard");
    let d = broken_checkpoint(&tmp.0, "noconfig", |_| {});
    std::fs::remove_file(d.join("config.json")).expect("rm");
    check(generate(&d, &image), "config.json", "missing config.json");
    std::fs::write(d.join("config.json"), "{ not json").expect("write");
    check(generate(&d, &image), "config.json", "invalid config.json");
    let text = std::fs::read_to_string(fixtures().join("hf_mha_mlp/config.json")).expect("read");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    cfg["text_config"]["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(d.join("config.json"), cfg.to_string()).expect("write");
    check(generate(&d, &image), "num_key_value_heads", "heads that do not divide");
    cfg["text_config"]["num_key_value_heads"] = serde_json::json!("four");
    std::fs::write(d.join("config.json"), cfg.to_string()).expect("write");
    check(generate(&d, &image), "num_key_value_heads", "wrong config type");
    let d = broken_checkpoint(&tmp.0, "tok", |_| {});
    std::fs::remove_file(d.join("tokenizer.json")).expect("rm");
    check(generate(&d, &image), "tokenizer.json", "missing tokenizer");
    std::fs::write(d.join("tokenizer.json"), "{\"model\": 1}").expect("write");
    check(generate(&d, &image), "tokenizer.json", "corrupt tokenizer");
    // Images.
    let good = fixtures().join("hf_mha_mlp");
    check(generate(&good, &tmp.0.join("nope.png")), "nope.png", "missing image");
    let empty = tmp.0.join("empty.png");
    std::fs::write(&empty, b"").expect("write");
    check(generate(&good, &empty), "empty.png", "empty image");
    let text_file = tmp.0.join("text.png");
    std::fs::write(&text_file, "this is not an image").expect("write");
    check(generate(&good, &text_file), "text.png", "not an image");
    let huge = tmp.0.join("huge.png");
    std::fs::write(&huge, png_header(30_000, 30_000)).expect("write");
    check(generate(&good, &huge), "huge.png", "very large image");
    assert!(n >= 17);
    // Grayscale and RGBA images are not errors: converted to RGB as PIL does.
    for ok in ["image_gray.png", "image_rgba.png"] {
        let out = generate(&good, &fixtures().join(ok));
        assert!(out.status.success(), "{ok}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A miniature easy-VQA folder: `questions` per split, two real images each.
fn mini_dataset(dir: &Path, train: &str, test: &str) {
    let src = easy_vqa_data();
    std::fs::copy(src.join("answers.txt"), dir.join("answers.txt")).expect("answers");
    for (split, questions) in [("train", train), ("test", test)] {
        let images = dir.join(split).join("images");
        std::fs::create_dir_all(&images).expect("dir");
        for id in 0..2 {
            std::fs::copy(
                src.join(split).join("images").join(format!("{id}.png")),
                images.join(format!("{id}.png")),
            )
            .expect("copy");
        }
        std::fs::write(dir.join(split).join("questions.json"), questions).expect("write");
    }
}

#[test]
fn broken_datasets_are_refused_naming_the_file_and_entry() {
    let tmp = Scratch::new("data");
    let good =
        r#"[["what color is the shape?", "blue", 0], ["what shape is present?", "circle", 1]]"#;
    let cases = [
        ("malformed questions file", "[[\"what\", ", "questions.json"),
        ("wrong arity", r#"[["what color is the shape?", "blue"]]"#, "entry 0"),
        ("missing image", r#"[["what color is the shape?", "blue", 7]]"#, "7.png"),
        ("empty split", "[]", "no questions"),
        ("unknown answer", r#"[["what color is the shape?", "purple", 0]]"#, "entry 0"),
        ("wrong types", r#"[["what color is the shape?", 3, 0]]"#, "answer is not a string"),
    ];
    for (case, test, culprit) in cases {
        let data = tmp.0.join(case.replace(' ', "_"));
        std::fs::create_dir_all(&data).expect("dir");
        mini_dataset(&data, good, test);
        let cfg = tmp.0.join("rel.toml");
        std::fs::write(&cfg, base_config(&tmp.0.join("results"), Some(&data))).expect("write");
        let out = experiments(&[cfg.to_str().expect("utf8")]);
        assert_rejected(&out, culprit, case);
    }
}

/// Every cell folder's `metrics.csv` (`<incomplete>` where it has none yet), and every other file
/// in `cells/` (locks) as `<file>`.
fn metric_files(results: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(results.join("cells")).expect("cells").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !e.path().is_dir() {
            out.insert(name, "<file>".into());
            continue;
        }
        let metrics = e.path().join("metrics.csv");
        out.insert(
            name,
            std::fs::read_to_string(&metrics).unwrap_or_else(|_| "<incomplete>".into()),
        );
    }
    out
}

#[test]
fn killed_runs_resume_exactly_and_identical_configs_give_identical_metrics() {
    let tmp = Scratch::new("kill");
    let cfg_text = |results: &Path| {
        base_config(results, None)
            .replace("methods = [\"rtn\"]", "methods = [\"rtn\", \"sequential\"]")
    };
    // Reference: one uninterrupted run.
    let a = tmp.0.join("a");
    let cfg_a = tmp.0.join("a.toml");
    std::fs::write(&cfg_a, cfg_text(&a)).expect("write");
    let out = experiments(&[cfg_a.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = metric_files(&a);
    assert_eq!(reference.len(), 3, "FP + two methods");
    // The same config again, killed with SIGKILL at several points, then finished.
    let b = tmp.0.join("b");
    let cfg_b = tmp.0.join("b.toml");
    std::fs::write(&cfg_b, cfg_text(&b)).expect("write");
    let mut rng = qvlm_core::rng::SplitMix64::new(42);
    for _ in 0..4 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_experiments"))
            .arg(&cfg_b)
            .current_dir(root())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(300 + rng.below(4000) as u64));
        let _ = child.kill();
        let _ = child.wait();
        // Nothing half-written is ever read as complete.
        for (cell, metrics) in metric_files(&b) {
            if !cell.contains(".tmp-") && !cell.ends_with(".lock") {
                assert_eq!(Some(&metrics), reference.get(&cell), "{cell} complete but different");
            }
        }
    }
    let out = experiments(&[cfg_b.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = metric_files(&b);
    assert_eq!(resumed, reference, "every cell exactly once, byte-identical metrics, no lock left");
}

/// The cell ids a run's stdout says it ran (`ran N cells: a b c`).
fn ran_cells(out: &Output) -> Vec<String> {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("ran "))
        .unwrap_or_else(|| panic!("no `ran` line:\n{text}"));
    line.split_once(": ")
        .map(|(_, ids)| {
            ids.split(';').next().unwrap_or_default().split_whitespace().map(String::from).collect()
        })
        .unwrap_or_default()
}

/// Starts `experiments` with each argument list at the same moment; their outputs, in order.
fn at_once(runs: &[Vec<String>]) -> Vec<Output> {
    let children: Vec<_> = runs
        .iter()
        .map(|args| {
            Command::new(env!("CARGO_BIN_EXE_experiments"))
                .args(args)
                .current_dir(root())
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().expect("wait")).collect()
}

#[test]
fn shards_and_runs_started_at_once_on_one_folder_run_every_cell_exactly_once() {
    let tmp = Scratch::new("shards");
    let cfg_text = |results: &Path| {
        base_config(results, None)
            .replace("methods = [\"rtn\"]", "methods = [\"rtn\", \"sequential\"]")
            .replace("bits = [\"W4A4\"]", "bits = [\"W4A4\", \"W8A8\"]")
    };
    let config = |name: &str| {
        let results = tmp.0.join(name);
        let path = tmp.0.join(format!("{name}.toml"));
        std::fs::write(&path, cfg_text(&results)).expect("write");
        (results, path.to_str().expect("utf8").to_string())
    };
    // Reference: one process.
    let (a, cfg_a) = config("a");
    let out = experiments(&[&cfg_a]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = metric_files(&a);
    let mut all = ran_cells(&out);
    all.sort();
    assert_eq!(all.len(), 5, "FP + 2 methods x 2 bit widths");
    assert_eq!(reference.keys().cloned().collect::<Vec<_>>(), all);
    // Two shards, and two whole-grid runs, started at the same moment on one folder each.
    for (name, args) in
        [("shards", [vec!["--shard", "0/2"], vec!["--shard", "1/2"]]), ("whole", [vec![], vec![]])]
    {
        let (results, cfg) = config(name);
        let runs: Vec<Vec<String>> = args
            .iter()
            .map(|extra| {
                std::iter::once(cfg.clone()).chain(extra.iter().map(|s| s.to_string())).collect()
            })
            .collect();
        let outs = at_once(&runs);
        let mut ran = Vec::new();
        for out in &outs {
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
            ran.extend(ran_cells(out));
        }
        ran.sort();
        assert_eq!(ran, all, "{name}: every cell run by exactly one of the processes");
        assert_eq!(metric_files(&results), reference, "{name}: the cells of one run, no lock left");
        assert!(results.join("report.md").is_file(), "{name}: the last to finish wrote the report");
        let report = std::fs::read_to_string(results.join("report.md")).expect("report");
        assert!(!report.contains("Incomplete"), "{name}: {report}");
    }
}

#[test]
fn a_shard_leaves_the_rest_and_report_names_the_missing_cells() {
    let tmp = Scratch::new("report");
    let results = tmp.0.join("results");
    let cfg = tmp.0.join("rel.toml");
    let text = base_config(&results, None)
        .replace("methods = [\"rtn\"]", "methods = [\"rtn\", \"sequential\"]");
    std::fs::write(&cfg, text).expect("write");
    let cfg = cfg.to_str().expect("utf8");
    // The dry run of a shard lists just its cells.
    let out = experiments(&[cfg, "--shard", "1/2", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("shard 1/2: 1 of the grid's 3 cells"), "{text}");
    let out = experiments(&[cfg, "--shard", "1/2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ran_cells(&out).len(), 1);
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 of 3 cells missing"));
    assert!(
        !results.join("report.md").exists(),
        "an incomplete shard leaves the report to `report`"
    );
    let out = experiments(&["report", cfg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("missing (2):"), "{text}");
    let report = std::fs::read_to_string(results.join("report.md")).expect("report");
    assert!(report.contains("Incomplete: 2 cells"), "{report}");
    // The Slurm array task environment picks the shard; a bad shard is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args([cfg, "--dry-run"])
        .env("SLURM_ARRAY_TASK_ID", "0")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains("shard 0/3: 1 of the grid's 3 cells"));
    assert_rejected(&experiments(&[cfg, "--shard", "2/2"]), "not a shard", "shard out of range");
    assert_rejected(&experiments(&[cfg, "--cell", "abc"]), "`abc`", "unknown cell");
}

#[test]
fn a_cell_locked_by_a_dead_task_elsewhere_is_taken_over_after_its_lease() {
    let tmp = Scratch::new("lease");
    let results = tmp.0.join("results");
    let cfg = tmp.0.join("rel.toml");
    std::fs::write(&cfg, base_config(&results, None)).expect("write");
    let cfg = cfg.to_str().expect("utf8");
    let out = experiments(&[cfg, "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let ids: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("  ")).map(|l| &l[..12]).collect();
    assert_eq!(ids.len(), 2, "{text}");
    // A task on another host locked the first cell and died: nothing here can see its pid, so
    // the lock is live until its 3 s lease runs out without a heartbeat.
    std::fs::create_dir_all(results.join("cells")).expect("cells");
    let holder = r#"{"host":"node-elsewhere","pid":1,"token":"t","job":"7_0","lease_seconds":3.0}"#;
    std::fs::write(results.join("cells").join(format!("{}.lock", ids[0])), holder).expect("lock");
    let start = std::time::Instant::now();
    let out = experiments(&[cfg, "--lease-seconds", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(start.elapsed() >= Duration::from_secs(3), "waited for the lease");
    let mut ran = ran_cells(&out);
    ran.sort();
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(ran, want);
    assert!(!results.join("cells").join(format!("{}.lock", ids[0])).exists());
}

#[test]
fn unwritable_results_folders_are_reported() {
    let tmp = Scratch::new("lock");
    let cfg = tmp.0.join("rel.toml");
    std::fs::write(&cfg, base_config(Path::new("/proc/qvlm-results"), None)).expect("write");
    let out = experiments(&[cfg.to_str().expect("utf8")]);
    assert_rejected(&out, "/proc/qvlm-results", "unwritable results folder");
}

/// A model retrained or replaced at the same path: its done cells are not skipped as if they
/// were its results (a cell's id hashes the model's path, not its weights); the run stops naming
/// the cell and the path, and nothing of the earlier results is touched.
#[test]
fn a_model_changed_at_its_path_is_not_taken_for_the_one_its_cells_ran_on() {
    let tmp = Scratch::new("changed");
    let model = tmp.0.join("model");
    std::fs::create_dir_all(&model).expect("dir");
    for entry in std::fs::read_dir(root().join("models/tiny-llava")).expect("tiny").flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), model.join(entry.file_name())).expect("copy");
        }
    }
    let results = tmp.0.join("r");
    let cfg = tmp.0.join("c.toml");
    let text = base_config(&results, None).replace(
        &root().join("models/tiny-llava").display().to_string(),
        &model.display().to_string(),
    );
    std::fs::write(&cfg, text).expect("write");
    let cfg = cfg.to_str().expect("utf8");
    let out = experiments(&[cfg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = metric_files(&results);
    assert_eq!(before.len(), 2, "FP + rtn");
    let out = experiments(&[cfg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ran_cells(&out).is_empty(), "the same model: every cell skipped");
    // "Retrained": one weight's lowest mantissa byte changed.
    let weights = model.join("model.safetensors");
    let original = std::fs::read(&weights).expect("read");
    let mut changed = original.clone();
    let at = changed.len() - 4;
    changed[at] ^= 1;
    std::fs::write(&weights, &changed).expect("write");
    let out = experiments(&[cfg]);
    assert_rejected(&out, "has changed since it ran", "a changed model");
    assert_rejected(&out, &model.display().to_string(), "a changed model");
    // Nor are the tables built from them (the report job of a Slurm array, a shard's last run).
    let out = experiments(&["report", cfg]);
    assert_rejected(&out, "has changed since it ran", "report on a changed model");
    assert_eq!(metric_files(&results), before, "the earlier results are untouched");
    // The model it ran on, restored: skipped again.
    std::fs::write(&weights, &original).expect("restore");
    let out = experiments(&[cfg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ran_cells(&out).is_empty());
}
