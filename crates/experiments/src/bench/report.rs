//! The bench's outputs: tidy rows (`measurements.csv`, the table helpers' long format) and
//! `run.json` are written first; the table (`efficiency.csv`, `efficiency.md`, with ratios against
//! BF16 and FP32 of the same run and the targets' verdicts) is built only from them, and the
//! roofline figure only from the table.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use polars::prelude::{Column, DataFrame};

use super::rows::{Row, RunInfo, Skipped};
use super::scheme::Part;
use crate::table::csv_field;
use crate::{figure, table};

/// Metrics of `measurements.csv`, one row each per configuration.
const METRICS: [&str; 36] = [
    "layers",
    "layers_built",
    "weight_bytes",
    "decoder_linear_bytes",
    "decode_bytes_per_token",
    "rss_delta_bytes",
    "prefill_positions",
    "prefill_ms",
    "prefill_vision_ms",
    "prefill_layers_ms",
    "prefill_head_ms",
    "decode_ms",
    "decode_ms_min",
    "decode_layers_ms",
    "decode_head_ms",
    "decode_linears_ms",
    "fallback_linears",
    "roof_before_bytes_per_s",
    "roof_after_bytes_per_s",
    "rounds",
    "decode_ms_lo",
    "decode_ms_hi",
    "speedup_16bit_paired_median",
    "speedup_16bit_paired_lo",
    "speedup_16bit_paired_hi",
    "decode_fused_ms",
    "fused_max_rel_diff",
    "fused_speedup_16bit_paired_median",
    "fused_speedup_16bit_paired_lo",
    "fused_speedup_16bit_paired_hi",
    "partner_fused_ms",
    "fused_speedup_stepped_median",
    "fused_speedup_stepped_lo",
    "fused_speedup_stepped_hi",
    "fused_speedup_stepped_rounds",
    "fused_stepped_roof_pct",
];

/// The targets on this CPU: W4A16 against the fastest 16-bit row of the run (the fair FP16-class
/// reference), and the share of the memory roof that the own kernels' decode streams.
pub const TARGET_SPEEDUP: f64 = 3.0;
pub const TARGET_ROOF_PCT: f64 = 85.0;
pub const TARGET_MEMORY_RATIO: f64 = 3.5;
/// The table labels of the 16-bit rows; "vs 16-bit" ratios use the fastest of them.
const SIXTEEN_BIT: [&str; 2] = ["BF16", "BF16 own"];

/// One target, measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub model: String,
    pub what: String,
    pub value: f64,
    pub threshold: f64,
    pub met: bool,
}

impl Target {
    pub fn line(&self) -> String {
        format!(
            "{}: {} = {:.2} (target ≥ {:.2}): {}",
            self.model,
            self.what,
            self.value,
            self.threshold,
            if self.met { "met" } else { "NOT met" }
        )
    }
}

/// The built table and where it went.
#[derive(Debug)]
pub struct Report {
    pub table: DataFrame,
    pub targets: Vec<Target>,
    pub files: Vec<PathBuf>,
}

