//! After a run: the tables (polars, from the cells' metric files only), the figures (from the
//! tables only) and the "paper vs this run" report.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use polars::prelude::DataFrame;

use crate::config::{model_labels, results_dir, Cell, Config};
use crate::figure;
use crate::run::cell_dir;
use crate::table;

/// Metrics of the summary table, in column order.
pub const SUMMARY_METRICS: [&str; 12] = [
    "accuracy",
    "accuracy_yes_no",
    "accuracy_shape",
    "accuracy_color",
    "kl_vs_float",
    "top1_agreement",
    "weight_bytes",
    "candidate_evaluations",
    "block_forwards",
    "model_passes",
    "groups",
    "mean_group_depth",
];

pub fn write_all(cfg: &Config, cells: &[Cell]) -> Result<()> {
    let dir = results_dir(cfg);
    let tables = dir.join("tables");
    let figures = dir.join("figures");
    std::fs::create_dir_all(&tables).with_context(|| format!("creating {}", tables.display()))?;
    std::fs::create_dir_all(&figures).with_context(|| format!("creating {}", figures.display()))?;
    let files: Vec<_> = cells
        .iter()
        .map(|c| cell_dir(cfg, &c.id).join("metrics.csv"))
        .filter(|p| p.is_file())
        .collect();
    let long = table::load_metrics(&files)?;
    let mut long_out = long.clone();
    table::write(
        &mut long_out,
        &tables.join("metrics_long.csv"),
        &tables.join("metrics_long.md"),
        "All metrics (long format)",
        "",
    )?;
    let mut summary = table::wide(&long, &SUMMARY_METRICS)?;
    let note = format!(
        "Embedded default: {}. Accuracy in %, on the evaluated questions; KL and top-1 agreement of the first answer token against the float model; weight_bytes as stored (quantized layers at their bit width with scales, the rest fp16); search cost as counted by the search.",
        cfg.experiment.description
    );
    table::write(
        &mut summary,
        &tables.join("summary.csv"),
        &tables.join("summary.md"),
        &format!("{} — summary", cfg.experiment.name),
        &note,
    )?;
    for fig in &cfg.outputs.figures {
        draw(fig, cfg, cells, &summary, &figures).with_context(|| format!("figure {fig}"))?;
    }
    paper_report(cfg, cells, &summary, &dir.join("report.md"))?;
    Ok(())
}

