//! After a run: the figures (from the tables only) and the "paper vs this run" report.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use polars::prelude::DataFrame;

use crate::config::{paper_dir, Benchmark, Config, Figure};
use crate::figure;
use crate::results::ResultsDir;
use crate::table::{self, Tables};

/// Draws the configured figures and writes `report.md`.
/// `missing` lists the grid's unfinished cells (`<id> <title>`), named at the top of the report.
pub fn write_all(
    cfg: &Config,
    tables: &Tables,
    results: &ResultsDir,
    missing: &[String],
) -> Result<()> {
    let figures = results.figures()?;
    for &fig in &cfg.outputs.figures {
        draw(fig, cfg, tables, results, &figures)
            .with_context(|| format!("figure {}", fig.name()))?;
    }
    paper_report(cfg, tables, missing, &results.report())
}

/// `column` of the `cells` table by `key_column` (first row per key).
fn by_key(cells: &DataFrame, key_column: &str, column: &str) -> Result<BTreeMap<String, String>> {
    let (keys, values) = (table::strings(cells, key_column)?, table::strings(cells, column)?);
    let mut out = BTreeMap::new();
    for (k, v) in keys.into_iter().zip(values) {
        out.entry(k).or_insert(v);
    }
    Ok(out)
}

fn draw(
    fig: Figure,
    cfg: &Config,
    tables: &Tables,
    results: &ResultsDir,
    out: &Path,
) -> Result<()> {
    let summary = &tables.summary;
    let labels = by_key(&tables.cells, "model", "model_label")?;
    let grid_bits: Vec<String> = cfg.grid.bits.iter().map(|b| b.label()).collect();
    let name = fig.name();
    let (models, bits, methods) = (
        table::strings(summary, "model")?,
        table::strings(summary, "bits")?,
        table::strings(summary, "method")?,
    );
    let acc = table::floats(summary, "accuracy")?;
    let acc_std = table::floats(summary, "accuracy_std")?;
    // The summary row of (model, bits, method); the float reference is the row with bits "FP".
    let row = |model: &str, b: &str, method: &str| {
        (0..models.len()).find(|&i| models[i] == model && bits[i] == b && methods[i] == method)
    };
    let accuracy = |model: &str, b: &str, method: &str| row(model, b, method).and_then(|i| acc[i]);
    let float = |model: &str| {
        (0..models.len()).find(|&i| models[i] == model && bits[i] == "FP").and_then(|i| acc[i])
    };
    match fig {
        // Reads the cells' timings as well as the tables.
        Figure::CostScaling => crate::scaling::write(tables, results, out)?,
        Figure::SensitivityHeatmap => {
            for model in cfg.grid.models.iter() {
                let values: Vec<Vec<Option<f64>>> = grid_bits
                    .iter()
                    .map(|b| cfg.grid.methods.iter().map(|m| accuracy(model, b, m)).collect())
                    .collect();
                let stds: Vec<Vec<Option<f64>>> = grid_bits
                    .iter()
                    .map(|b| {
                        cfg.grid
                            .methods
                            .iter()
                            .map(|m| row(model, b, m).and_then(|i| acc_std[i]))
                            .collect()
                    })
                    .collect();
                let float = float(model);
                let title = format!(
                    "{} — accuracy (%) by bits and activation ranges (float {})",
                    labels.get(model).cloned().unwrap_or_default(),
                    float.map_or("–".into(), |f| format!("{f:.1}"))
                );
                figure::heatmap(
                    &out.join(format!("{name}_{model}")),
                    &title,
                    &grid_bits,
                    &cfg.grid.methods,
                    &values,
                    &stds,
                )?;
            }
        }
        Figure::AccuracyByMethod => {
            for model in cfg.grid.models.iter() {
                let float = float(model);
                let series: Vec<figure::BarSeries> = grid_bits
                    .iter()
                    .map(|b| {
                        let of = |col: &[Option<f64>]| -> Vec<Option<f64>> {
                            cfg.grid
                                .methods
                                .iter()
                                .map(|m| row(model, b, m).and_then(|i| col[i]))
                                .collect()
                        };
                        (b.clone(), of(&acc), of(&acc_std))
                    })
                    .collect();
                let title = format!(
                    "{} — accuracy by method (whiskers: ± std over seeds)",
                    labels.get(model).cloned().unwrap_or_default()
                );
                figure::grouped_bars(
                    &out.join(format!("{name}_{model}")),
                    &title,
                    "accuracy (%)",
                    &cfg.grid.methods,
                    &series,
                    float.map(|f| ("float".to_string(), f)),
                )?;
            }
        }
        Figure::AccuracyVsSweep => {
            // One plot per (model, sweep axis): accuracy against the methods' sweep values, one
            // line per bit-width.
            let c = &tables.cells;
            let (c_models, c_bits, c_methods) = (
                table::strings(c, "model")?,
                table::strings(c, "bits")?,
                table::strings(c, "method")?,
            );
            let (axis_of, value_of) =
                (table::strings(c, "sweep_axis")?, table::floats(c, "sweep_value")?);
            for model in cfg.grid.models.iter() {
                let float = float(model);
                // axis → bits → points (value, mean accuracy, std).
                let mut axes: BTreeMap<String, BTreeMap<String, figure::Points3>> = BTreeMap::new();
                let mut seen = std::collections::BTreeSet::new();
                for j in (0..c.height()).filter(|&j| &c_models[j] == model) {
                    let (Some(value), false) = (value_of[j], axis_of[j].is_empty()) else {
                        continue;
                    };
                    // One point per (bits, method), whatever its number of seeds.
                    if !seen.insert((c_bits[j].clone(), c_methods[j].clone())) {
                        continue;
                    }
                    if let Some(i) = row(model, &c_bits[j], &c_methods[j]) {
                        if let Some(a) = acc[i] {
                            axes.entry(axis_of[j].clone())
                                .or_default()
                                .entry(c_bits[j].clone())
                                .or_default()
                                .push((value, a, acc_std[i]));
                        }
                    }
                }
                for (axis, by_bits) in axes {
                    let series: Vec<figure::LineSeries3> = by_bits
                        .into_iter()
                        .map(|(b, mut pts)| {
                            pts.sort_by(|x, y| x.0.total_cmp(&y.0));
                            (b, pts)
                        })
                        .collect();
                    let title = format!(
                        "{} — accuracy vs {axis} (whiskers: ± std over seeds)",
                        labels.get(model).cloned().unwrap_or_default()
                    );
                    let safe: String = axis
                        .chars()
                        .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { ' ' })
                        .collect::<String>()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join("_");
                    figure::lines(
                        &out.join(format!("accuracy_vs_{safe}_{model}")),
                        &title,
                        &axis,
                        "accuracy (%)",
                        &series,
                        float.map(|f| ("float".to_string(), f)),
                    )?;
                }
            }
        }
        Figure::DedVsEntropy => {
            let ded = &tables.ded;
            let (d, e) = (table::floats(ded, "ded")?, table::floats(ded, "entropy")?);
            let (tower, block) = (table::strings(ded, "tower")?, table::floats(ded, "block")?);
            let corr = &tables.ded_correlations;
            let (c_tower, c_window, c_equal) = (
                table::strings(corr, "tower")?,
                table::strings(corr, "window")?,
                table::strings(corr, "joint_equals_layerwise")?,
            );
            let windows =
                (0..corr.height()).filter(|&i| c_tower[i] != "all" && c_window[i] != "all");
            let (n_windows, n_equal) =
                windows.fold((0, 0), |(n, k), i| (n + 1, k + usize::from(c_equal[i] == "yes")));
            let r = |pts: &[(f64, f64)], f: fn(&[(f64, f64)]) -> Option<f64>| {
                f(pts).map_or("n/a".into(), |r| format!("{r:.2}"))
            };
            // The permutation test's p of one layer's samples (independent points).
            let p = |pts: &[(f64, f64)], f: fn(&[(f64, f64)]) -> Option<f64>| {
                crate::stats::correlation_p(pts, f).map_or("n/a".into(), |p| format!("{p:.3}"))
            };
            let select = |keep: &dyn Fn(usize) -> bool| -> Vec<(f64, f64)> {
                (0..ded.height())
                    .filter(|&i| keep(i))
                    .filter_map(|i| Some((e[i]?, d[i]?)))
                    .collect()
            };
            let all = select(&|_| true);
            figure::scatter(
                &out.join("ded_vs_entropy"),
                &format!(
                    "DED vs dependency, windows pooled: Pearson {}, Spearman {}; joint = layer-wise in {n_equal}/{}",
                    r(&all, crate::stats::pearson),
                    r(&all, crate::stats::spearman),
                    n_windows
                ),
                "dependency over the window (nats, Eq. 6)",
                // (No "j": plotters drops it from rotated labels here.)
                "DED / float output energy",
                &all,
            )?;
            // The paper's view: one layer in the middle of the language model.
            let mut language_blocks: Vec<i64> = (0..ded.height())
                .filter(|&i| tower[i] == "language")
                .filter_map(|i| block[i].map(|b| b as i64))
                .collect();
            language_blocks.sort_unstable();
            language_blocks.dedup();
            if let Some(&middle) = language_blocks.get(language_blocks.len() / 2) {
                let layer = select(&|i| {
                    tower[i] == "language" && block[i].map(|b| b as i64) == Some(middle)
                });
                figure::scatter(
                    &out.join("ded_vs_entropy_middle_layer"),
                    &format!(
                        "Language layer {middle}: Pearson {} (p {}), Spearman {} (p {}), {} samples",
                        r(&layer, crate::stats::pearson),
                        p(&layer, crate::stats::pearson),
                        r(&layer, crate::stats::spearman),
                        p(&layer, crate::stats::spearman),
                        layer.len()
                    ),
                    "dependency over the layer (nats, Eq. 6)",
                    "DED / float output energy",
                    &layer,
                )?;
            }
        }
        Figure::DepthTradeoff => {
            let c = &tables.cells;
            let (c_models, c_bits, c_methods, depth) = (
                table::strings(c, "model")?,
                table::strings(c, "bits")?,
                table::strings(c, "method")?,
                table::floats(c, "max_depth")?,
            );
            let evals = table::floats(summary, "candidate_evaluations")?;
            let mut acc_pts = Vec::new();
            let mut cost_pts = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for j in 0..c.height() {
                let Some(depth) = depth[j] else { continue };
                // One point per (model, bits, method): the mean over its seeds.
                if !seen.insert((c_models[j].clone(), c_bits[j].clone(), c_methods[j].clone())) {
                    continue;
                }
                if let Some(i) = row(&c_models[j], &c_bits[j], &c_methods[j]) {
                    if let (Some(a), Some(e)) = (acc[i], evals[i]) {
                        acc_pts.push((depth, a, acc_std[i]));
                        cost_pts.push((depth, e));
                    }
                }
            }
            acc_pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            cost_pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            figure::dual_line(
                &out.join("depth_tradeoff"),
                "Accuracy and search cost vs maximum block depth",
                "maximum depth (sites per block)",
                ("accuracy (%; whiskers: ± std over seeds)", &acc_pts),
                ("candidate evaluations", &cost_pts),
            )?;
        }
    }
    Ok(())
}

