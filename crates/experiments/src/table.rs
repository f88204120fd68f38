//! Tables: polars DataFrames built only from the cells' result files (plus an index of the
//! cells' resolved settings), written as CSV and Markdown. Figures and the report are drawn from
//! these tables alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Context, Result};
use polars::prelude::{
    Column, CsvReadOptions, CsvWriter, DataFrame, DataType, Field, Schema, SerReader, SerWriter,
};
use qvlm_search::strategy::config::BaseStrategy;

use qvlm_core::layer_id::LayerId;

use crate::config::{ComparisonRow, Config};
use crate::grid::Cell;
use crate::results::ResultsDir;
use crate::stats;

/// Metrics of the summary table, in column order.
pub const SUMMARY_METRICS: [&str; 14] = [
    "accuracy",
    "accuracy_yes_no",
    "accuracy_shape",
    "accuracy_color",
    "kl_vs_float",
    "top1_agreement",
    "weight_bytes",
    "candidate_evaluations",
    "dependency_evaluations",
    "dependency_elements",
    "block_forwards",
    "model_passes",
    "groups",
    "mean_group_depth",
];

/// [`SUMMARY_METRICS`] with every other per-class accuracy the cells recorded (ScienceQA's NAT …
/// G7-12, in their order) after the fixed ones: the report's class columns come from the summary
/// (issue #21 item 4: table2_classes had none).
fn summary_metrics(long: &DataFrame) -> Result<Vec<String>> {
    let mut out: Vec<String> = SUMMARY_METRICS.iter().map(|m| m.to_string()).collect();
    let at = out.iter().rposition(|m| m.starts_with("accuracy")).map_or(0, |i| i + 1);
    let mut classes: Vec<String> = Vec::new();
    for m in strings(long, "metric")? {
        if m.starts_with("accuracy_") && !out.contains(&m) && !classes.contains(&m) {
            classes.push(m);
        }
    }
    out.splice(at..at, classes);
    Ok(out)
}

/// A run's tables.
#[derive(Debug)]
pub struct Tables {
    /// Every metric row of every finished cell (cell, model, bits, method, metric, value).
    pub long: DataFrame,
    /// One row per (model, bits, method), [`SUMMARY_METRICS`] and any other per-class
    /// accuracies as columns.
    pub summary: DataFrame,
    /// One row per cell of the grid: cell, model, model_label, bits, method, method_label,
    /// max_depth (entropy-blocked strategies), sweep_axis, sweep_value.
    pub cells: DataFrame,
    /// The DED points the cells recorded (Fig. 2): cell, model, bits, method, site, sample, ded,
    /// entropy.
    pub ded: DataFrame,
    /// Fig. 2's correlations between the dependency and DED, per window, tower and overall.
    pub ded_correlations: DataFrame,
    /// The controlled comparison (`outputs.rows`) per model and bit width: each row's accuracy
    /// over seeds and its paired test against its `vs` row (see [`crate::stats`]).
    pub comparisons: DataFrame,
    /// Table 2's view of the same rows: per question class (easy-VQA's question types,
    /// ScienceQA's NAT … G7-12), each row's class accuracy over seeds and the paired test of the
    /// class's questions against its `vs` row.
    pub class_comparisons: DataFrame,
}

impl Tables {
    /// Reads the finished cells' `metrics.csv`, `ded.csv` and `scores.csv` files; indexes
    /// `cells`; compares the `rows`.
    pub fn build(results: &ResultsDir, cells: &[Cell], rows: &[ComparisonRow]) -> Result<Tables> {
        let finished: Vec<&Cell> = cells.iter().filter(|c| results.is_done(&c.id)).collect();
        let files: Vec<_> =
            finished.iter().map(|c| results.cell(&c.id).join("metrics.csv")).collect();
        let long = load_metrics(&files)?;
        let metrics = summary_metrics(&long)?;
        let mut summary = wide(&long, &metrics.iter().map(String::as_str).collect::<Vec<_>>())?;
        summary.with_column(search_seconds(results, &finished, &summary)?)?;
        let mut scores = ScoresByRow::new(results, &finished);
        let comparisons = comparisons(&mut scores, &finished, rows, &summary)?;
        let class_comparisons = class_comparisons(&mut scores, &finished, rows)?;
        let ded = ded_points(results, &finished)?;
        Ok(Tables {
            long,
            summary,
            cells: cell_index(cells)?,
            ded_correlations: ded_correlations(&ded)?,
            ded,
            comparisons,
            class_comparisons,
        })
    }

