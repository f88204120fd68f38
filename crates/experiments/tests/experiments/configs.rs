//! Every config in `configs/` (and `configs/real/`) parses and resolves.

use std::path::PathBuf;

use experiments::grid::CellKind;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

#[test]
fn every_config_parses_and_resolves() {
    let dirs = [root().join("configs"), root().join("configs/real")];
    let mut checked = 0;
    for dir in dirs.iter().filter(|d| d.is_dir()) {
        for entry in std::fs::read_dir(dir).expect("configs").flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            match name.as_str() {
                "train-tiny.toml" | "train-tiny-qwen2vl.toml" => {
                    let cfg = experiments::tiny::train::load_config(&path)
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    assert!(cfg.train.lm_epochs > 0);
                }
                "train-tiny-trained-outliers.toml" => {
                    let cfg = experiments::tiny::trained_outliers::load_if_finetune(&path)
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"))
                        .unwrap_or_else(|| panic!("{name}: not read as a fine-tune config"));
                    assert!(cfg.outliers.language_scale > 1.0 && cfg.outliers.vision_scale > 1.0);
                }
                "efficiency.toml" | "efficiency-qwen2vl.toml" => {
                    let cfg = experiments::bench::config::load(&path)
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    assert!(!cfg.shapes().unwrap_or_else(|e| panic!("{name}: {e:#}")).is_empty());
                }
                _ => {
                    let cfg = experiments::config::load(&path)
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    let cells =
                        experiments::grid::cells(&cfg).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    assert!(!cells.is_empty(), "{name}: no cells");
                    let mut ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    assert_eq!(ids.len(), cells.len(), "{name}: cell ids are unique");
                    for c in &cells {
                        if let CellKind::Quantized { bits, method } = &c.kind {
                            method
                                .scheme(*bits, &c.quant)
                                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                        }
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} configs found");
}

/// Table 1's config as it was before the config became typed (its `[outputs]` aside, which no
/// cell id hashes), for the pinned ids below.
const ABLATION_BEFORE_TYPED_CONFIG: &str = r#"# Q-VLM's Table 1 (components: QLoRA / +CDM / +VEO / Q-VLM; memory, search cost, accuracy at
# W6A6 and W4A4) on the embedded tiny LLaVA trained on easy-VQA, plain and with planted outlier
# channels. Run: cargo run -p experiments -- configs/ablation.toml   (or: make reproduce)
[experiment]
name = "ablation"
description = "Q-VLM Table 1 (components) on the embedded tiny LLaVA, easy-VQA"
device = "auto"
threads = 2
seed = 0

[[models]]
name = "tiny-llava"
path = "MODEL"
label = "tiny LLaVA (1.6M, easy-VQA)"

[[models]]
name = "tiny-llava-outliers"
path = "MODEL"
outliers = { channels = 4, scale = 30.0, seed = 0 }
label = "tiny LLaVA with planted outliers (4 ch x30)"

[dataset]
kind = "easy_vqa"
limit = 1000
template = "llava_v1"
batch_size = 100

[calibration]
samples = 64

[quant]
weight_group = 64
vision_act = { granularity = { kind = "per_token" }, range = "static" }
language_act = { granularity = { kind = "per_channel" }, range = "static" }

[grid]
models = ["tiny-llava", "tiny-llava-outliers"]
bits = ["W6A6", "W4A4"]
methods = ["qlora", "cdm", "veo", "qvlm"]
"#;

/// A cell's id hashes its resolved settings; finished cells are found by it. Ids written by
/// earlier versions must stay valid unless what the cell computes changed, so these are pinned
/// (from runs before the config became typed): a change here re-runs every finished cell of
/// every results folder. The VEO cells' ids changed on purpose when VEO gained real Jacobian
/// weights, both towers' pairs, rounds and its start (their `veo` settings have new keys), and
/// again when η's default changed.
#[test]
fn cell_ids_of_settings_that_did_not_change_are_stable() {
    let dir = std::env::temp_dir().join(format!("qvlm-ids-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let before = dir.join("ablation.toml");
    let model = root().join("models/tiny-llava");
    std::fs::write(
        &before,
        ABLATION_BEFORE_TYPED_CONFIG.replace("MODEL", &model.display().to_string()),
    )
    .expect("write");
    // The model path is part of a cell's id: the pinned ids are those of `models/tiny-llava`
    // written relative to the repository root, as the shipped configs write it.
    let relative = ABLATION_BEFORE_TYPED_CONFIG.replace("MODEL", "models/tiny-llava");
    std::fs::write(&before, relative).expect("write");
    let before = before.to_str().expect("utf8").to_string();
    let pinned = [
        (before.as_str(), "tiny-llava FP fp", "f45fe2c084c6"),
        (before.as_str(), "tiny-llava W6A6 qlora", "32b37aa03707"),
        (before.as_str(), "tiny-llava W6A6 cdm", "d668ac872132"),
        (before.as_str(), "tiny-llava-outliers W4A4 qlora", "030ce2c9679e"),
        // Changed on purpose: when VEO's settings grew (then 2581c894cce9), and when η's default
        // became 0.1, chosen on the validation split (2026-12-04). Pinned from here on.
        (before.as_str(), "tiny-llava W6A6 veo", "563ce35368a5"),
        ("configs/real/llava-1.5-7b-sqa-img.toml", "llava-1.5-7b W4A4 qlora", "56f93612e550"),
        ("configs/real/llava-1.5-7b-vqav2.toml", "llava-1.5-7b W6A6 awq", "3de0c29fee37"),
    ];
    for (file, title, id) in pinned {
        let path = if file.starts_with('/') { PathBuf::from(file) } else { root().join(file) };
        let cfg = experiments::config::load(&path).expect(file);
        let cells = experiments::grid::cells(&cfg).expect(file);
        let cell = cells.iter().find(|c| c.title() == title).unwrap_or_else(|| panic!("{title}"));
        assert_eq!(cell.id, id, "{file}: {title}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
