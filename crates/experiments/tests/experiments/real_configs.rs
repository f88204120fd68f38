//! Every config in `configs/real/` runs end to end (issue #21 item 4): the file as shipped, with
//! only its paths (model → a tiny transformers-written fixture of the same layout, Qwen2-VL and
//! Qwen2.5-VL → their parity checkpoints, dataset → the
//! synthetic data of `synthetic.rs`, results → a temporary folder) and sizes (calibration pairs,
//! batch, generation length, the weight group the 32-wide fixtures allow, threads) replaced;
//! methods, bits, activation settings, templates, prompt formats and outputs stay. Each run must
//! write every cell's metrics, the tables, the figures and the paper report.

use std::path::{Path, PathBuf};
use std::process::Command;

use toml::{Table, Value};

use super::synthetic::{self, root, VqaFiles};

/// llava-hf fixtures (three key layouts), taken in turn by the LLaVA-1.5 configs.
const HF_FIXTURES: [&str; 3] = ["hf_mha_mlp", "hf_gqa_full", "hf_prefixed_sharded"];
/// Original LLaVA (liuhaotian) layout with its CLIP directory, for the v1.3 configs.
const ORIGINAL_FIXTURE: &str = "original_linear";
/// Divides every width of the fixtures (32, 48, 64); the real configs' 128 does not.
const WEIGHT_GROUP: i64 = 16;
/// Every image question of the synthetic train split (VQA calibrates on its own questions).
const CALIBRATION_SAMPLES: usize = synthetic::SQA_TRAIN_IMAGES;
const _: () = assert!(synthetic::VQA_QUESTIONS >= CALIBRATION_SAMPLES);
const BATCH_SIZE: i64 = 2;
const MAX_NEW_TOKENS: i64 = 4;

fn fixture(name: &str) -> PathBuf {
    root().join("crates/core/tests/fixtures/llava").join(name)
}

/// The Qwen parity fixture of a Qwen2-VL / Qwen2.5-VL config's model path (issue #22), if it is
/// one.
fn qwen_fixture(path: Option<&str>) -> Option<PathBuf> {
    let path = path?.to_ascii_lowercase();
    let qwen = root().join("crates/core/tests/fixtures");
    if path.contains("qwen2.5-vl") || path.contains("qwen2_5_vl") {
        Some(qwen.join("qwen2_5_vl/tiny"))
    } else if path.contains("qwen2-vl") || path.contains("qwen2_vl") {
        Some(qwen.join("qwen2vl/tiny"))
    } else {
        None
    }
}

fn table<'a>(t: &'a mut Table, key: &str) -> &'a mut Table {
    t.get_mut(key).and_then(Value::as_table_mut).unwrap_or_else(|| panic!("no [{key}]"))
}