fn draw(fig: &str, cfg: &Config, cells: &[Cell], summary: &DataFrame, out: &Path) -> Result<()> {
    let labels = model_labels(cfg);
    let (models, bits, methods) = (
        table::strings(summary, "model")?,
        table::strings(summary, "bits")?,
        table::strings(summary, "method")?,
    );
    let acc = table::floats(summary, "accuracy")?;
    match fig {
        "sensitivity_heatmap" => {
            for model in cfg.grid.models.iter() {
                let values: Vec<Vec<Option<f64>>> = cfg
                    .grid
                    .bits
                    .iter()
                    .map(|b| {
                        cfg.grid
                            .methods
                            .iter()
                            .map(|m| {
                                (0..models.len())
                                    .find(|&i| {
                                        &models[i] == model && &bits[i] == b && &methods[i] == m
                                    })
                                    .and_then(|i| acc[i])
                            })
                            .collect()
                    })
                    .collect();
                let float = (0..models.len())
                    .find(|&i| &models[i] == model && bits[i] == "FP")
                    .and_then(|i| acc[i]);
                let title = format!(
                    "{} — accuracy (%) by bits and activation ranges (float {})",
                    labels.get(model).cloned().unwrap_or_default(),
                    float.map_or("–".into(), |f| format!("{f:.1}"))
                );
                figure::heatmap(
                    &out.join(format!("{fig}_{model}")),
                    &title,
                    &cfg.grid.bits,
                    &cfg.grid.methods,
                    &values,
                )?;
            }
        }
        "accuracy_by_method" => {
            for model in cfg.grid.models.iter() {
                let float = (0..models.len())
                    .find(|&i| &models[i] == model && bits[i] == "FP")
                    .and_then(|i| acc[i]);
                let series: Vec<(String, Vec<Option<f64>>)> = cfg
                    .grid
                    .bits
                    .iter()
                    .map(|b| {
                        let v = cfg
                            .grid
                            .methods
                            .iter()
                            .map(|m| {
                                (0..models.len())
                                    .find(|&i| {
                                        &models[i] == model && &bits[i] == b && &methods[i] == m
                                    })
                                    .and_then(|i| acc[i])
                            })
                            .collect();
                        (b.clone(), v)
                    })
                    .collect();
                let title = format!(
                    "{} — accuracy by method",
                    labels.get(model).cloned().unwrap_or_default()
                );
                figure::grouped_bars(
                    &out.join(format!("{fig}_{model}")),
                    &title,
                    "accuracy (%)",
                    &cfg.grid.methods,
                    &series,
                    float.map(|f| ("float".to_string(), f)),
                )?;
            }
        }
        "accuracy_vs_sweep" => {
            // One plot per (model, sweep axis): accuracy against the methods' sweep values, one
            // line per bit-width.
            for model in cfg.grid.models.iter() {
                let float = (0..models.len())
                    .find(|&i| &models[i] == model && bits[i] == "FP")
                    .and_then(|i| acc[i]);
                let mut axes: BTreeMap<String, BTreeMap<String, Vec<(f64, f64)>>> = BTreeMap::new();
                for c in cells.iter().filter(|c| &c.model.name == model) {
                    let (Some(spec), Some(b)) = (&c.spec, c.bits) else { continue };
                    let Some(sweep) = &spec.sweep else { continue };
                    let label = b.label();
                    let i = (0..models.len()).find(|&i| {
                        &models[i] == model && bits[i] == label && methods[i] == c.method
                    });
                    if let Some(a) = i.and_then(|i| acc[i]) {
                        axes.entry(sweep.axis.clone())
                            .or_default()
                            .entry(label)
                            .or_default()
                            .push((sweep.value, a));
                    }
                }
                for (axis, by_bits) in axes {
                    let series: Vec<(String, Vec<(f64, f64)>)> = by_bits
                        .into_iter()
                        .map(|(b, mut pts)| {
                            pts.sort_by(|x, y| x.0.total_cmp(&y.0));
                            (b, pts)
                        })
                        .collect();
                    let title = format!(
                        "{} — accuracy vs {axis}",
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
        "ded_vs_entropy" => {
            let mut points = Vec::new();
            for c in cells {
                let path = cell_dir(cfg, &c.id).join("ded.csv");
                if path.is_file() {
                    let df = table::read_csv(&path)?;
                    let (d, e) = (table::floats(&df, "ded")?, table::floats(&df, "entropy")?);
                    points.extend(d.iter().zip(&e).filter_map(|(d, e)| Some((((*e)?), (*d)?))));
                }
            }
            let r = figure::pearson(&points);
            let title = format!(
                "DED vs dependency entropy per sample (Pearson r = {})",
                r.map_or("n/a".into(), |r| format!("{r:.3}"))
            );
            figure::scatter(
                &out.join("ded_vs_entropy"),
                &title,
                "conditional entropy D (nats)",
                // (No "j": plotters drops it from rotated labels here.)
                "DED = layer-wise minus block-wise error",
                &points,
            )?;
        }
        "depth_tradeoff" => {
            let mut acc_pts = Vec::new();
            let mut cost_pts = Vec::new();
            for c in cells {
                let Some(spec) = &c.spec else { continue };
                let depth = match spec.strategy.base() {
                    qvlm_search::strategy::config::BaseStrategy::EntropyBlocked(b) => b.max_depth,
                    _ => continue,
                };
                let i = (0..models.len()).find(|&i| {
                    models[i] == c.model.name
                        && Some(bits[i].as_str()) == c.bits.map(|b| b.label()).as_deref()
                        && methods[i] == c.method
                });
                let evals = table::floats(summary, "candidate_evaluations")?;
                if let Some(i) = i {
                    if let (Some(a), Some(e)) = (acc[i], evals[i]) {
                        acc_pts.push((depth as f64, a));
                        cost_pts.push((depth as f64, e));
                    }
                }
            }
            acc_pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            cost_pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            figure::dual_line(
                &out.join("depth_tradeoff"),
                "Accuracy and search cost vs maximum block depth",
                "maximum depth (sites per block)",
                ("accuracy (%)", &acc_pts),
                ("candidate evaluations", &cost_pts),
            )?;
        }
        other => anyhow::bail!("unknown figure `{other}`"),
    }
    Ok(())
}

/// Our rows beside the paper's, each labelled with the model and dataset behind it.
fn paper_report(cfg: &Config, cells: &[Cell], summary: &DataFrame, path: &Path) -> Result<()> {
    let labels = model_labels(cfg);
    let method_labels: BTreeMap<String, String> = cells
        .iter()
        .filter_map(|c| c.spec.as_ref().map(|s| (c.method.clone(), s.label())))
        .collect();
    let mut s = format!(
        "# {} — paper vs this run\n\n{}\n\n",
        cfg.experiment.name, cfg.experiment.description
    );
    let (data, calib_source) = match cfg.dataset.kind {
        crate::config::DatasetKind::EasyVqa => ("easy-VQA test", "easy-VQA training"),
        crate::config::DatasetKind::Scienceqa => ("ScienceQA", "ScienceQA training"),
        crate::config::DatasetKind::Vqa => ("the VQA question file", "evaluated-file"),
    };
    s.push_str(&format!(
        "This run: {} on {data} (first {} questions), calibration {} {calib_source} pairs. \
         The paper: LLaVA on ScienceQA and others (see paper/README.md). Where the models and data \
         differ, the absolute numbers are not comparable; compare orderings and gaps.\n\n",
        cfg.grid
            .models
            .iter()
            .map(|m| labels.get(m).cloned().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.dataset.limit.map_or("all".to_string(), |l| l.to_string()),
        cfg.calibration.samples,
    ));
    let (models, bits, methods) = (
        table::strings(summary, "model")?,
        table::strings(summary, "bits")?,
        table::strings(summary, "method")?,
    );
    let acc = table::floats(summary, "accuracy")?;
    let evals = table::floats(summary, "candidate_evaluations")?;
    let mem = table::floats(summary, "weight_bytes")?;
    // Per-class accuracy (easy-VQA question types; ScienceQA's NAT/SOC/…): every `accuracy_*`
    // column of the summary with at least one value, in the summary's order.
    let mut classes = Vec::new();
    for c in summary.get_column_names() {
        if c.starts_with("accuracy_") {
            let v = table::floats(summary, c)?;
            if v.iter().any(Option::is_some) {
                classes.push((c.to_string(), v));
            }
        }
    }
    for name in &cfg.outputs.paper {
        let paper = table::read_csv(&crate::config::paper_dir(cfg).join(format!("{name}.csv")))?;
        s.push_str(&table::markdown(&paper, &format!("Paper: {name} (LLaVA, as published)"), "")?);
        s.push('\n');
        let class_names: Vec<String> =
            classes.iter().map(|(c, _)| c.trim_start_matches("accuracy_").to_string()).collect();
        s.push_str(&format!(
            "### This run, same rows ({name})\n\n| model | bits | method | accuracy |{} memory (MB) | candidate evaluations |\n|---|---|---|---|{}---|---|\n",
            class_names.iter().map(|c| format!(" {c} |")).collect::<String>(),
            "---|".repeat(class_names.len()),
        ));
        let fmt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
        for i in 0..models.len() {
            let label =
                method_labels.get(&methods[i]).cloned().unwrap_or_else(|| methods[i].clone());
            s.push_str(&format!(
                "| {} | {} | {} | {} |{} {} | {} |\n",
                labels.get(&models[i]).cloned().unwrap_or_default(),
                bits[i],
                label,
                fmt(acc[i]),
                classes.iter().map(|(_, v)| format!(" {} |", fmt(v[i]))).collect::<String>(),
                mem[i].map_or("–".into(), |v| format!("{:.3}", v / 1e6)),
                evals[i].map_or("–".into(), |v| format!("{v:.0}")),
            ));
        }
        s.push('\n');
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}
