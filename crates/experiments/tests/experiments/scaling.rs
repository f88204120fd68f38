//! Issue #21 item 3: the search's memory is bounded by the weights plus one block's calibration
//! activations, not by the model's depth. Two random-weight LLaVA checkpoints written by
//! transformers (`python/gen_scaling_series.py` sizes `d2` and `d8`: the same widths, 2 and 8
//! decoder layers) are searched with `sequential` (which walks every block), one process per
//! cell, and each cell's peak RSS during the search is checked against the README's formula:
//!
//!   peak RSS during the search ≤ 2 · model tensors + 3 · one block's activations + 768 MiB
//!
//! ([`experiments::scaling::memory_bound_bytes`]: the float model and the quantized copy of its
//! linears, [`experiments::scaling::ForwardShape::block_activation_bytes`], and the process's
//! baseline: libtorch, the tokenizer and dataset, the float reference, allocator slack). The depth
//! pair is what makes the test able to fail: a search that kept every block's activations would
//! add six more blocks' worth on `d8`, and the peak beyond the weights may grow from `d2` to `d8`
//! by at most one block's activations.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use super::synthetic::root;

const MIB: f64 = (1u64 << 20) as f64;

fn timings(cell: &Path) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(cell.join("timings.json")).expect("timings.json");
    serde_json::from_str(&text).expect("timings")
}

fn metric(cell: &Path, name: &str) -> f64 {
    let text = std::fs::read_to_string(cell.join("metrics.csv")).expect("metrics.csv");
    let line = text
        .lines()
        .find(|l| l.split(',').nth(4) == Some(name))
        .unwrap_or_else(|| panic!("{}: no metric {name}", cell.display()));
    line.rsplit(',').next().and_then(|v| v.parse().ok()).expect("a number")
}

#[test]
fn search_memory_is_bounded_by_weights_and_one_block_of_activations() {
    let dir = std::env::temp_dir().join(format!("qvlm-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let models = dir.join("models");
    let gen = Command::new(root().join(".venv/bin/python"))
        .args(["python/gen_scaling_series.py", "--sizes", "d2,d8", "--out"])
        .arg(&models)
        .current_dir(root())
        .output()
        .expect("python");
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let results = dir.join("results");
    let config = dir.join("memory.toml");
    std::fs::write(
        &config,
        format!(
            r#"[experiment]
name = "memory"
device = "cpu"
threads = 2
results_dir = "{results}"

[[models]]
name = "d2"
path = "{models}/d2"

[[models]]
name = "d8"
path = "{models}/d8"

[dataset]
kind = "easy_vqa"
template = "llava_v1"
batch_size = 2
limit = 2

[calibration]
samples = 4

[quant]
weight_group = 64

[grid]
models = ["d2", "d8"]
bits = ["W4A4"]
methods = ["sequential"]
"#,
            results = results.display(),
            models = models.display()
        ),
    )
    .expect("config");
    // One process per cell, in the grid's order (the float cell first, which caches the float
    // reference), as `make scaling` runs them: a process that ran earlier cells keeps their
    // freed memory, and its peak would not be the search's own.
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_experiments"))
            .arg(&config)
            .args(args)
            .current_dir(root())
            .env("RUST_LOG", "warn")
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let plan = run(&["--dry-run"]);
    let ids: Vec<&str> = plan
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.len() == 12 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert_eq!(ids.len(), 4, "two float and two sequential cells:\n{plan}");
    for id in ids {
        run(&["--cell", id]);
    }

    // (model tensors, block activations, peak RSS) per model.
    let mut by_model = BTreeMap::new();
    for e in std::fs::read_dir(results.join("cells")).expect("cells").flatten() {
        let cell = e.path();
        let t = timings(&cell);
        let Some(peak) = t.get("search_peak_rss_bytes") else { continue };
        let model = std::fs::read_to_string(cell.join("metrics.csv"))
            .expect("metrics")
            .lines()
            .nth(1)
            .and_then(|l| l.split(',').nth(1).map(str::to_string))
            .expect("model column");
        // The formula's constant was measured with the walk handing freed heap pages back
        // before each block (glibc's malloc_trim): the plan records that it did.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(metric(&cell, "heap_trims") > 0.0, "{model}: the search never trimmed the heap");
        let weights = t["search_model_tensor_bytes"];
        let block = metric(&cell, "block_activation_bytes");
        let peak = *peak;
        let bound = experiments::scaling::memory_bound_bytes(weights, block);
        eprintln!(
            "{model}: peak {:.1} MiB, weights {:.1} MiB, one block's activations {:.1} MiB, \
             bound {:.1} MiB",
            peak / MIB,
            weights / MIB,
            block / MIB,
            bound / MIB
        );
        assert!(peak <= bound, "{model}: the search's peak memory exceeds the bound");
        by_model.insert(model, (weights, block, peak));
    }
    let (w2, block, m2) = by_model["d2"];
    let (w8, _, m8) = by_model["d8"];
    // Six more layers add their weights (float and quantized copy) and nothing else that grows
    // with depth.
    assert!(
        (m8 - 2.0 * w8) - (m2 - 2.0 * w2) <= block + 32.0 * MIB,
        "peak memory beyond the weights grew with depth: d2 {:.1} MiB, d8 {:.1} MiB",
        (m2 - 2.0 * w2) / MIB,
        (m8 - 2.0 * w8) / MIB
    );
    let _ = std::fs::remove_dir_all(&dir);
}
