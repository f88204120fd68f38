//! `experiments generate --model DIR` on a Qwen2-VL and a Qwen2.5-VL checkpoint: the tiny random
//! checkpoints of the core parity fixtures (python/gen_qwen2vl_fixtures.py,
//! python/gen_qwen2_5_vl_fixtures.py), answered as transformers answers them on both decode
//! paths; and
//! configs/qwen2vl-strategies.toml, every strategy on both through the grid runner.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures/qwen2vl/tiny")
}

fn generate(model: &Path, extra: &[&str]) -> Output {
    let image = fixture().join("image_1.png");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--prompt",
        "What color is the shape?",
        "--max-new-tokens",
        "8",
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run experiments")
}

#[test]
fn generate_answers_a_qwen2_vl_and_a_qwen2_5_vl_chat_like_transformers() {
    let qwen25 = fixture().join("../../qwen2_5_vl/tiny");
    for dir in [fixture(), qwen25] {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
        )
        .expect("json");
        let want = meta["chat_answer"].as_str().expect("answer");
        // Both decode paths give transformers' answer.
        for decode in ["libtorch", "fused"] {
            let out = generate(&dir, &["--decode", decode]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "generate failed on {}:\n{stderr}", dir.display());
            let answer = String::from_utf8_lossy(&out.stdout);
            assert_eq!(answer.trim_end_matches('\n'), want, "{} ({decode})", dir.display());
        }
    }
}

#[test]
fn llava_flags_on_a_qwen2_vl_checkpoint_are_errors() {
    let out = generate(&fixture(), &["--template", "vicuna_v1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("own chat template"), "{stderr}");
    // Another Qwen VLM is refused by name, not loaded as LLaVA.
    let dir = std::env::temp_dir().join(format!("qvlm-qwen25-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "qwen3_vl", "vision_config": {}}"#)
        .expect("write");
    let out = generate(&dir, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("qwen3_vl") && stderr.contains("model_type"), "{stderr}");
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// configs/qwen2vl-strategies.toml with its results in `results` and `edit` applied.
fn strategies_config(results: &Path, edit: impl FnOnce(&mut toml::Table)) -> PathBuf {
    let file = repo_root().join("configs/qwen2vl-strategies.toml");
    let mut cfg: toml::Table =
        toml::from_str(&std::fs::read_to_string(&file).expect("config")).expect("toml");
    let exp = cfg.get_mut("experiment").and_then(toml::Value::as_table_mut).expect("[experiment]");
    exp.insert("results_dir".into(), results.to_str().expect("utf8").into());
    edit(&mut cfg);
    let out = results.with_extension("toml");
    std::fs::write(&out, toml::to_string(&cfg).expect("toml")).expect("write config");
    out
}

fn run_config(file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_experiments"))
        .arg(file)
        .current_dir(repo_root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run experiments")
}

#[test]
fn the_qwen2_vl_config_runs_every_strategy_on_both_families() {
    let results = std::env::temp_dir().join(format!("qvlm-qwen2vl-grid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&results);
    let file = strategies_config(&results, |_| {});
    let out = run_config(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the grid failed:\n{stderr}");
    let cells: Vec<PathBuf> = std::fs::read_dir(results.join("cells"))
        .expect("cells")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    // Two models × (float + ten W4A4 methods).
    assert_eq!(cells.len(), 22, "{cells:?}");
    let mut searched = 0;
    for cell in &cells {
        let metrics = std::fs::read_to_string(cell.join("metrics.csv")).expect("metrics.csv");
        let value = |name: &str| -> Option<f64> {
            metrics.lines().find_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.get(4) == Some(&name)).then(|| f[5].parse().expect("number"))
            })
        };
        assert_eq!(value("questions"), Some(16.0), "{}", cell.display());
        assert!(value("kl_vs_float").is_some_and(f64::is_finite), "{}", cell.display());
        let config = std::fs::read_to_string(cell.join("config.json")).expect("config.json");
        assert!(config.contains("qwen2"), "{}: a Qwen cell", cell.display());
        if cell.join("plan.json").is_file() {
            let plan: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(cell.join("plan.json")).expect("plan"),
            )
            .expect("json");
            let sites = plan["sites"].as_array().expect("sites");
            // Two vision blocks and two decoder layers of four sites, the merger's two.
            assert_eq!(sites.len(), 18, "{}", cell.display());
            let manifest: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(cell.join("manifest.json")).expect("manifest"),
            )
            .expect("json");
            assert_eq!(manifest["calibration_samples_used"], 8, "{}", cell.display());
            let rotated = cell.join("config.json");
            let rotated = std::fs::read_to_string(rotated).expect("config").contains("hadamard");
            assert_eq!(plan["rotation"].is_object(), rotated, "{}", cell.display());
            if value("candidate_evaluations").is_some_and(|c| c > 0.0) {
                searched += 1;
            }
        }
    }
    // Every method but RTN searches something (ranges, scales or Hessian-ordered rounding).
    assert_eq!(searched, 18);
    let summary = std::fs::read_to_string(results.join("tables/summary.csv")).expect("summary");
    assert_eq!(summary.lines().count(), 1 + 22, "{summary}");
    let _ = std::fs::remove_dir_all(&results);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn llava_only_settings_on_a_qwen2_vl_model_are_errors() {
    let results = std::env::temp_dir().join(format!("qvlm-qwen2vl-bad-{}", std::process::id()));
    // Planted outliers are LLaVA's.
    let file = strategies_config(&results, |cfg| {
        let models = cfg.get_mut("models").and_then(toml::Value::as_array_mut).expect("models");
        let first = models[0].as_table_mut().expect("model");
        let spec = toml::toml! { channels = 4
        scale = 30.0
        seed = 0 };
        first.insert("outliers".into(), toml::Value::Table(spec));
    });
    let out = run_config(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("outliers") && stderr.contains("not defined for Qwen2-VL"), "{stderr}");
    // The paper's static per-token vision ranges need a fixed token count.
    let file = strategies_config(&results, |cfg| {
        let quant = cfg.get_mut("quant").and_then(toml::Value::as_table_mut).expect("[quant]");
        quant.insert(
            "vision_act".into(),
            toml::Value::Table(toml::toml! {
                granularity = { kind = "per_token" }
                range = "static"
            }),
        );
    });
    let out = run_config(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("different number of patches per image"), "{stderr}");
    let _ = std::fs::remove_dir_all(&results);
    let _ = std::fs::remove_file(&file);
}