/// Writes `measurements.csv` (cell, model, bits, method, metric, value; `bits` holds the scheme
/// label and `method` the kernel) and `run.json`.
pub fn write_results(dir: &Path, rows: &[Row], info: &RunInfo) -> Result<()> {
    let mut csv = String::from("cell,model,bits,method,metric,value\n");
    for r in rows {
        let cell = format!("{}/{}", r.shape, r.scheme.key());
        let mut push = |metric: &str, value: f64| {
            csv.push_str(&format!(
                "{},{},{},{},{metric},{value}\n",
                csv_field(&cell),
                csv_field(&r.model),
                csv_field(&r.label),
                csv_field(&r.kernel)
            ));
        };
        push("layers", r.layers as f64);
        push("layers_built", r.layers_built as f64);
        push("weight_bytes", r.weight_bytes as f64);
        push("decoder_linear_bytes", r.decoder_linear_bytes as f64);
        push("decode_bytes_per_token", r.decode_bytes_per_token as f64);
        if let Some(rss) = r.rss_delta_bytes {
            push("rss_delta_bytes", rss as f64);
        }
        push("prefill_positions", r.prefill_positions as f64);
        push("prefill_ms", r.prefill.total_ms());
        push("prefill_vision_ms", r.prefill.vision_ms);
        push("prefill_layers_ms", r.prefill.layers_ms);
        push("prefill_head_ms", r.prefill.head_ms);
        push("decode_ms", r.decode.total_ms());
        push("decode_ms_min", r.decode_min_ms);
        push("decode_layers_ms", r.decode.layers_ms);
        push("decode_head_ms", r.decode.head_ms);
        push("decode_linears_ms", r.decode_linears_ms);
        push("fallback_linears", r.fallback_linears as f64);
        push("roof_before_bytes_per_s", r.roof_before_bytes_per_s);
        push("roof_after_bytes_per_s", r.roof_after_bytes_per_s);
        push("rounds", r.round_decode_ms.len() as f64);
        let (lo, hi) = range(&r.round_decode_ms);
        push("decode_ms_lo", lo);
        push("decode_ms_hi", hi);
        if let Some(fused) = r.decode_fused {
            push("decode_fused_ms", fused.total_ms());
        }
        if let Some(d) = r.fused_max_rel_diff {
            push("fused_max_rel_diff", d);
        }
        if let Some(partner) = r.partner_fused {
            push("partner_fused_ms", partner.total_ms());
        }
        if let Some(pct) = r.fused_stepped_roof_pct {
            push("fused_stepped_roof_pct", pct);
        }
        if !r.round_fused_speedup_stepped.is_empty() {
            push("fused_speedup_stepped_rounds", r.round_fused_speedup_stepped.len() as f64);
        }
        // The per-round paired ratios: median, lowest and highest (none without a 16-bit row).
        for (metric, ratios) in [
            ("speedup_16bit_paired", &r.round_speedup_16bit),
            ("fused_speedup_16bit_paired", &r.round_fused_speedup_16bit),
            ("fused_speedup_stepped", &r.round_fused_speedup_stepped),
        ] {
            if !ratios.is_empty() {
                let (lo, hi) = range(ratios);
                push(&format!("{metric}_median"), median(ratios));
                push(&format!("{metric}_lo"), lo);
                push(&format!("{metric}_hi"), hi);
            }
        }
    }
    let path = dir.join("measurements.csv");
    std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
    let path = dir.join("run.json");
    std::fs::write(&path, serde_json::to_string_pretty(info)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The smallest and largest of `v` (NaN-free measurements).
fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// The median of `v` (the mean of the middle two for an even count; NaN for none).
pub(super) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// `a / b` where both exist and `b > 0`.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Builds the table, the Markdown report and the figure from `measurements.csv` and `run.json`.
pub fn build(dir: &Path) -> Result<Report> {
    let info_path = dir.join("run.json");
    let info: RunInfo = serde_json::from_str(
        &std::fs::read_to_string(&info_path)
            .with_context(|| format!("reading {}", info_path.display()))?,
    )
    .with_context(|| format!("parsing {}", info_path.display()))?;
    let long = table::load_metrics(&[dir.join("measurements.csv")])?;
    let wide = table::wide(&long, &METRICS)?;

    let model = table::strings(&wide, "model")?;
    let scheme = table::strings(&wide, "bits")?;
    let kernel = table::strings(&wide, "method")?;
    let get = |m: &str| table::floats(&wide, m);
    let (layers, built) = (get("layers")?, get("layers_built")?);
    let (weights, linears) = (get("weight_bytes")?, get("decoder_linear_bytes")?);
    let (decode_bytes, rss) = (get("decode_bytes_per_token")?, get("rss_delta_bytes")?);
    let (positions, prefill) = (get("prefill_positions")?, get("prefill_ms")?);
    let (decode, head) = (get("decode_ms")?, get("decode_head_ms")?);
    let linears_ms = get("decode_linears_ms")?;
    let fallbacks = get("fallback_linears")?;
    let (roof_before, roof_after) =
        (get("roof_before_bytes_per_s")?, get("roof_after_bytes_per_s")?);
    let (rounds, decode_lo, decode_hi) =
        (get("rounds")?, get("decode_ms_lo")?, get("decode_ms_hi")?);
    let (paired, paired_lo, paired_hi) = (
        get("speedup_16bit_paired_median")?,
        get("speedup_16bit_paired_lo")?,
        get("speedup_16bit_paired_hi")?,
    );
    let (fused, fused_diff) = (get("decode_fused_ms")?, get("fused_max_rel_diff")?);
    let fused_stepped_roof_pct = get("fused_stepped_roof_pct")?;
    let (fused_paired, fused_paired_lo, fused_paired_hi) = (
        get("fused_speedup_16bit_paired_median")?,
        get("fused_speedup_16bit_paired_lo")?,
        get("fused_speedup_16bit_paired_hi")?,
    );
    let (partner_ms, stepped_rounds) =
        (get("partner_fused_ms")?, get("fused_speedup_stepped_rounds")?);
    let (stepped, stepped_lo, stepped_hi) = (
        get("fused_speedup_stepped_median")?,
        get("fused_speedup_stepped_lo")?,
        get("fused_speedup_stepped_hi")?,
    );
    let n = model.len();
    // The reference row of the same model for a scheme label.
    let find = |i: usize, label: &str| (0..n).find(|&j| model[j] == model[i] && scheme[j] == label);
    let gib = |v: Option<f64>| v.map(|b| b / (1u64 << 30) as f64);

    let mut c = Columns::default();
    for i in 0..n {
        let (bf16, fp32) = (find(i, "BF16"), find(i, "FP32"));
        // The fastest 16-bit row of the same model.
        let best16 = SIXTEEN_BIT
            .iter()
            .filter_map(|l| find(i, l))
            .filter(|&j| decode[j].is_some())
            .min_by(|&a, &b| {
                decode[a].unwrap_or(f64::INFINITY).total_cmp(&decode[b].unwrap_or(f64::INFINITY))
            });
        let speedup = |j: Option<usize>| j.and_then(|j| ratio(decode[j], decode[i]));
        let smaller = |j: Option<usize>| j.and_then(|j| ratio(weights[j], weights[i]));
        let gbs = ratio(decode_bytes[i], decode[i].map(|ms| ms / 1e3)).map(|b| b / 1e9);
        // The row's roof: the better of the two reads around it (the lower % of roof).
        let roof = match (roof_before[i], roof_after[i]) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let roof_pct = ratio(gbs.map(|g| 100.0 * g * 1e9), roof);
        // The decoder linears alone: their bytes over their own time.
        let linears_roof_pct =
            ratio(ratio(linears[i], linears_ms[i].map(|ms| ms / 1e3)).map(|b| 100.0 * b), roof);
        // The same steps through the fused decode path.
        let fused_roof_pct =
            ratio(ratio(decode_bytes[i], fused[i].map(|ms| ms / 1e3)).map(|b| 100.0 * b), roof);
        let best16_fused = SIXTEEN_BIT
            .iter()
            .filter_map(|l| find(i, l))
            .filter_map(|j| fused[j])
            .min_by(f64::total_cmp);
        let mut notes = Vec::new();
        for (what, pct) in [
            ("decode", roof_pct),
            ("linears alone", linears_roof_pct),
            ("fused decode", fused_roof_pct),
            ("fused decode, the roof read after each step", fused_stepped_roof_pct[i]),
        ] {
            if let Some(p) = pct.filter(|&p| p > 100.0) {
                notes.push(format!(
                    "ABOVE THE ROOF ({what}): {p:.0} % of the streaming read measured around it — the bytes counted or the time are wrong, or the machine's bandwidth moved between the reads"
                ));
            }
        }
        if let (Some(l), Some(b)) = (layers[i], built[i]) {
            if b < l {
                notes.push(format!(
                    "built with {b:.0} of {l:.0} layers; latency, memory and RSS extrapolated per layer"
                ));
            }
        }
        // A round whose partner did not fit beside the row (memory) has no stepped ratio.
        if let (Some(n), Some(all)) = (stepped_rounds[i], rounds[i]) {
            if n < all {
                notes.push(format!(
                    "step-paired ratio from {n:.0} of {all:.0} rounds (the 16-bit partner did not fit beside the row in the others)"
                ));
            }
        }
        if let Some(f) = fallbacks[i].filter(|&f| f > 0.0) {
            notes.push(format!("{f:.0} linears on the dequantized fallback"));
        }
        c.model.push(model[i].clone());
        c.scheme.push(scheme[i].clone());
        c.kernel.push(kernel[i].clone());
        c.layers.push(match (layers[i], built[i]) {
            (Some(l), Some(b)) if b < l => format!("{l:.0} (from {b:.0})"),
            (Some(l), _) => format!("{l:.0}"),
            _ => String::new(),
        });
        c.weights_gib.push(gib(weights[i]));
        c.linears_gib.push(gib(linears[i]));
        c.rss_gib.push(gib(rss[i]));
        c.prefill_ms.push(prefill[i]);
        c.prefill_tok_s.push(ratio(positions[i], prefill[i].map(|ms| ms / 1e3)));
        c.decode_ms.push(decode[i]);
        c.decode_tok_s.push(decode[i].and_then(|ms| ratio(Some(1e3), Some(ms))));
        // Measured in more than one round: the median of the per-round paired ratios.
        let several = rounds[i].is_some_and(|r| r > 1.0);
        c.speedup_16bit.push(if several { paired[i] } else { speedup(best16) });
        c.speedup_16bit_lo.push(if several { paired_lo[i] } else { None });
        c.speedup_16bit_hi.push(if several { paired_hi[i] } else { None });
        c.rounds.push(rounds[i]);
        c.decode_ms_lo.push(if several { decode_lo[i] } else { None });
        c.decode_ms_hi.push(if several { decode_hi[i] } else { None });
        c.best_16bit.push(best16.map_or_else(String::new, |j| scheme[j].clone()));
        c.speedup_bf16.push(speedup(bf16));
        c.speedup_fp32.push(speedup(fp32));
        c.mem_bf16.push(smaller(bf16));
        c.mem_fp32.push(smaller(fp32));
        c.linears_mem_bf16.push(bf16.and_then(|j| ratio(linears[j], linears[i])));
        c.decode_gb.push(decode_bytes[i].map(|b| b / 1e9));
        c.decode_gbs.push(gbs);
        c.roof_gbs.push(roof.map(|r| r / 1e9));
        c.roof_drift_pct.push(match (roof_before[i], roof_after[i]) {
            (Some(a), Some(b)) => ratio(Some(100.0 * (b - a)), Some(a)),
            _ => None,
        });
        c.roof_pct.push(roof_pct);
        c.linears_ms.push(linears_ms[i]);
        c.linears_roof_pct.push(linears_roof_pct);
        c.copy_bw_pct
            .push(ratio(gbs.map(|g| 100.0 * g * 1e9), Some(info.machine.copy_bytes_per_s)));
        c.gemv_bw_pct
            .push(ratio(gbs.map(|g| 100.0 * g * 1e9), Some(info.machine.gemv_bytes_per_s)));
        c.head_pct.push(ratio(head[i], decode[i]).map(|r| 100.0 * r));
        c.fused_ms.push(fused[i]);
        c.fused_roof_pct.push(fused_roof_pct);
        c.fused_roof_pct_stepped.push(fused_stepped_roof_pct[i]);
        c.fused_vs_step.push(ratio(decode[i], fused[i]));
        c.fused_speedup_16bit.push(if several {
            fused_paired[i]
        } else {
            ratio(best16_fused, fused[i])
        });
        c.fused_speedup_16bit_lo.push(if several { fused_paired_lo[i] } else { None });
        c.fused_speedup_16bit_hi.push(if several { fused_paired_hi[i] } else { None });
        c.fused_rel_diff.push(fused_diff[i]);
        c.partner_fused_ms.push(partner_ms[i]);
        c.fused_speedup_stepped.push(stepped[i]);
        c.fused_speedup_stepped_lo.push(if several { stepped_lo[i] } else { None });
        c.fused_speedup_stepped_hi.push(if several { stepped_hi[i] } else { None });
        c.note.push(notes.join("; "));
    }
    for s in &info.skipped {
        c.skip(s);
    }
    let targets = targets(&c);
    let mut df = c.frame()?;

    let csv = dir.join("efficiency.csv");
    let md = dir.join("efficiency.md");
    let title = format!(
        "Efficiency — FP32 / BF16 / W8A16 / W8A8 / W4A16 / W4A8 / W4A4 on LLaVA-shaped models (random weights){}, against the memory roof",
        if info.config.checkpoints.is_empty() { "" } else { " and checkpoints as stored" }
    );
    let title = title.as_str();
    let note = format!(
        "Machine: {}. Run wall time {:.0} s (config `{}`).",
        info.machine.describe(),
        info.wall_seconds,
        info.config_file.display()
    );
    table::write(&mut df, &csv, &md, title, &note)?;
    let mut text = String::from("\n#### Targets (this machine)\n\n");
    for t in &targets {
        text.push_str(&format!("- {}\n", t.line()));
    }
    if targets.is_empty() {
        text.push_str("- no shape had a W4A16 or an own-kernel BF16 row: nothing to check\n");
    }
    text.push_str(&method_notes(&info));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&md)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", md.display()))?;

    let points: Vec<figure::RooflinePoint> = (0..n)
        .filter_map(|i| {
            Some(figure::RooflinePoint {
                scheme: c.scheme[i].clone(),
                model: c.model[i].clone(),
                gb_per_token: c.decode_gb[i]?,
                tokens_per_s: c.decode_tok_s[i]?,
            })
        })
        .collect();
    // Figures are written as `<path>.png` and `<path>.svg` (the extension is appended).
    let fig = dir.join("decode_roofline");
    let roof = info.machine.roof_bytes_per_s / 1e9;
    figure::roofline(&fig, "Decode vs the memory roof (streaming read)", roof, &points)?;
    let (png, svg) = (dir.join("decode_roofline.png"), dir.join("decode_roofline.svg"));
    Ok(Report { table: df, targets, files: vec![csv, md, png, svg] })
}

/// The table's columns, filled row by row.
#[derive(Default)]
struct Columns {
    model: Vec<String>,
    scheme: Vec<String>,
    kernel: Vec<String>,
    layers: Vec<String>,
    weights_gib: Vec<Option<f64>>,
    linears_gib: Vec<Option<f64>>,
    rss_gib: Vec<Option<f64>>,
    prefill_ms: Vec<Option<f64>>,
    prefill_tok_s: Vec<Option<f64>>,
    decode_ms: Vec<Option<f64>>,
    decode_tok_s: Vec<Option<f64>>,
    speedup_16bit: Vec<Option<f64>>,
    speedup_16bit_lo: Vec<Option<f64>>,
    speedup_16bit_hi: Vec<Option<f64>>,
    rounds: Vec<Option<f64>>,
    decode_ms_lo: Vec<Option<f64>>,
    decode_ms_hi: Vec<Option<f64>>,
    best_16bit: Vec<String>,
    speedup_bf16: Vec<Option<f64>>,
    speedup_fp32: Vec<Option<f64>>,
    mem_bf16: Vec<Option<f64>>,
    mem_fp32: Vec<Option<f64>>,
    linears_mem_bf16: Vec<Option<f64>>,
    decode_gb: Vec<Option<f64>>,
    decode_gbs: Vec<Option<f64>>,
    roof_gbs: Vec<Option<f64>>,
    roof_drift_pct: Vec<Option<f64>>,
    roof_pct: Vec<Option<f64>>,
    linears_ms: Vec<Option<f64>>,
    linears_roof_pct: Vec<Option<f64>>,
    copy_bw_pct: Vec<Option<f64>>,
    gemv_bw_pct: Vec<Option<f64>>,
    head_pct: Vec<Option<f64>>,
    fused_ms: Vec<Option<f64>>,
    fused_roof_pct: Vec<Option<f64>>,
    fused_roof_pct_stepped: Vec<Option<f64>>,
    fused_vs_step: Vec<Option<f64>>,
    fused_speedup_16bit: Vec<Option<f64>>,
    fused_speedup_16bit_lo: Vec<Option<f64>>,
    fused_speedup_16bit_hi: Vec<Option<f64>>,
    fused_rel_diff: Vec<Option<f64>>,
    partner_fused_ms: Vec<Option<f64>>,
    fused_speedup_stepped: Vec<Option<f64>>,
    fused_speedup_stepped_lo: Vec<Option<f64>>,
    fused_speedup_stepped_hi: Vec<Option<f64>>,
    note: Vec<String>,
}

impl Columns {
    fn skip(&mut self, s: &Skipped) {
        self.model.push(s.model.clone());
        self.scheme.push(s.schemes.clone());
        self.kernel.push("–".into());
        self.layers.push(String::new());
        self.best_16bit.push(String::new());
        for col in [
            &mut self.weights_gib,
            &mut self.linears_gib,
            &mut self.rss_gib,
            &mut self.prefill_ms,
            &mut self.prefill_tok_s,
            &mut self.decode_ms,
            &mut self.decode_tok_s,
            &mut self.speedup_16bit,
            &mut self.speedup_16bit_lo,
            &mut self.speedup_16bit_hi,
            &mut self.rounds,
            &mut self.decode_ms_lo,
            &mut self.decode_ms_hi,
            &mut self.speedup_bf16,
            &mut self.speedup_fp32,
            &mut self.mem_bf16,
            &mut self.mem_fp32,
            &mut self.linears_mem_bf16,
            &mut self.decode_gb,
            &mut self.decode_gbs,
            &mut self.roof_gbs,
            &mut self.roof_drift_pct,
            &mut self.roof_pct,
            &mut self.linears_ms,
            &mut self.linears_roof_pct,
            &mut self.copy_bw_pct,
            &mut self.gemv_bw_pct,
            &mut self.head_pct,
            &mut self.fused_ms,
            &mut self.fused_roof_pct,
            &mut self.fused_roof_pct_stepped,
            &mut self.fused_vs_step,
            &mut self.fused_speedup_16bit,
            &mut self.fused_speedup_16bit_lo,
            &mut self.fused_speedup_16bit_hi,
            &mut self.fused_rel_diff,
            &mut self.partner_fused_ms,
            &mut self.fused_speedup_stepped,
            &mut self.fused_speedup_stepped_lo,
            &mut self.fused_speedup_stepped_hi,
        ] {
            col.push(None);
        }
        self.note.push(format!("skipped: {}", s.reason));
    }

    fn frame(&self) -> Result<DataFrame> {
        let f = |name: &str, v: &Vec<Option<f64>>| Column::new(name.into(), v.clone());
        Ok(DataFrame::new_infer_height(vec![
            Column::new("model".into(), self.model.clone()),
            Column::new("scheme".into(), self.scheme.clone()),
            Column::new("kernel".into(), self.kernel.clone()),
            Column::new("layers".into(), self.layers.clone()),
            f("weights_gib", &self.weights_gib),
            f("dec_linears_gib", &self.linears_gib),
            f("rss_delta_gib", &self.rss_gib),
            f("prefill_ms", &self.prefill_ms),
            f("prefill_tok_s", &self.prefill_tok_s),
            f("decode_ms", &self.decode_ms),
            f("rounds", &self.rounds),
            f("decode_ms_lo", &self.decode_ms_lo),
            f("decode_ms_hi", &self.decode_ms_hi),
            f("decode_tok_s", &self.decode_tok_s),
            f("speedup_vs_16bit", &self.speedup_16bit),
            f("speedup_vs_16bit_lo", &self.speedup_16bit_lo),
            f("speedup_vs_16bit_hi", &self.speedup_16bit_hi),
            Column::new("best_16bit".into(), self.best_16bit.clone()),
            f("speedup_vs_bf16", &self.speedup_bf16),
            f("speedup_vs_fp32", &self.speedup_fp32),
            f("mem_x_vs_bf16", &self.mem_bf16),
            f("mem_x_vs_fp32", &self.mem_fp32),
            f("dec_linears_x_vs_bf16", &self.linears_mem_bf16),
            f("decode_gb_per_tok", &self.decode_gb),
            f("decode_gb_s", &self.decode_gbs),
            f("roof_gb_s", &self.roof_gbs),
            f("roof_drift_pct", &self.roof_drift_pct),
            f("roof_pct", &self.roof_pct),
            f("linears_ms", &self.linears_ms),
            f("linears_roof_pct", &self.linears_roof_pct),
            f("copy_bw_pct", &self.copy_bw_pct),
            f("gemv_bw_pct", &self.gemv_bw_pct),
            f("head_pct", &self.head_pct),
            f("fused_decode_ms", &self.fused_ms),
            f("fused_roof_pct", &self.fused_roof_pct),
            f("fused_roof_pct_stepped", &self.fused_roof_pct_stepped),
            f("fused_x_vs_step", &self.fused_vs_step),
            f("fused_speedup_vs_16bit", &self.fused_speedup_16bit),
            f("fused_speedup_vs_16bit_lo", &self.fused_speedup_16bit_lo),
            f("fused_speedup_vs_16bit_hi", &self.fused_speedup_16bit_hi),
            f("fused_max_rel_diff", &self.fused_rel_diff),
            f("bf16_own_stepped_fused_ms", &self.partner_fused_ms),
            f("fused_speedup_vs_bf16_own_stepped", &self.fused_speedup_stepped),
            f("fused_speedup_vs_bf16_own_stepped_lo", &self.fused_speedup_stepped_lo),
            f("fused_speedup_vs_bf16_own_stepped_hi", &self.fused_speedup_stepped_hi),
            Column::new("note".into(), self.note.clone()),
        ])?)
    }
}

/// The targets: for every W4A16 row, its speed-up over the fastest 16-bit row, its share of the
/// roof and its memory ratios; for every own-kernel BF16 row, its share of the roof.
fn targets(c: &Columns) -> Vec<Target> {
    let mut out = Vec::new();
    for i in 0..c.model.len() {
        let label = &c.scheme[i];
        let model = &c.model[i];
        let mut push = |what: &str, value: Option<f64>, threshold: f64| {
            if let Some(value) = value {
                let met = value >= threshold;
                out.push(Target { model: model.clone(), what: what.into(), value, threshold, met });
            }
        };
        let roof = format!("{label} decode weight traffic, % of the memory roof (streaming read)");
        let alone = format!(
            "{label} decoder linears alone (same weights, one token), % of the memory roof"
        );
        let fused_roof =
            format!("{label} decode weight traffic on the fused decode path, % of the memory roof");
        let fused_roof_stepped = format!(
            "{label} decode weight traffic on the fused decode path, % of the roof read right after each step (median over steps)"
        );
        if label == "BF16 own" {
            push(&roof, c.roof_pct[i], TARGET_ROOF_PCT);
            push(&alone, c.linears_roof_pct[i], TARGET_ROOF_PCT);
            push(&fused_roof, c.fused_roof_pct[i], TARGET_ROOF_PCT);
            push(&fused_roof_stepped, c.fused_roof_pct_stepped[i], TARGET_ROOF_PCT);
        }
        if !label.starts_with("W4A16") {
            continue;
        }
        push(
            &format!(
                "{label} decode speed-up over the fastest 16-bit row ({}) (×)",
                c.best_16bit[i]
            ),
            c.speedup_16bit[i],
            TARGET_SPEEDUP,
        );
        push(&roof, c.roof_pct[i], TARGET_ROOF_PCT);
        push(&alone, c.linears_roof_pct[i], TARGET_ROOF_PCT);
        push(
            &format!(
                "{label} fused decode speed-up over the fastest 16-bit row's fused decode (×)"
            ),
            c.fused_speedup_16bit[i],
            TARGET_SPEEDUP,
        );
        push(
            &format!(
                "{label} fused decode speed-up over the own bf16 fused step, paired step by step (×)"
            ),
            c.fused_speedup_stepped[i],
            TARGET_SPEEDUP,
        );
        push(&fused_roof, c.fused_roof_pct[i], TARGET_ROOF_PCT);
        push(&fused_roof_stepped, c.fused_roof_pct_stepped[i], TARGET_ROOF_PCT);
        push(
            &format!("{label} whole-model memory, BF16/FP16 bytes ÷ W4 bytes (×)"),
            c.mem_bf16[i],
            TARGET_MEMORY_RATIO,
        );
        push(
            &format!("{label} decoder-linear memory, BF16/FP16 bytes ÷ W4 bytes (×)"),
            c.linears_mem_bf16[i],
            TARGET_MEMORY_RATIO,
        );
    }
    out
}

/// How the numbers were taken, for the report.
fn method_notes(info: &RunInfo) -> String {
    let cfg = &info.config;
    let m = &cfg.measure;
    let prefill = if m.prefill_image {
        format!(
            "{} random text tokens around one random image (vision tower + projector or merger + its tokens in the decoder, all timed)",
            m.prefill_tokens
        )
    } else {
        format!(
            "{} random text tokens, text only (no image: the vision tower is not timed)",
            m.prefill_tokens
        )
    };
    let parts = &cfg.model.packed_parts;
    let packed = parts
        .iter()
        .map(|p| match p {
            Part::Decoder => "every decoder linear (q/k/v/o, gate/up/down)",
            Part::Vision => "every vision-tower linear",
            Part::Projector => "the projector's linears",
            Part::LmHead => "`lm_head`",
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut float = vec!["embeddings", "norms", "biases"];
    for (p, name) in [
        (Part::Vision, "the vision tower"),
        (Part::Projector, "the projector"),
        (Part::LmHead, "`lm_head`"),
    ] {
        if !parts.contains(&p) {
            float.push(name);
        }
    }
    let float = float.join(", ");
    let mut s = String::from("\n#### How it was measured\n\n");
    s.push_str(&format!(
        "- Models: LLaVA-1.5-shaped (CLIP ViT-L/14-336, `mlp2x_gelu` projector, LLaMA decoder) and Qwen2-VL-shaped (`qwen2-vl-7b`: its ViT, whose linears count as `vision`, the patch merger as `projector`, the Qwen2-7B decoder with 4 key/value heads for 28 query heads, a q/k/v bias and M-RoPE; a prefill image is 336 px square, 144 merged tokens) with random weights; nothing downloaded, accuracy irrelevant. The packed schemes pack {packed}; {float} stay in the model's float dtype (bf16; f32 for FP32). Packed codes are random (kernel speed and bytes do not depend on their values). The `kernel` column names the decoder linears' kernel: `int4_avx512` / `int4_avx2` is this project's own W4A16 kernel at the CPU's SIMD level (`qvlm_core::quant::int4_avx512`; its prefill, more than one row, runs in bf16 pairs on CPUs with AVX512-BF16 — `avx512_bf16` in the machine's ISA list — since the bf16 model's activations are bf16 values, `qvlm_core::quant::int4_pairs`, and in f32 elsewhere), `int4_cpu` libtorch's `_weight_int4pack_mm_for_cpu`, `bf16_avx512` / `bf16_avx2` this project's own bf16 kernel (`qvlm_core::quant::bf16_own`, row `BF16 own`: the same bf16 weights as `BF16`, multiplied in f32 and streamed at the memory roof; `BF16` is libtorch's `linear`), `int4_vnni` this project's AVX-512 VNNI kernel on the same 4-bit codes (`qvlm_core::quant::int4_vnni`: activations on an integer grid, `vpdpbusd` in i32) — row `W4A16 … q8` rounds the float activations to int8 per group of inputs on the fly (a different numeric from `W4A16`, whose kernel is exact in f32), rows `W4A8` / `W4A4` put them on a symmetric int8 / int4 grid per token (their fake-quant arithmetic, bit for bit in the integer codes).\n\
         - One bf16 model per shape (when the whole shape does not fit in memory, `model.partial_layers` decoder layers or as many as fit, and every row of the shape extrapolated per layer like FP32: the `note` column says so); BF16 is measured first, then each packed scheme replaces the weights linear by linear (W8A8 reuses W8A16's int8 codes, every W4 row the first W4 row's codes), so one configuration's packed weights are resident at a time. FP32 is a separate build{}.\n\
         - Prefill: batch 1, {prefill}, into a fresh KV cache, after one untimed 4-token forward; `prefill_tok_s` = positions / prefill time.\n\
         - Decode: greedy, M = 1 with the KV cache after the prefill; {} warm-up steps discarded, the mean of {} timed steps reported (`decode_ms`: embedding + decoder layers + final norm, `lm_head`, argmax; `head_pct`: the share of the last three).\n\
         - Memory: `weights_gib` is exact — packed storage `bytes()` (codes, f32 scales, u8 zero points) for every packed weight, `numel · element size` for the rest. `rss_delta_gib` is `VmRSS` after the measurement minus `VmRSS` before the model was built (it includes the KV cache, activations, allocator slack and, on libtorch's int4 kernel, its own second copy of the codes that `bytes()` does not count; the own AVX-512 kernel holds the only copy). For a shape measured after another it can be below the weights: memory the allocator kept from the earlier shape is reused.\n\
         - Roof: `decode_gb_per_tok` = decoder-linear bytes + norms + `lm_head` (as held: packed when `packed_parts` lists it) + one embedding row (the KV cache is not counted); `decode_gb_s` = that / decode time. `roof_gb_s` is the memory roof of the row: a pure streaming read ({} MiB summed by the kernels' own thread team, best of {}) measured just before and just after the row, the higher of the two (`roof_drift_pct`: after vs before, the machine's drift during the row); `roof_pct` = `decode_gb_s` / `roof_gb_s`. The roof's sum reads like the kernels (four vector accumulators) in four software-prefetch variants — none, into L1 6 KiB ahead (the kernels' AVX2 variants), into L2 16 KiB and L1 4 KiB ahead (their AVX-512 variants), and that two-level one with each line also consumed as the own bf16 kernel consumes its weights (a shift, a mask and two FMAs beside the sum; `team::ReadPrefetch::TwoLevelPaced`, since 2026-12-06) — alternated within each read, and the fastest counts: which one wins differs between CPUs (the AMD EPYC of 2026-12-05 read 36–56 GB/s with the L1 one and 34–42 with the two-level one; the Intel Xeon with AVX512-BF16 of the same day 29.1–29.8, 30.4–31.3 without, 31.6–32.5 two-level, where a roof on the L1 variant alone was exceeded by the own bf16 kernel, 111–114 %; on 2026-12-06 the paced one read 31.1–32.5 against 28.9–30.2 for the bare two-level sum there); a plain vectorised sum read 8–25 % less on the AMD EPYC of 2026-12-02, below what the kernels alone streamed. `linears_ms`: the decoder's linears alone — every decoder linear of the built model once, in layer order, on one token of the right width (the same weights, kernels and tensor wrappers a decode step calls, without the attention, norms, activations and KV cache between them), one pass right after each decode step (the warm-up ones included, untimed) and their mean, extrapolated per layer: each pass is paired with its step, since the machine's bandwidth moves within seconds; `linears_roof_pct` = decoder-linear bytes / `linears_ms` / `roof_gb_s`: how near the kernels come to the roof inside the model; `decode_ms` minus `linears_ms` is what the rest of a step costs. A row above 100 % of its roof (either column) is flagged in `note` (its bytes or its time would be wrong, or the machine's bandwidth moved between the reads). `fused_decode_ms`: the same decode steps again through the fused decode path (`qvlm_core::model::fused`, CPU only: the same model and weights, its linears on their kernels, the norms, rotary embedding, KV cache, attention, SwiGLU and residuals as loops over f32 buffers rounded to the model's dtype where libtorch's operators round, instead of about ninety libtorch operators a layer), each right after its libtorch step — the same token and position, on its own copy of the prefilled KV cache — timed the same way (embedding + layers, then the same head); `fused_roof_pct`, `fused_speedup_vs_16bit` (paired per round like `speedup_vs_16bit`, against the fastest 16-bit row's fused step) and `fused_x_vs_step` (= `decode_ms` / `fused_decode_ms`) follow; `fused_max_rel_diff`: the largest difference of a fused step's final hidden state from its libtorch step's, relative to the latter's largest |value| (0: bit-identical), over every step of every round (each round's model has its own random weights, and whether a bf16 rounding flips somewhere in 32–40 layers depends on them). `bf16_own_stepped_fused_ms` and `fused_speedup_vs_bf16_own_stepped` (W4 rows, with `measure.step_paired_16bit`): a second model of the shape, with as many layers, on the own bf16 kernel — the BF16 own row's model — built beside the round's W4 model, whose fused step follows each of the row's fused steps on the same token and position; the ratio is its mean fused step ÷ the row's, per round (median, and range over the rounds; the row's `note` says when a round had no partner), so both sides met the same bandwidth within seconds, where `fused_speedup_vs_16bit` pairs rows measured minutes apart; the partner's step runs after the row's fused step on even steps, before it on odd ones; `bf16_own_stepped_fused_ms` is the partner's mean step in the row's median round (by decode time), so it need not divide into the median ratio. Secondary references of the start of the run: `copy_bw_pct` (a large tensor copy, bytes read + written; a decode can exceed it, since a copy also reads each target line before writing it) and `gemv_bw_pct` (libtorch's f32 GEMV over the same bytes; compute-bound on some CPUs).\n\
         - Rounds (`measure.rounds`): the BF16 family of a shape (BF16 and every packed scheme) is built and measured that many times, one round after the other; each row is its round with the median decode time (`decode_ms_lo`/`decode_ms_hi`: the range over rounds) and, with more than one round, `speedup_vs_16bit` is the median over rounds of the paired ratio (that round's fastest 16-bit decode / this scheme's decode in the same round; `speedup_vs_16bit_lo`/`_hi`: its range), so that a machine whose bandwidth drifts between rounds moves both sides of each ratio. FP32 is measured once.\n\
         - Ratios: `speedup_vs_16bit` = decode time of the fastest 16-bit row of the same model (`best_16bit`: `BF16`, libtorch's linear, or `BF16 own`, the own memory-bound kernel) / this decode time (the paired median above with several rounds); `speedup_vs_bf16` and `speedup_vs_fp32` against libtorch's BF16 and FP32 rows; `mem_x_vs_*` = reference weight bytes / these weight bytes (BF16 stands in for FP16: both 2 bytes); all references from the same run.\n",
        match cfg.model.fp32_layers {
            Some(l) => format!(
                " with at most {l} decoder layers, its latency (decoder part), weight bytes and RSS extrapolated linearly per layer to the shape's count (the `note` column says so)"
            ),
            None => String::new(),
        },
        m.warmup_tokens,
        m.decode_tokens,
        cfg.bandwidth.mib,
        cfg.bandwidth.repeats,
    ));
    if let Some(mib) = m.roof_each_step_mib {
        s.push_str(&format!(
            "- The roof after every step (`measure.roof_each_step_mib` = {mib}): right after each fused decode step, one streaming read of {mib} MiB in every prefetch variant (the fastest counts; one buffer per row, allocated before its steps); `fused_roof_pct_stepped` is the median over the row's timed steps of that step's `decode_gb_per_tok` over its time (extrapolated per layer like `fused_decode_ms`) ÷ the roof read after it — each step against the bandwidth of its own seconds, where `fused_roof_pct` takes the fused steps' mean against the higher of two reads 10–30 s apart. A single read per variant is noisier than `roof_gb_s`'s best of {}, and its maximum over the variants errs high, which lowers the share.\n",
            cfg.bandwidth.repeats
        ));
    }
    if !cfg.checkpoints.is_empty() {
        let list: Vec<String> = cfg
            .checkpoints
            .iter()
            .map(|c| format!("`{}` ({})", c.name, c.path.display()))
            .collect();
        s.push_str(&format!(
            "- Checkpoints ({}): loaded from their directories as `generate` and the grids load them (compressed-tensors into packed weights on this machine's kernels; float parts in bf16) and measured as stored (`as stored`: its real weights, every stored format as stored, so the `kernel` column names what ran); then, in the same round, the linears it holds packed (and only those) are dequantized to bf16 and put on the own bf16 kernel (`BF16 own`): the fair 16-bit row of the same weights, which its `speedup_vs_16bit` uses. Nothing is extrapolated.\n",
            list.join(", ")
        ));
    }
    if !info.skipped.is_empty() {
        s.push_str("\n#### Not run\n\n");
        for k in &info.skipped {
            s.push_str(&format!("- {} ({}): {}\n", k.model, k.schemes, k.reason));
        }
    }
    s
}