fn path_value(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// Replaces the paths and sizes of a real config; `hf_fixture` is used when the model is llava-hf.
fn shrink(text: &str, hf_fixture: &str, sqa: &Path, vqa: &VqaFiles, results: &Path) -> Table {
    let mut t: Table = text.parse().expect("toml");
    let e = table(&mut t, "experiment");
    e.insert("results_dir".into(), path_value(results));
    e.insert("threads".into(), Value::Integer(1));
    for m in t.get_mut("models").and_then(Value::as_array_mut).expect("[[models]]") {
        let m = m.as_table_mut().expect("model table");
        if m.contains_key("clip") {
            m.insert("path".into(), path_value(&fixture(ORIGINAL_FIXTURE)));
            m.insert("clip".into(), path_value(&fixture(ORIGINAL_FIXTURE).join("clip")));
        } else if let Some(qwen) = qwen_fixture(m.get("path").and_then(Value::as_str)) {
            m.insert("path".into(), path_value(&qwen));
        } else {
            m.insert("path".into(), path_value(&fixture(hf_fixture)));
        }
    }
    let d = table(&mut t, "dataset");
    match d.get("kind").and_then(Value::as_str) {
        Some("scienceqa") => {
            d.insert("path".into(), path_value(sqa));
        }
        Some("vqa") => {
            d.insert("questions".into(), path_value(&vqa.questions));
            d.insert("images".into(), path_value(&vqa.images));
            if d.contains_key("answers") {
                d.insert("answers".into(), path_value(&vqa.answers));
            }
        }
        other => panic!("dataset kind {other:?} has no synthetic data here"),
    }
    d.insert("batch_size".into(), Value::Integer(BATCH_SIZE));
    d.insert("max_new_tokens".into(), Value::Integer(MAX_NEW_TOKENS));
    let c = t.entry("calibration").or_insert_with(|| Value::Table(Table::new()));
    c.as_table_mut()
        .expect("[calibration]")
        .insert("samples".into(), Value::Integer(CALIBRATION_SAMPLES as i64));
    let q = t.entry("quant").or_insert_with(|| Value::Table(Table::new()));
    let q = q.as_table_mut().expect("[quant]");
    // 0 (per channel) stays; absent means the default (64), too wide as well.
    if q.get("weight_group").and_then(Value::as_integer) != Some(0) {
        q.insert("weight_group".into(), Value::Integer(WEIGHT_GROUP));
    }
    t
}

/// A path of the machine the config was written for, left in `v` (the test would read real data).
fn real_path(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.starts_with("models/") || s.starts_with("data/") => Some(s.clone()),
        Value::Array(a) => a.iter().find_map(real_path),
        Value::Table(t) => t.values().find_map(real_path),
        _ => None,
    }
}