    /// Writes `tables/`: metrics_long and summary (CSV + Markdown), cells.csv, ded.csv.
    pub fn write(&self, results: &ResultsDir, cfg: &Config) -> Result<()> {
        let dir = results.tables()?;
        write(
            &mut self.long.clone(),
            &dir.join("metrics_long.csv"),
            &dir.join("metrics_long.md"),
            "All metrics (long format)",
            "",
        )?;
        let note = format!(
            "Embedded default: {}. Accuracy in %, on the evaluated questions; KL and top-1 agreement of the first answer token against the float model; weight_bytes as stored (quantized layers at their bit width with scales, the rest fp16); search cost as counted by the search.",
            cfg.experiment.description
        );
        write(
            &mut self.summary.clone(),
            &dir.join("summary.csv"),
            &dir.join("summary.md"),
            &format!("{} — summary", cfg.experiment.name),
            &note,
        )?;
        write_csv(&mut self.cells.clone(), &dir.join("cells.csv"))?;
        write_csv(&mut self.ded.clone(), &dir.join("ded.csv"))?;
        if self.ded_correlations.height() > 0 {
            write(
                &mut self.ded_correlations.clone(),
                &dir.join("ded_correlations.csv"),
                &dir.join("ded_correlations.md"),
                "Fig. 2: dependency vs DED",
                &format!(
                    "Per calibration sample and window: DED = (layer-wise − joint) error at the window's last site over the sample's float output energy; dependency = the sum of the window's consecutive conditional entropies (Eq. 6). `window` names its first site; `all` pools a tower's windows (tower `all`: every window). {}",
                    ded_test_note()
                ),
            )?;
        }
        let statistics = format!(
            "each question averaged over seeds, with a 95 % interval and a two-sided p-value from a paired bootstrap over images ({} resamples); significant: p < {}.",
            stats::RESAMPLES,
            stats::ALPHA
        );
        let name = &cfg.experiment.name;
        for (df, stem, title, note) in [
            (
                &self.comparisons,
                "comparisons",
                format!("{name} — controlled comparison"),
                format!(
                    "Each row differs from its `vs` row by `change`. activations: each tower's activation quantizer and whether an integer kernel executes it (per-channel scales lie along the matmul's reduction dimension: fake-quant only). accuracy: mean over the row's calibration seeds (std: their standard deviation); diff: mean per-question difference to `vs` in points, {statistics}"
                ),
            ),
            (
                &self.class_comparisons,
                "class_comparisons",
                format!("{name} — per question class (Table 2)"),
                format!(
                    "Table 2: the controlled rows per question class (a question may count toward several: ScienceQA). accuracy: the row's accuracy on the class's questions, mean over calibration seeds (std: their standard deviation); diff: mean per-question difference to `vs` over the class's questions in points, {statistics}"
                ),
            ),
        ] {
            if df.height() > 0 {
                write(
                    &mut df.clone(),
                    &dir.join(format!("{stem}.csv")),
                    &dir.join(format!("{stem}.md")),
                    &title,
                    &note,
                )?;
            }
        }
        Ok(())
    }
}

/// What the report and figures need to know of each cell besides its metrics.
fn cell_index(cells: &[Cell]) -> Result<DataFrame> {
    let text = |f: &dyn Fn(&Cell) -> String| cells.iter().map(f).collect::<Vec<String>>();
    let depth = |c: &Cell| match c.method().map(|m| m.strategy.base()) {
        Some(BaseStrategy::EntropyBlocked(b)) => Some(b.max_depth as f64),
        _ => None,
    };
    let sweep = |c: &Cell| c.method().and_then(|m| m.sweep.clone());
    Ok(DataFrame::new_infer_height(vec![
        Column::new("cell".into(), text(&|c| c.id.clone())),
        Column::new("model".into(), text(&|c| c.model.name.clone())),
        Column::new("model_label".into(), text(&|c| c.model.label())),
        Column::new("bits".into(), text(&|c| c.bits_label())),
        Column::new("method".into(), text(&|c| c.method_name().to_string())),
        Column::new(
            "method_label".into(),
            text(&|c| c.method().map_or_else(|| c.method_name().to_string(), |m| m.label())),
        ),
        Column::new("activations".into(), text(&|c| c.activation_setting())),
        Column::new("max_depth".into(), cells.iter().map(depth).collect::<Vec<_>>()),
        Column::new("sweep_axis".into(), text(&|c| sweep(c).map(|s| s.axis).unwrap_or_default())),
        Column::new(
            "sweep_value".into(),
            cells.iter().map(|c| sweep(c).map(|s| s.value)).collect::<Vec<_>>(),
        ),
    ])?)
}