/// Our rows beside the paper's, each labelled with the model and dataset behind it.
fn paper_report(cfg: &Config, tables: &Tables, missing: &[String], path: &Path) -> Result<()> {
    let summary = &tables.summary;
    let labels = by_key(&tables.cells, "model", "model_label")?;
    let method_labels = by_key(&tables.cells, "method", "method_label")?;
    let mut s = format!(
        "# {} — paper vs this run\n\n{}\n\n",
        cfg.experiment.name, cfg.experiment.description
    );
    if !missing.is_empty() {
        s.push_str(&format!(
            "**Incomplete: {} cells of the grid are not finished**; the tables below hold the \
             finished ones (`experiments report CONFIG` rebuilds them once the rest are in):\n\n",
            missing.len()
        ));
        for m in missing {
            s.push_str(&format!("- {m}\n"));
        }
        s.push('\n');
    }
    if !cfg.grid.skip.is_empty() {
        s.push_str("Left out of the grid by the config (`grid.skip`):\n\n");
        for r in &cfg.grid.skip {
            s.push_str(&format!("- {} on `{}`: {}\n", r.methods.join(", "), r.model, r.reason));
        }
        s.push('\n');
    }
    let (data, calib_source) = match cfg.dataset.benchmark {
        Benchmark::EasyVqa { validation: false, .. } => {
            ("easy-VQA test", "easy-VQA training (validation images excluded)")
        }
        Benchmark::EasyVqa { validation: true, .. } => (
            "easy-VQA validation (the train split's last 10 % of images)",
            "easy-VQA training (validation images excluded)",
        ),
        Benchmark::Scienceqa { calibrate_on_evaluated_split: false, .. } => {
            ("ScienceQA", "ScienceQA training")
        }
        Benchmark::Scienceqa { calibrate_on_evaluated_split: true, .. } => {
            ("ScienceQA", "evaluated-split (calibrate_on_evaluated_split)")
        }
        Benchmark::Vqa { .. } => ("the VQA question file", "evaluated-file"),
    };
    s.push_str(&format!(
        "This run: {} on {data} ({}), calibration {} {calib_source} pairs. \
         The paper: LLaVA on ScienceQA and others (see paper/README.md). Where the models and data \
         differ, the absolute numbers are not comparable; compare orderings and gaps.\n\n",
        cfg.grid
            .models
            .iter()
            .map(|m| labels.get(m).cloned().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.dataset
            .limit
            .map_or("every question of the split".to_string(), |l| format!("first {l} questions")),
        cfg.calibration.samples,
    ));
    let (models, bits, methods) = (
        table::strings(summary, "model")?,
        table::strings(summary, "bits")?,
        table::strings(summary, "method")?,
    );
    let acc = table::floats(summary, "accuracy")?;
    let evals = table::floats(summary, "candidate_evaluations")?;
    let deps = table::floats(summary, "dependency_evaluations")?;
    let seconds = table::floats(summary, "search_seconds")?;
    let acc_std = table::floats(summary, "accuracy_std")?;
    let mem = table::floats(summary, "weight_bytes")?;
    // Per-class accuracy (easy-VQA question types; ScienceQA's NAT/SOC/…): every `accuracy_*`
    // column of the summary with at least one value, in the summary's order.
    let mut classes = Vec::new();
    for c in summary.get_column_names() {
        if c.starts_with("accuracy_") && c.as_str() != "accuracy_std" {
            let v = table::floats(summary, c)?;
            if v.iter().any(Option::is_some) {
                classes.push((c.to_string(), v));
            }
        }
    }
    for name in &cfg.outputs.paper {
        let paper = table::read_csv(&paper_dir(cfg).join(format!("{name}.csv")))?;
        s.push_str(&table::markdown(&paper, &format!("Paper: {name} (LLaVA, as published)"), "")?);
        s.push('\n');
        let class_names: Vec<String> =
            classes.iter().map(|(c, _)| c.trim_start_matches("accuracy_").to_string()).collect();
        s.push_str(&format!(
            "### This run, same rows ({name})\n\nAccuracy: mean ± std over calibration seeds (per class: means). Search cost: candidate evaluations, the partition proxy's dependency evaluations, and wall seconds (mean per cell; this machine).\n\n| model | bits | method | accuracy |{} memory (MB) | candidate evaluations | dependency evaluations | search (s) |\n|---|---|---|---|{}---|---|---|---|\n",
            class_names.iter().map(|c| format!(" {c} |")).collect::<String>(),
            "---|".repeat(class_names.len()),
        ));
        let fmt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
        for i in 0..models.len() {
            let label =
                method_labels.get(&methods[i]).cloned().unwrap_or_else(|| methods[i].clone());
            let accuracy = match (acc[i], acc_std[i]) {
                (Some(a), Some(sd)) => format!("{a:.2} ± {sd:.2}"),
                (a, _) => fmt(a),
            };
            let count = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
            s.push_str(&format!(
                "| {} | {} | {} | {} |{} {} | {} | {} | {} |\n",
                labels.get(&models[i]).cloned().unwrap_or_default(),
                bits[i],
                label,
                accuracy,
                classes.iter().map(|(_, v)| format!(" {} |", fmt(v[i]))).collect::<String>(),
                mem[i].map_or("–".into(), |v| format!("{:.3}", v / 1e6)),
                count(evals[i]),
                count(deps[i]),
                seconds[i].map_or("–".into(), |v| format!("{v:.1}")),
            ));
        }
        s.push('\n');
    }
    s.push_str(&comparison_section(tables, &labels, &method_labels)?);
    s.push_str(&class_section(tables, &labels, &method_labels)?);
    if tables.ded_correlations.height() > 0 {
        s.push_str(&table::markdown(
            &tables.ded_correlations,
            "Fig. 2: dependency vs DED per sample",
            &format!(
                "Per calibration sample and window, searched for that sample alone: DED = (layer-wise − joint) error at the window's last site over its float output energy; dependency = the window's summed conditional entropies (Eq. 6). `joint_equals_layerwise`: every sample's joint choice equals its layer-wise one (DED = 0). {}",
                table::ded_test_note()
            ),
        )?);
        s.push('\n');
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// An accuracy over seeds as the comparison tables print it: "mean ± std", the mean alone
/// without a std (one seed), "–" without a value.
fn mean_std(mean: Option<f64>, std: Option<f64>) -> String {
    match (mean, std) {
        (Some(a), Some(sd)) => format!("{a:.2} ± {sd:.2}"),
        (Some(a), None) => format!("{a:.2}"),
        _ => "–".into(),
    }
}

/// The mark after a difference whose paired test is not significant (`significant` ≠ "yes"):
/// such a difference is printed but not claimed.
fn unclaimed(significant: &str) -> &'static str {
    if significant == "yes" {
        ""
    } else {
        " n.s."
    }
}

/// Table 2 with statistics (`tables/class_comparisons`), one table per model and bit width: per
/// row and question class, the class accuracy over seeds and the paired difference to its `vs`
/// row on that class's questions.
fn class_section(
    tables: &Tables,
    labels: &BTreeMap<String, String>,
    method_labels: &BTreeMap<String, String>,
) -> Result<String> {
    let c = &tables.class_comparisons;
    if c.height() == 0 {
        return Ok(String::new());
    }
    let text = |n: &str| table::strings(c, n);
    let num = |n: &str| table::floats(c, n);
    let (model, bits, method, vs, class, significant) = (
        text("model")?,
        text("bits")?,
        text("method")?,
        text("vs")?,
        text("class")?,
        text("significant")?,
    );
    let (acc, std, diff, p) = (num("accuracy")?, num("accuracy_std")?, num("diff")?, num("p")?);
    let label = |m: &str| method_labels.get(m).cloned().unwrap_or_else(|| m.to_string());
    let mut s = String::from(
        "## Table 2: the same rows per question class\n\nPer class: accuracy on the class's \
         questions, mean ± std over calibration seeds; Δ to the compared row on the same \
         questions, with its p from the paired bootstrap over images (\"n.s.\": p ≥ 0.05, not \
         claimed). Intervals: `tables/class_comparisons.csv`.\n",
    );
    // Per (model, bits): the classes in first-appearance order, then one line per row.
    let mut i = 0;
    while i < c.height() {
        let key = (&model[i], &bits[i]);
        let end = (i..c.height()).find(|&j| (&model[j], &bits[j]) != key).unwrap_or(c.height());
        let mut classes: Vec<&String> = Vec::new();
        for name in &class[i..end] {
            if !classes.contains(&name) {
                classes.push(name);
            }
        }
        s.push_str(&format!(
            "\n### {} — {}\n\n| row | vs |{}\n|---|---|{}\n",
            labels.get(key.0).cloned().unwrap_or_else(|| key.0.clone()),
            key.1,
            classes.iter().map(|c| format!(" {c} |")).collect::<String>(),
            "---|".repeat(classes.len())
        ));
        let mut j = i;
        while j < end {
            let row_end =
                (j..end).find(|&k| (&method[k], &vs[k]) != (&method[j], &vs[j])).unwrap_or(end);
            let mut line = format!(
                "| {} | {} |",
                label(&method[j]),
                if vs[j].is_empty() { "–".to_string() } else { label(&vs[j]) }
            );
            for name in &classes {
                let cell = (j..row_end).find(|&k| &class[k] == *name).map_or("–".into(), |k| {
                    let a = mean_std(acc[k], std[k]);
                    match (diff[k], p[k]) {
                        (Some(d), Some(pv)) => {
                            format!("{a} (Δ {d:+.2}, p {pv:.4}{})", unclaimed(&significant[k]))
                        }
                        _ => a,
                    }
                });
                line.push_str(&format!(" {cell} |"));
            }
            s.push_str(&line);
            s.push('\n');
            j = row_end;
        }
        i = end;
    }
    s.push('\n');
    Ok(s)
}

/// The controlled comparison (`outputs.rows`), one table per model and bit width: what each row
/// changes, its accuracy over seeds, and its paired test against the row it is compared with.
fn comparison_section(
    tables: &Tables,
    labels: &BTreeMap<String, String>,
    method_labels: &BTreeMap<String, String>,
) -> Result<String> {
    let c = &tables.comparisons;
    if c.height() == 0 {
        return Ok(String::new());
    }
    let text = |n: &str| table::strings(c, n);
    let num = |n: &str| table::floats(c, n);
    let (model, bits, method, vs, change, significant) = (
        text("model")?,
        text("bits")?,
        text("method")?,
        text("vs")?,
        text("change")?,
        text("significant")?,
    );
    let activations = text("activations")?;
    let (seeds, acc, std, diff, lo, hi, p) = (
        num("seeds")?,
        num("accuracy")?,
        num("accuracy_std")?,
        num("diff")?,
        num("ci_low")?,
        num("ci_high")?,
        num("p")?,
    );
    let label = |m: &str| method_labels.get(m).cloned().unwrap_or_else(|| m.to_string());
    let mut s = format!(
        "## Controlled comparison\n\nEach row differs from the row it is compared with by the one \
         change named. Accuracy: mean ± std over calibration seeds (n seeds). Δ: the mean \
         per-question difference to the compared row (each question averaged over seeds), with a \
         95 % interval and a two-sided p from a paired bootstrap over images ({} resamples); \
         differences with p ≥ {} are marked \"n.s.\" and are not claimed. Activations: each \
         tower's quantizer and whether an integer kernel executes it (per-channel scales lie \
         along the matmul's reduction dimension: fake-quant only).\n",
        crate::stats::RESAMPLES,
        crate::stats::ALPHA
    );
    let mut current = (String::new(), String::new());
    for i in 0..c.height() {
        if (model[i].clone(), bits[i].clone()) != current {
            current = (model[i].clone(), bits[i].clone());
            s.push_str(&format!(
                "\n### {} — {}\n\n| row | vs | change | activations | accuracy | Δ vs | 95 % interval | p |\n|---|---|---|---|---|---|---|---|\n",
                labels.get(&model[i]).cloned().unwrap_or_else(|| model[i].clone()),
                bits[i]
            ));
        }
        let accuracy = match acc[i] {
            Some(_) => format!("{} ({})", mean_std(acc[i], std[i]), seeds[i].unwrap_or(0.0)),
            None => "–".into(),
        };
        let (d, interval, pv) = match (diff[i], lo[i], hi[i], p[i]) {
            (Some(d), Some(l), Some(h), Some(pv)) => (
                format!("{d:+.2}{}", unclaimed(&significant[i])),
                format!("[{l:+.2}, {h:+.2}]"),
                format!("{pv:.4}"),
            ),
            _ => ("–".into(), "–".into(), "–".into()),
        };
        let vs_label = if vs[i].is_empty() { "–".into() } else { label(&vs[i]) };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {accuracy} | {d} | {interval} | {pv} |\n",
            label(&method[i]),
            vs_label,
            if change[i].is_empty() { "–" } else { &change[i] },
            activations[i]
        ));
    }
    s.push('\n');
    Ok(s)
}