fn strings(t: &Table, table: &str, key: &str) -> Vec<String> {
    let list = t.get(table).and_then(|v| v.get(key)).and_then(Value::as_array);
    list.map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Runs one shrunk config; `Err` says what is wrong.
fn run_and_check(name: &str, cfg: &Table, file: &Path, results: &Path) -> Result<(), String> {
    let out = Command::new(env!("CARGO_BIN_EXE_experiments"))
        .arg(file)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .map_err(|e| format!("{name}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("{name}: exit {}: {stderr}", out.status));
    }
    let fail = |what: String| Err(format!("{name}: {what}"));
    let (models, methods) = (strings(cfg, "grid", "models"), strings(cfg, "grid", "methods"));
    let bits = strings(cfg, "grid", "bits");
    let grid = cfg.get("grid").and_then(Value::as_table);
    let seeds = grid.and_then(|g| g.get("seeds")).and_then(Value::as_array).map_or(1, Vec::len);
    let float =
        usize::from(grid.and_then(|g| g.get("include_float")) != Some(&Value::Boolean(false)));
    let sqa =
        cfg.get("dataset").and_then(|d| d.get("kind")).and_then(Value::as_str) == Some("scienceqa");
    // Every cell finished with its metrics; a quantized one with its plan.
    let cells: Vec<PathBuf> = std::fs::read_dir(results.join("cells"))
        .map_err(|e| format!("{name}: cells: {e}"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    let want = models.len() * (float + bits.len() * methods.len() * seeds);
    if cells.len() != want {
        return fail(format!("{} cells, want {want}: {cells:?}", cells.len()));
    }
    let mut plans = 0;
    for c in &cells {
        let m = std::fs::read_to_string(c.join("metrics.csv")).unwrap_or_default();
        let mut need = vec!["accuracy,", "kl_vs_float,", "top1_agreement,"];
        if sqa {
            need.extend(["accuracy_IMG,", "accuracy_NAT,", "accuracy_G7-12,"]);
        }
        if let Some(missing) = need.iter().find(|n| !m.contains(*n)) {
            return fail(format!("{}: no {missing} in metrics.csv:\n{m}", c.display()));
        }
        plans += usize::from(c.join("plan.json").is_file());
    }
    if plans != want - models.len() * float {
        return fail(format!("{plans} plans, want {}", want - models.len() * float));
    }
    // Tables: one summary row per (model, bits, method), seeds averaged.
    let want = models.len() * (float + bits.len() * methods.len());
    for f in ["summary.csv", "summary.md", "metrics_long.csv", "cells.csv"] {
        if !results.join("tables").join(f).is_file() {
            return fail(format!("no tables/{f}"));
        }
    }
    let summary = std::fs::read_to_string(results.join("tables/summary.csv")).unwrap_or_default();
    if summary.lines().count() != 1 + want {
        return fail(format!("summary.csv has not {want} rows:\n{summary}"));
    }
    if sqa && !summary.lines().next().unwrap_or_default().contains(",accuracy_IMG,") {
        return fail(format!("summary.csv has no accuracy_IMG column:\n{summary}"));
    }
    for fig in strings(cfg, "outputs", "figures") {
        for model in &models {
            for ext in ["png", "svg"] {
                let f = results.join("figures").join(format!("{fig}_{model}.{ext}"));
                if !f.is_file() {
                    return fail(format!("no figure {}", f.display()));
                }
            }
        }
    }
    // The paper report: each paper table, then this run's same rows (ScienceQA: with its classes).
    let report = std::fs::read_to_string(results.join("report.md")).unwrap_or_default();
    for paper in strings(cfg, "outputs", "paper") {
        let ours = format!("### This run, same rows ({paper})");
        let Some(at) = report.find(&ours) else {
            return fail(format!("report.md has no `{ours}`:\n{report}"));
        };
        if !report.contains(&format!("Paper: {paper} ")) {
            return fail(format!("report.md does not quote paper/{paper}.csv"));
        }
        let header = report[at..].lines().find(|l| l.starts_with("| model |")).unwrap_or_default();
        if sqa && !header.contains(" IMG |") {
            return fail(format!("{paper}: this run's rows have no IMG column: {header}"));
        }
        let rows = report[at..].lines().skip_while(|l| !l.starts_with("|---")).skip(1);
        if rows.take_while(|l| l.starts_with('|')).count() != want {
            return fail(format!("{paper}: this run's rows are not the grid's {want}"));
        }
    }
    Ok(())
}

#[test]
fn every_real_config_runs_end_to_end_on_a_tiny_checkpoint() {
    let dir = std::env::temp_dir().join(format!("qvlm-real-configs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sqa = dir.join("data/scienceqa");
    synthetic::write_scienceqa(&sqa);
    let vqa = synthetic::write_vqa(&dir.join("data/vqa"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("configs/real"))
        .expect("configs/real")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 11, "{files:?}");
    let mut jobs = Vec::new();
    let mut hf = 0;
    for file in &files {
        let name = file.file_stem().and_then(|s| s.to_str()).expect("name").to_string();
        let text = std::fs::read_to_string(file).expect("config");
        let results = dir.join("results").join(&name);
        let cfg = shrink(&text, HF_FIXTURES[hf % HF_FIXTURES.len()], &sqa, &vqa, &results);
        let models = cfg.get("models").and_then(Value::as_array).expect("models");
        let llava_hf = |m: &Value| m.get("clip").is_none() && !m.to_string().contains("qwen");
        hf += usize::from(models.iter().any(llava_hf));
        if let Some(p) = real_path(&Value::Table(cfg.clone())) {
            panic!("{name}: path `{p}` of the real machine is not replaced");
        }
        let shrunk = dir.join(format!("{name}.toml"));
        std::fs::write(&shrunk, toml::to_string(&cfg).expect("toml")).expect("write config");
        jobs.push((name, cfg, shrunk, results));
    }
    // Two at a time (one thread each): the fixtures are tiny, the search dominates.
    let queue = std::sync::Mutex::new(jobs.iter());
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some((name, cfg, file, results)) = queue.lock().expect("queue").next() else {
                    break;
                };
                let start = std::time::Instant::now();
                let outcome = run_and_check(name, cfg, file, results);
                eprintln!("{name}: {:.1} s", start.elapsed().as_secs_f64());
                if let Err(e) = outcome {
                    failures.lock().expect("failures").push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().expect("failures");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