/// A finished cell's `timings.json` (its measured, non-deterministic values by name).
pub fn timings(results: &ResultsDir, cell: &str) -> Result<BTreeMap<String, f64>> {
    let path = results.cell(cell).join("timings.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a timings file", path.display()))
}

/// Wall seconds of the search per summary row (mean over its cells' `timings.json`; the one
/// column of the summary that is not deterministic).
fn search_seconds(results: &ResultsDir, cells: &[&Cell], summary: &DataFrame) -> Result<Column> {
    let (m, b, me) =
        (strings(summary, "model")?, strings(summary, "bits")?, strings(summary, "method")?);
    let mut values = Vec::with_capacity(m.len());
    for i in 0..m.len() {
        let mut secs = Vec::new();
        for c in cells
            .iter()
            .filter(|c| c.model.name == m[i] && c.bits_label() == b[i] && c.method_name() == me[i])
        {
            secs.extend(timings(results, &c.id)?.get("search_seconds").copied());
        }
        values.push(stats::mean(&secs));
    }
    Ok(Column::new("search_seconds".into(), values))
}

/// Question → the classes it counts toward (`scores.csv`'s `classes`, split at `;`).
type QuestionClasses = BTreeMap<String, Vec<String>>;

/// A row's per-question scores (one per finished cell, i.e. per seed) and each question's classes.
type RowScores = Rc<(stats::Scores, QuestionClasses)>;

/// The finished cells' `scores.csv`, read once per (model, bits, method) and shared by the
/// comparison tables (a `vs` row is named by many rows, and both tables pair the same rows).
struct ScoresByRow<'a> {
    results: &'a ResultsDir,
    cells: &'a [&'a Cell],
    loaded: BTreeMap<(String, String, String), RowScores>,
}

