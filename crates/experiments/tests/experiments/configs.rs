//! Every config in `configs/` (and `configs/real/`) parses and resolves.

use std::path::PathBuf;

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
                    let cells = experiments::config::cells(&cfg)
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    assert!(!cells.is_empty(), "{name}: no cells");
                    let mut ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    assert_eq!(ids.len(), cells.len(), "{name}: cell ids are unique");
                    for c in &cells {
                        if let (Some(spec), Some(bits)) = (&c.spec, c.bits) {
                            spec.scheme(bits, &c.quant).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                        }
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} configs found");
}
