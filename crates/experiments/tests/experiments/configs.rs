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
                "train-tiny.toml" => {
                    let cfg = experiments::tiny::train::load_config(&path)
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    assert!(cfg.train.lm_epochs > 0);
                }
                "efficiency.toml" => {
                    let cfg = experiments::bench::config::load(&path)
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    let _ = cfg;
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

/// A cell's id hashes its resolved settings; finished cells are found by it. Ids written by
/// earlier versions must stay valid unless what the cell computes changed, so these are pinned
/// (from runs before the config became typed): a change here re-runs every finished cell of
/// every results folder. The VEO cells' ids changed on purpose when VEO gained real Jacobian
/// weights, both towers' pairs and rounds (their `veo` settings have new keys).
#[test]
fn cell_ids_of_the_shipped_configs_are_stable() {
    let pinned = [
        ("configs/ablation.toml", "tiny-llava FP fp", "f45fe2c084c6"),
        ("configs/ablation.toml", "tiny-llava W6A6 qlora", "32b37aa03707"),
        ("configs/ablation.toml", "tiny-llava W6A6 cdm", "d668ac872132"),
        ("configs/ablation.toml", "tiny-llava W6A6 veo", "fff848a1d113"),
        ("configs/table2_classes.toml", "tiny-llava W6A6 awq", "c8af54b152df"),
        ("configs/table2_classes.toml", "tiny-llava-outliers W4A4 qlora", "030ce2c9679e"),
        ("configs/real/llava-1.5-7b-sqa-img.toml", "llava-1.5-7b W4A4 qvlm", "4a7528e8879f"),
        ("configs/real/llava-1.5-7b-sqa-img.toml", "llava-1.5-7b W4A4 qlora", "56f93612e550"),
        ("configs/real/llava-1.5-7b-vqav2.toml", "llava-1.5-7b W6A6 awq", "3de0c29fee37"),
    ];
    for (file, title, id) in pinned {
        let cfg = experiments::config::load(&root().join(file)).expect(file);
        let cells = experiments::grid::cells(&cfg).expect(file);
        let cell = cells.iter().find(|c| c.title() == title).unwrap_or_else(|| panic!("{title}"));
        assert_eq!(cell.id, id, "{file}: {title}");
    }
}