impl<'a> ScoresByRow<'a> {
    fn new(results: &'a ResultsDir, cells: &'a [&'a Cell]) -> Self {
        ScoresByRow { results, cells, loaded: BTreeMap::new() }
    }

    /// The scores of (model, bits, method) by question, with one score per cell (seed), and each
    /// question's classes.
    fn get(&mut self, (model, bits, method): (&str, &str, &str)) -> Result<RowScores> {
        let key = (model.to_string(), bits.to_string(), method.to_string());
        if let Some(found) = self.loaded.get(&key) {
            return Ok(Rc::clone(found));
        }
        let read = Rc::new(read_row_scores(self.results, self.cells, (model, bits, method))?);
        self.loaded.insert(key, Rc::clone(&read));
        Ok(read)
    }
}

/// Reads the `scores.csv` of every finished cell of (model, bits, method).
fn read_row_scores(
    results: &ResultsDir,
    cells: &[&Cell],
    key: (&str, &str, &str),
) -> Result<(stats::Scores, QuestionClasses)> {
    let mut out = stats::Scores::new();
    let mut classes = QuestionClasses::new();
    for c in cells
        .iter()
        .filter(|c| (c.model.name.as_str(), c.bits_label().as_str(), c.method_name()) == key)
    {
        let path = results.cell(&c.id).join("scores.csv");
        let df = read_csv_strings(&path)?;
        let (q, cl, sc) =
            (strings(&df, "question")?, strings(&df, "cluster")?, strings(&df, "score")?);
        let qc = strings(&df, "classes").with_context(|| {
            format!(
                "{}: no `classes` column (written before per-class scores were recorded: delete \
                 the cell folder to recompute it)",
                path.display()
            )
        })?;
        for i in 0..df.height() {
            let score: f64 = sc[i]
                .parse()
                .with_context(|| format!("{}: row {}: score `{}`", path.display(), i + 1, sc[i]))?;
            out.entry(q[i].clone()).or_insert_with(|| (cl[i].clone(), vec![])).1.push(score);
            let names: Vec<String> =
                qc[i].split(';').filter(|n| !n.is_empty()).map(str::to_string).collect();
            match classes.get(&q[i]) {
                Some(seen) if *seen != names => anyhow::bail!(
                    "{}: row {}: question {} has classes `{}` here and `{}` in another cell of \
                     the same row",
                    path.display(),
                    i + 1,
                    q[i],
                    qc[i],
                    seen.join(";")
                ),
                Some(_) => {}
                None => {
                    classes.insert(q[i].clone(), names);
                }
            }
        }
    }
    Ok((out, classes))
}

/// The scores of the questions that count toward `class`.
fn scores_of_class(
    scores: &stats::Scores,
    classes: &QuestionClasses,
    class: &str,
) -> stats::Scores {
    scores
        .iter()
        .filter(|(q, _)| classes.get(*q).is_some_and(|c| c.iter().any(|n| n == class)))
        .map(|(q, v)| (q.clone(), v.clone()))
        .collect()
}

/// Per seed (the k-th score of every question), the mean score in points; their mean and
/// standard deviation over seeds.
fn accuracy_over_seeds(scores: &stats::Scores) -> (Option<f64>, Option<f64>, usize) {
    let seeds = scores.values().map(|(_, s)| s.len()).max().unwrap_or(0);
    let per_seed: Vec<f64> = (0..seeds)
        .filter_map(|k| {
            let of: Vec<f64> = scores.values().filter_map(|(_, s)| s.get(k).copied()).collect();
            stats::mean(&of).map(|m| 100.0 * m)
        })
        .collect();
    (stats::mean(&per_seed), stats::std(&per_seed), per_seed.len())
}

/// Table 2 with statistics: per (model, bits), every configured row and every question class
/// its cells scored — the class accuracy over seeds and the paired test against the `vs` row on
/// the class's questions.
fn class_comparisons(
    scores: &mut ScoresByRow,
    cells: &[&Cell],
    rows: &[ComparisonRow],
) -> Result<DataFrame> {
    let keys = model_bits(cells);
    let mut text: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut nums: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    for (model, bits) in &keys {
        for row in rows {
            let this = scores.get((model, bits, &row.method))?;
            let (a, classes) = (&this.0, &this.1);
            if a.is_empty() {
                continue;
            }
            let b = match &row.vs {
                Some(vs) => Some(scores.get((model, bits, vs))?),
                None => None,
            };
            let mut names: Vec<&String> = classes.values().flatten().collect();
            names.sort();
            names.dedup();
            for class in names {
                let a_class = scores_of_class(a, classes, class);
                let (accuracy, std, seeds) = accuracy_over_seeds(&a_class);
                let (vs_accuracy, test) = match &b {
                    Some(b) => {
                        let b_class = scores_of_class(&b.0, classes, class);
                        (accuracy_over_seeds(&b_class).0, stats::paired_test(&a_class, &b_class))
                    }
                    None => (None, None),
                };
                for (name, v) in [
                    ("model", model.clone()),
                    ("bits", bits.clone()),
                    ("method", row.method.clone()),
                    ("vs", row.vs.clone().unwrap_or_default()),
                    ("class", class.clone()),
                    ("significant", significance(test.as_ref())),
                ] {
                    text.entry(name).or_default().push(v);
                }
                for (name, v) in [
                    ("seeds", Some(seeds as f64)),
                    ("accuracy", accuracy),
                    ("accuracy_std", std),
                    ("vs_accuracy", vs_accuracy),
                    ("diff", test.as_ref().map(|t| t.diff)),
                    ("ci_low", test.as_ref().map(|t| t.ci.0)),
                    ("ci_high", test.as_ref().map(|t| t.ci.1)),
                    ("p", test.as_ref().map(|t| t.p)),
                    ("questions", Some(a_class.len() as f64)),
                    ("clusters", test.as_ref().map(|t| t.clusters as f64)),
                ] {
                    nums.entry(name).or_default().push(v);
                }
            }
        }
    }
    comparison_frame(&["model", "bits", "method", "vs", "class"], text, nums)
}

/// The controlled comparison: per (model, bits) of the cells, every configured row.
fn comparisons(
    scores: &mut ScoresByRow,
    cells: &[&Cell],
    rows: &[ComparisonRow],
    summary: &DataFrame,
) -> Result<DataFrame> {
    let keys = model_bits(cells);
    let (s_model, s_bits, s_method) =
        (strings(summary, "model")?, strings(summary, "bits")?, strings(summary, "method")?);
    let (s_acc, s_std, s_seeds) =
        (floats(summary, "accuracy")?, floats(summary, "accuracy_std")?, floats(summary, "seeds")?);
    let find = |m: &str, b: &str, me: &str| {
        (0..s_model.len()).find(|&i| s_model[i] == m && s_bits[i] == b && s_method[i] == me)
    };
    let mut cols: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    let mut text: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (model, bits) in &keys {
        for row in rows {
            let this = find(model, bits, &row.method);
            let that = row.vs.as_deref().and_then(|v| find(model, bits, v));
            let test = match &row.vs {
                Some(vs) => {
                    let a = scores.get((model, bits, &row.method))?;
                    let b = scores.get((model, bits, vs))?;
                    stats::paired_test(&a.0, &b.0)
                }
                None => None,
            };
            let setting = cells
                .iter()
                .find(|c| {
                    &c.model.name == model
                        && &c.bits_label() == bits
                        && c.method_name() == row.method
                })
                .map(|c| c.activation_setting())
                .unwrap_or_default();
            for (name, v) in [
                ("model", model.clone()),
                ("bits", bits.clone()),
                ("method", row.method.clone()),
                ("vs", row.vs.clone().unwrap_or_default()),
                ("change", row.change.clone()),
                ("activations", setting),
                ("significant", significance(test.as_ref())),
            ] {
                text.entry(name).or_default().push(v);
            }
            for (name, v) in [
                ("seeds", this.and_then(|i| s_seeds[i])),
                ("accuracy", this.and_then(|i| s_acc[i])),
                ("accuracy_std", this.and_then(|i| s_std[i])),
                ("vs_accuracy", that.and_then(|i| s_acc[i])),
                ("diff", test.as_ref().map(|t| t.diff)),
                ("ci_low", test.as_ref().map(|t| t.ci.0)),
                ("ci_high", test.as_ref().map(|t| t.ci.1)),
                ("p", test.as_ref().map(|t| t.p)),
                ("questions", test.as_ref().map(|t| t.questions as f64)),
                ("clusters", test.as_ref().map(|t| t.clusters as f64)),
            ] {
                cols.entry(name).or_default().push(v);
            }
        }
    }
    comparison_frame(&["model", "bits", "method", "vs", "change", "activations"], text, cols)
}

/// The (model, bits) pairs of the quantized cells, in first-appearance order.
fn model_bits(cells: &[&Cell]) -> Vec<(String, String)> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for c in cells.iter().filter(|c| c.method().is_some()) {
        let k = (c.model.name.clone(), c.bits_label());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys
}

/// A paired test's `significant` column: yes, no, or empty without a test.
fn significance(test: Option<&stats::PairedTest>) -> String {
    match test {
        Some(t) if t.significant() => "yes".into(),
        Some(_) => "no".into(),
        None => String::new(),
    }
}

/// A comparison table's columns: the `keys` text columns, then the accuracies and the paired
/// test (seeds … p), `significant`, and the questions and clusters the test paired.
fn comparison_frame(
    keys: &[&str],
    mut text: BTreeMap<&str, Vec<String>>,
    mut nums: BTreeMap<&str, Vec<Option<f64>>>,
) -> Result<DataFrame> {
    let mut out = Vec::new();
    for &name in keys {
        out.push(Column::new(name.into(), text.remove(name).unwrap_or_default()));
    }
    for name in
        ["seeds", "accuracy", "accuracy_std", "vs_accuracy", "diff", "ci_low", "ci_high", "p"]
    {
        out.push(Column::new(name.into(), nums.remove(name).unwrap_or_default()));
    }
    out.push(Column::new("significant".into(), text.remove("significant").unwrap_or_default()));
    for name in ["questions", "clusters"] {
        out.push(Column::new(name.into(), nums.remove(name).unwrap_or_default()));
    }
    Ok(DataFrame::new_infer_height(out)?)
}

/// What `ded_correlations`' p columns are, for the notes of its table and of the report.
pub fn ded_test_note() -> String {
    format!(
        "`pearson_p`, `spearman_p`: two-sided permutation test of no association ({} re-pairings) per window; a pooled row (`all`) holds each sample once per window, not independent points, and has no test.",
        stats::RESAMPLES
    )
}

/// The `ded.csv` rows of the finished cells that have one, with the cell's keys.
fn ded_points(results: &ResultsDir, cells: &[&Cell]) -> Result<DataFrame> {
    let (mut keys, mut site, mut sample, mut ded, mut entropy) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut tower, mut block) = (vec![], vec![]);
    for c in cells {
        let path = results.cell(&c.id).join("ded.csv");
        if !path.is_file() {
            continue;
        }
        let df = read_csv(&path)?;
        let (s, n) = (strings(&df, "site")?, floats(&df, "sample")?);
        let (d, e) = (floats(&df, "ded")?, floats(&df, "entropy")?);
        for i in 0..df.height() {
            let id: LayerId = s[i]
                .parse()
                .with_context(|| format!("{}: row {}: site `{}`", path.display(), i + 1, s[i]))?;
            keys.push((
                c.id.clone(),
                c.model.name.clone(),
                c.bits_label(),
                c.method_name().to_string(),
            ));
            tower.push(id.tower.name().to_string());
            block.push(id.block);
            site.push(s[i].clone());
            sample.push(n[i]);
            ded.push(d[i]);
            entropy.push(e[i]);
        }
    }
    let key = |f: fn(&(String, String, String, String)) -> &String| {
        keys.iter().map(|k| f(k).clone()).collect::<Vec<String>>()
    };
    Ok(DataFrame::new_infer_height(vec![
        Column::new("cell".into(), key(|k| &k.0)),
        Column::new("model".into(), key(|k| &k.1)),
        Column::new("bits".into(), key(|k| &k.2)),
        Column::new("method".into(), key(|k| &k.3)),
        Column::new("tower".into(), tower),
        Column::new("block".into(), block),
        Column::new("site".into(), site),
        Column::new("sample".into(), sample),
        Column::new("ded".into(), ded),
        Column::new("entropy".into(), entropy),
    ])?)
}

/// Fig. 2's correlations: per cell, per window (its first site), per tower (`all` windows of it)
/// and over everything: points, Pearson and Spearman r between dependency and DED, how many
/// samples have DED = 0, and whether the joint search equals the layer-wise one for every sample.
fn ded_correlations(ded: &DataFrame) -> Result<DataFrame> {
    let (cell, tower, site) =
        (strings(ded, "cell")?, strings(ded, "tower")?, strings(ded, "site")?);
    let (d, e) = (floats(ded, "ded")?, floats(ded, "entropy")?);
    // (cell, tower, window) → points; the window `all` pools a tower, the tower `all` everything.
    let mut groups: BTreeMap<(String, String, String), Vec<(f64, f64)>> = BTreeMap::new();
    for i in 0..ded.height() {
        let (Some(dv), Some(ev)) = (d[i], e[i]) else { continue };
        for (t, w) in [
            (tower[i].clone(), site[i].clone()),
            (tower[i].clone(), "all".to_string()),
            ("all".to_string(), "all".to_string()),
        ] {
            groups.entry((cell[i].clone(), t, w)).or_default().push((ev, dv));
        }
    }
    let mut cols: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut nums: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    for ((c, t, w), points) in &groups {
        let zero = points.iter().filter(|p| p.1 == 0.0).count();
        for (name, v) in [("cell", c.clone()), ("tower", t.clone()), ("window", w.clone())] {
            cols.entry(name).or_default().push(v);
        }
        cols.entry("joint_equals_layerwise")
            .or_default()
            .push(if zero == points.len() { "yes" } else { "no" }.to_string());
        // A window's points are independent samples; a pooled row (`all`) holds the same
        // samples once per window, so no test is run on it.
        let test = |r| if w == "all" { None } else { stats::correlation_p(points, r) };
        for (name, v) in [
            ("points", Some(points.len() as f64)),
            ("pearson", stats::pearson(points)),
            ("pearson_p", test(stats::pearson)),
            ("spearman", stats::spearman(points)),
            ("spearman_p", test(stats::spearman)),
            ("zero_ded_points", Some(zero as f64)),
        ] {
            nums.entry(name).or_default().push(v);
        }
    }
    let mut out = Vec::new();
    for name in ["cell", "tower", "window"] {
        out.push(Column::new(name.into(), cols.remove(name).unwrap_or_default()));
    }
    for name in ["points", "pearson", "pearson_p", "spearman", "spearman_p", "zero_ded_points"] {
        out.push(Column::new(name.into(), nums.remove(name).unwrap_or_default()));
    }
    out.push(Column::new(
        "joint_equals_layerwise".into(),
        cols.remove("joint_equals_layerwise").unwrap_or_default(),
    ));
    Ok(DataFrame::new_infer_height(out)?)
}

/// The schema of a cell's `metrics.csv` (ids stay strings even when all digits).
fn metrics_schema() -> Arc<Schema> {
    let text = ["cell", "model", "bits", "method", "metric"]
        .map(|n| Field::new(n.into(), DataType::String));
    Arc::new(Schema::from_iter(
        text.into_iter().chain([Field::new("value".into(), DataType::Float64)]),
    ))
}

/// All metric rows of the given cell folders (long format: cell, model, bits, method, metric,
/// value), in the order given.
pub fn load_metrics(files: &[std::path::PathBuf]) -> Result<DataFrame> {
    let mut out: Option<DataFrame> = None;
    for f in files {
        let df = CsvReadOptions::default()
            .with_has_header(true)
            .with_schema(Some(metrics_schema()))
            .try_into_reader_with_file_path(Some(f.clone()))
            .and_then(|r| r.finish())
            .with_context(|| format!("reading {}", f.display()))?;
        out = Some(match out {
            None => df,
            Some(acc) => acc.vstack(&df).with_context(|| format!("stacking {}", f.display()))?,
        });
    }
    match out {
        Some(df) => Ok(df),
        None => Ok(DataFrame::new_infer_height(vec![
            Column::new("cell".into(), Vec::<String>::new()),
            Column::new("model".into(), Vec::<String>::new()),
            Column::new("bits".into(), Vec::<String>::new()),
            Column::new("method".into(), Vec::<String>::new()),
            Column::new("metric".into(), Vec::<String>::new()),
            Column::new("value".into(), Vec::<f64>::new()),
        ])?),
    }
}

/// A column as strings (nulls as "").
pub fn strings(df: &DataFrame, name: &str) -> Result<Vec<String>> {
    let col = df.column(name)?.cast(&DataType::String)?;
    Ok(col.str()?.iter().map(|v| v.unwrap_or_default().to_string()).collect())
}

/// A column as optional f64.
pub fn floats(df: &DataFrame, name: &str) -> Result<Vec<Option<f64>>> {
    let col = df.column(name)?.cast(&DataType::Float64)?;
    Ok(col.f64()?.iter().collect())
}

/// Wide table: one row per (model, bits, method) in first-appearance order, one column per
/// requested metric — the mean over the row's cells (its calibration seeds; null where none has
/// it) — then `accuracy_std` (over seeds; null below two) and `seeds` (cells with an accuracy).
pub fn wide(long: &DataFrame, metrics: &[&str]) -> Result<DataFrame> {
    let (models, bits, methods, names) = (
        strings(long, "model")?,
        strings(long, "bits")?,
        strings(long, "method")?,
        strings(long, "metric")?,
    );
    let values = floats(long, "value")?;
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for i in 0..models.len() {
        let k = (models[i].clone(), bits[i].clone(), methods[i].clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let of = |k: &(String, String, String), m: &str| -> Vec<f64> {
        (0..models.len())
            .filter(|&i| models[i] == k.0 && bits[i] == k.1 && methods[i] == k.2 && names[i] == m)
            .filter_map(|i| values[i])
            .collect()
    };
    let mut cols: Vec<Column> = vec![
        Column::new("model".into(), keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>()),
        Column::new("bits".into(), keys.iter().map(|k| k.1.clone()).collect::<Vec<_>>()),
        Column::new("method".into(), keys.iter().map(|k| k.2.clone()).collect::<Vec<_>>()),
    ];
    for m in metrics {
        let v: Vec<Option<f64>> = keys.iter().map(|k| stats::mean(&of(k, m))).collect();
        cols.push(Column::new((*m).into(), v));
    }
    let acc: Vec<Vec<f64>> = keys.iter().map(|k| of(k, "accuracy")).collect();
    cols.push(Column::new(
        "accuracy_std".into(),
        acc.iter().map(|a| stats::std(a)).collect::<Vec<_>>(),
    ));
    cols.push(Column::new("seeds".into(), acc.iter().map(|a| a.len() as u32).collect::<Vec<_>>()));
    Ok(DataFrame::new_infer_height(cols)?)
}

/// A free-text value made safe for this project's comma-separated files (no quoting: commas and
/// line breaks become spaces).
pub fn csv_field(s: &str) -> String {
    s.replace([',', '\n', '\r'], " ")
}

/// Writes `df` as CSV and as a Markdown table.
pub fn write(df: &mut DataFrame, csv: &Path, md: &Path, title: &str, note: &str) -> Result<()> {
    write_csv(df, csv)?;
    std::fs::write(md, markdown(df, title, note)?)
        .with_context(|| format!("writing {}", md.display()))
}

/// Writes `df` as CSV.
pub fn write_csv(df: &mut DataFrame, csv: &Path) -> Result<()> {
    let mut f =
        std::fs::File::create(csv).with_context(|| format!("creating {}", csv.display()))?;
    CsvWriter::new(&mut f)
        .include_header(true)
        .finish(df)
        .with_context(|| format!("writing {}", csv.display()))
}

/// A Markdown rendering of a DataFrame (floats with 2 decimals; counts, big numbers and columns
/// of whole numbers as integers).
pub fn markdown(df: &DataFrame, title: &str, note: &str) -> Result<String> {
    let names: Vec<String> = df.get_column_names().iter().map(|n| n.to_string()).collect();
    let mut s = format!("### {title}\n\n");
    if !note.is_empty() {
        s.push_str(note);
        s.push_str("\n\n");
    }
    s.push_str(&format!("| {} |\n", names.join(" | ")));
    s.push_str(&format!("|{}\n", names.iter().map(|_| "---|").collect::<String>()));
    let whole: Vec<bool> = names
        .iter()
        .map(|n| -> Result<bool> {
            let c = df.column(n)?;
            if c.dtype() == &DataType::String {
                return Ok(false);
            }
            let values = c.cast(&DataType::Float64)?;
            let values = values.f64()?;
            Ok((0..values.len()).filter_map(|i| values.get(i)).all(|v| v.fract() == 0.0))
        })
        .collect::<Result<_>>()?;
    for row in 0..df.height() {
        let cells: Vec<String> = names
            .iter()
            .zip(&whole)
            .map(|(n, &whole)| -> Result<String> {
                let c = df.column(n)?;
                Ok(match c.dtype() {
                    DataType::String => c.str()?.get(row).unwrap_or("").to_string(),
                    _ => match c.cast(&DataType::Float64)?.f64()?.get(row) {
                        None => "–".into(),
                        // p-values need their small digits.
                        Some(v) if n == "p" => format!("{v:.4}"),
                        Some(v) if whole || v.abs() >= 1e4 => format!("{v:.0}"),
                        Some(v) => format!("{v:.2}"),
                    },
                })
            })
            .collect::<Result<_>>()?;
        s.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    Ok(s)
}

/// Reads a CSV with every column as text (ids stay as written).
fn read_csv_strings(path: &Path) -> Result<DataFrame> {
    CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .with_context(|| format!("reading {}", path.display()))
}

/// Reads a CSV of `paper/`.
pub fn read_csv(path: &Path) -> Result<DataFrame> {
    CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(rows: &[(&str, &str, &[f64])]) -> stats::Scores {
        rows.iter().map(|(q, c, s)| (q.to_string(), (c.to_string(), s.to_vec()))).collect()
    }

    #[test]
    fn a_class_keeps_exactly_its_questions_even_where_classes_overlap() {
        let all = scores(&[("1", "a", &[1.0]), ("2", "a", &[0.0]), ("3", "b", &[1.0])]);
        let classes: QuestionClasses = [
            ("1".to_string(), vec!["nat".to_string(), "img".to_string()]),
            ("2".to_string(), vec!["soc".to_string(), "img".to_string()]),
            ("3".to_string(), vec!["nat".to_string()]),
        ]
        .into_iter()
        .collect();
        let keys = |s: &stats::Scores| s.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&scores_of_class(&all, &classes, "img")), ["1", "2"]);
        assert_eq!(keys(&scores_of_class(&all, &classes, "nat")), ["1", "3"]);
        assert!(scores_of_class(&all, &classes, "lan").is_empty());
    }

    #[test]
    fn class_accuracy_is_the_mean_over_seeds_of_each_seeds_accuracy() {
        // Seed 0: both right (100 %); seed 1: one of two (50 %).
        let s = scores(&[("1", "a", &[1.0, 0.0]), ("2", "b", &[1.0, 1.0])]);
        let (mean, std, seeds) = accuracy_over_seeds(&s);
        assert_eq!(seeds, 2);
        assert!((mean.expect("mean") - 75.0).abs() < 1e-12);
        // Sample standard deviation of 100 and 50.
        assert!((std.expect("std") - 50.0 / 2f64.sqrt()).abs() < 1e-9);
        assert_eq!(accuracy_over_seeds(&stats::Scores::new()), (None, None, 0));
    }
}
