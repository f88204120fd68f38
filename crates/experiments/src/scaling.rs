//! What a search costs as the model grows (issue #21): the work of a float forward over the
//! calibration set, the cells' measured search time and memory against it, a power law fitted per
//! strategy, and its extrapolation to LLaVA-1.5-7B and 13B — labelled as such.
//!
//! The cost model, per strategy: `seconds = a + b · F`, least squares over the measured sizes,
//! where `F` is the float forward FLOPs of the calibration set ([`ForwardShape::flops`]): `a` is
//! what does not grow with the work (per-call overheads, which dominate the smallest models) and
//! `b` the seconds per FLOP of the work itself. Every strategy is a number of forwards of parts of
//! the model over the calibration data, so its work is proportional to `F` at a fixed depth of
//! search. The log-log slope of the points is given beside it: near 1 the points are work-bound
//! and the extrapolation rests on them; well below 1 they are overhead-bound and `b` is poorly
//! determined. The error is given twice: on the measured points, and by predicting the largest
//! measured size from the others (the honest error of an extrapolation).
//!
//! The memory model (issue #21 item 3, asserted by a test): during a block-by-block search the
//! process's peak RSS is at most twice the model's tensors (the float model and the quantized
//! copy of its linears the search keeps) + 3 · one block's calibration activations `A`
//! ([`ForwardShape::block_activation_bytes`]) + [`MEMORY_BOUND_CONSTANT_BYTES`] (768 MiB:
//! libtorch, the tokenizer and dataset, the float reference, allocator slack) — nothing that grows
//! with the depth. It is measured with
//! one process per cell (`make scaling`): a process that ran earlier cells keeps their freed
//! memory, and its peak would include it. VEO (and Q-VLM, which runs it) back-propagates through the whole model over a
//! calibration batch: not bounded by one block, and not extrapolated.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use polars::prelude::{Column, DataFrame};
use qvlm_core::io::config::{LlavaConfig, ProjectorKind, SelectFeature};

use crate::results::ResultsDir;
use crate::table::{self, Tables};

/// Text tokens per calibration pair assumed for the extrapolation (LLaVA-1.5's system prompt,
/// question and answer in the vicuna_v1 template are about 60–80 tokens with its tokenizer).
pub const EXTRAPOLATION_TEXT_TOKENS: i64 = 64;
/// Calibration pairs of the extrapolation (the paper's 64).
pub const EXTRAPOLATION_PAIRS: usize = 64;

/// The shapes that set the work of a LLaVA forward.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardShape {
    /// CLIP layers run (up to the select layer), hidden size, MLP size, tokens (patches + CLS).
    pub vision_layers: i64,
    pub vision_hidden: i64,
    pub vision_intermediate: i64,
    pub vision_tokens: i64,
    /// Image tokens spliced into the language sequence.
    pub image_tokens: i64,
    /// Multiply-adds of the projector per image token.
    pub projector_macs: i64,
    pub language_layers: i64,
    pub language_hidden: i64,
    pub language_intermediate: i64,
    /// Query and key/value widths (heads × head dim).
    pub language_q: i64,
    pub language_kv: i64,
    pub language_heads: i64,
    pub vision_heads: i64,
}

impl ForwardShape {
    pub fn of(cfg: &LlavaConfig) -> Self {
        let (v, t) = (&cfg.vision, &cfg.text);
        let image_tokens = v.num_patches()
            + match cfg.select_feature {
                SelectFeature::Default => 0,
                SelectFeature::Full => 1,
            };
        let projector_macs = match cfg.projector {
            ProjectorKind::Linear => v.hidden_size * t.hidden_size,
            ProjectorKind::Mlp2xGelu => v.hidden_size * t.hidden_size + t.hidden_size.pow(2),
        };
        Self {
            vision_layers: cfg.vision_layers_used(),
            vision_hidden: v.hidden_size,
            vision_intermediate: v.intermediate_size,
            vision_tokens: v.num_patches() + 1,
            image_tokens,
            projector_macs,
            language_layers: t.num_hidden_layers,
            language_hidden: t.hidden_size,
            language_intermediate: t.intermediate_size,
            language_q: t.num_attention_heads * t.head_dim,
            language_kv: t.num_key_value_heads * t.head_dim,
            language_heads: t.num_attention_heads,
            vision_heads: v.num_attention_heads,
        }
    }

    /// LLaVA-1.5 (llava-hf `config.json`): CLIP ViT-L/14-336 (1024 wide, 24 layers of which 23
    /// run for `vision_feature_layer = -2`, 577 tokens), the mlp2x_gelu projector, Vicuna
    /// (`hidden`, `layers`, `intermediate`, `heads` with head dim 128).
    pub fn llava_1_5(hidden: i64, layers: i64, intermediate: i64, heads: i64) -> Self {
        Self {
            vision_layers: 23,
            vision_hidden: 1024,
            vision_intermediate: 4096,
            vision_tokens: 577,
            image_tokens: 576,
            projector_macs: 1024 * hidden + hidden * hidden,
            language_layers: layers,
            language_hidden: hidden,
            language_intermediate: intermediate,
            language_q: heads * 128,
            language_kv: heads * 128,
            language_heads: heads,
            vision_heads: 16,
        }
    }

    /// The extrapolation targets.
    pub fn targets() -> [(&'static str, ForwardShape); 2] {
        [
            ("LLaVA-1.5-7B", Self::llava_1_5(4096, 32, 11008, 32)),
            ("LLaVA-1.5-13B", Self::llava_1_5(5120, 40, 13824, 40)),
        ]
    }

    /// Parameters of the linear layers that run (the searched sites; `lm_head` and embeddings
    /// are left out).
    pub fn linear_parameters(&self) -> f64 {
        let (vh, vi) = (self.vision_hidden as f64, self.vision_intermediate as f64);
        let (h, i) = (self.language_hidden as f64, self.language_intermediate as f64);
        let (q, kv) = (self.language_q as f64, self.language_kv as f64);
        self.vision_layers as f64 * (4.0 * vh * vh + 2.0 * vh * vi)
            + self.projector_macs as f64
            + self.language_layers as f64 * (2.0 * h * q + 2.0 * h * kv + 3.0 * h * i)
    }

    /// FLOPs of one float forward over pairs whose language sequences have `seq_lens` tokens
    /// (image tokens included): 2 per multiply-add of every linear that runs, and 4·T²·width per
    /// attention layer (scores and their weighted sum). `lm_head` is left out (the search never
    /// needs the logits but for VEO's loss; 2 % of LLaVA-7B's work per token).
    pub fn flops(&self, seq_lens: &[i64]) -> f64 {
        let (vh, vi) = (self.vision_hidden as f64, self.vision_intermediate as f64);
        let (h, i) = (self.language_hidden as f64, self.language_intermediate as f64);
        let (q, kv) = (self.language_q as f64, self.language_kv as f64);
        let vt = self.vision_tokens as f64;
        let per_image = self.vision_layers as f64
            * (2.0 * vt * (4.0 * vh * vh + 2.0 * vh * vi) + 4.0 * vt * vt * vh)
            + 2.0 * self.image_tokens as f64 * self.projector_macs as f64;
        seq_lens
            .iter()
            .map(|&s| {
                let s = s as f64;
                per_image
                    + self.language_layers as f64
                        * (2.0 * s * (2.0 * h * q + 2.0 * h * kv + 3.0 * h * i) + 4.0 * s * s * q)
            })
            .sum()
    }

    /// Bytes of what one block's forward materialises over the calibration set, the larger of a
    /// decoder layer and a CLIP layer, at `element_bytes` per value: per token the block input,
    /// two norms, q/k/v, the attention output, the output projection and the residual sum, the
    /// MLP's inner activations (three for SwiGLU, two for CLIP), plus the attention
    /// probabilities (heads × T² per pair). The bound of issue #21's bounded-memory claim.
    pub fn block_activation_bytes(&self, seq_lens: &[i64], element_bytes: usize) -> f64 {
        let (h, i) = (self.language_hidden as f64, self.language_intermediate as f64);
        let (q, kv) = (self.language_q as f64, self.language_kv as f64);
        let language: f64 = seq_lens
            .iter()
            .map(|&s| {
                let s = s as f64;
                s * (5.0 * h + 2.0 * q + 2.0 * kv + 3.0 * i) + self.language_heads as f64 * s * s
            })
            .sum();
        let (vh, vi, vt) =
            (self.vision_hidden as f64, self.vision_intermediate as f64, self.vision_tokens as f64);
        let vision = seq_lens.len() as f64
            * (vt * (9.0 * vh + 2.0 * vi) + self.vision_heads as f64 * vt * vt);
        language.max(vision) * element_bytes as f64
    }
}

/// One measured (model, method) point: the mean over its cells (seeds).
#[derive(Clone, Debug, Default)]
struct Point {
    model: String,
    method: String,
    parameters: f64,
    calibration_tokens: f64,
    flops: f64,
    block_activation_bytes: f64,
    seconds: f64,
    candidate_evaluations: f64,
    block_forwards: f64,
    model_passes: f64,
    peak_rss: f64,
    rss_start: f64,
    model_bytes: f64,
    cells: usize,
}

/// `y = a + b·x` by least squares: `(a, b)`.
fn least_squares(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    crate::figure::least_squares(points)
}

/// `seconds = a + b · F` of a strategy's points.
#[derive(Clone, Debug)]
pub struct LinearCost {
    pub overhead_seconds: f64,
    pub seconds_per_flop: f64,
}

impl LinearCost {
    fn of(points: &[(f64, f64)]) -> Option<Self> {
        least_squares(points).map(|(a, b)| Self { overhead_seconds: a, seconds_per_flop: b })
    }

    pub fn predict(&self, flops: f64) -> f64 {
        self.overhead_seconds + self.seconds_per_flop * flops
    }
}

/// The log-log slope of `(F, seconds)` points (1: work-bound).
fn loglog_slope(points: &[(f64, f64)]) -> Option<f64> {
    let logs: Vec<_> = points.iter().map(|&(f, s)| (f.ln(), s.ln())).collect();
    least_squares(&logs).map(|(_, slope)| slope)
}

/// The bounded-memory formula's constant: what is not derived from the shapes (libtorch's code
/// and allocator, the tokenizer and dataset, the float reference, slack). Measured, not derived:
/// on the scaling series (AVX-512 VNNI EPYC, 2026-12-03) the peak beyond `2 · tensors + 3 · A`
/// ranged from 138 MiB (sequential, s3) to 560 MiB (rtn, s4; 549 MiB for cdm on s3). It was
/// 512 MiB until rtn on s4 went 0.8 % over the formula (README "Scale"); 768 MiB leaves 208 MiB
/// above the largest measured of those. CDM on s4 went over (6.17 GiB, 106.7 %) until the walk
/// trimmed the heap before each block (`qvlm_core::memory::release_freed_heap`): with the trim,
/// in one `make scaling` (2026-12-03, 21:29–23:23 UTC), the excess is −90 to 388 MiB on rtn,
/// sequential and cdm s0–s4 (cdm s4: 93.1 %), 380 MiB below the constant.
pub const MEMORY_BOUND_CONSTANT_BYTES: f64 = 768.0 * (1u64 << 20) as f64;

/// The bounded-memory formula: the peak RSS of a process during a block-by-block search.
pub fn memory_bound_bytes(model_tensor_bytes: f64, block_activation_bytes: f64) -> f64 {
    2.0 * model_tensor_bytes + 3.0 * block_activation_bytes + MEMORY_BOUND_CONSTANT_BYTES
}

/// One strategy's fit.
struct FitRow {
    method: String,
    sizes: usize,
    fit: LinearCost,
    slope: Option<f64>,
    /// Relative errors of the fit on its own points (root mean square, largest).
    rms: f64,
    max: f64,
    /// The largest size predicted from the others, relative error.
    holdout: Option<f64>,
    /// Whether every point searched block by block (no whole-model passes).
    blockwise: bool,
}

/// Reads the quantized cells' cost metrics and timings into points.
fn points(tables: &Tables, results: &ResultsDir) -> Result<Vec<Point>> {
    let long = &tables.long;
    let (cells, models, bits, methods, metrics) = (
        table::strings(long, "cell")?,
        table::strings(long, "model")?,
        table::strings(long, "bits")?,
        table::strings(long, "method")?,
        table::strings(long, "metric")?,
    );
    let values = table::floats(long, "value")?;
    let mut by_cell: BTreeMap<String, (String, String, BTreeMap<String, f64>)> = BTreeMap::new();
    for r in 0..long.height() {
        if bits[r] == "FP" {
            continue;
        }
        let e = by_cell
            .entry(cells[r].clone())
            .or_insert_with(|| (models[r].clone(), methods[r].clone(), BTreeMap::new()));
        if let Some(v) = values[r] {
            e.2.insert(metrics[r].clone(), v);
        }
    }
    let mut grouped: BTreeMap<(String, String), Vec<Point>> = BTreeMap::new();
    for (id, (model, method, m)) in by_cell {
        let t = table::timings(results, &id)?;
        let need = |map: &BTreeMap<String, f64>, key: &str, file: &str| -> Result<f64> {
            map.get(key).copied().with_context(|| {
                format!(
                    "cell {id} ({model}, {method}): no `{key}` in its {file} (a cell of an \
                     earlier version: delete it and run again)"
                )
            })
        };
        let p = Point {
            model: model.clone(),
            method: method.clone(),
            parameters: need(&m, "linear_parameters", "metrics.csv")?,
            calibration_tokens: need(&m, "calibration_tokens", "metrics.csv")?,
            flops: need(&m, "calibration_forward_flops", "metrics.csv")?,
            block_activation_bytes: need(&m, "block_activation_bytes", "metrics.csv")?,
            candidate_evaluations: need(&m, "candidate_evaluations", "metrics.csv")?,
            block_forwards: need(&m, "block_forwards", "metrics.csv")?,
            model_passes: need(&m, "model_passes", "metrics.csv")?,
            seconds: need(&t, "search_seconds", "timings.json")?,
            peak_rss: need(&t, "search_peak_rss_bytes", "timings.json")?,
            rss_start: need(&t, "search_rss_start_bytes", "timings.json")?,
            model_bytes: need(&t, "search_model_tensor_bytes", "timings.json")?,
            cells: 1,
        };
        grouped.entry((model, method)).or_default().push(p);
    }
    Ok(grouped
        .into_values()
        .map(|ps| {
            let n = ps.len() as f64;
            let mean = |f: fn(&Point) -> f64| ps.iter().map(f).sum::<f64>() / n;
            Point {
                model: ps[0].model.clone(),
                method: ps[0].method.clone(),
                parameters: ps[0].parameters,
                calibration_tokens: mean(|p| p.calibration_tokens),
                flops: mean(|p| p.flops),
                block_activation_bytes: mean(|p| p.block_activation_bytes),
                seconds: mean(|p| p.seconds),
                candidate_evaluations: mean(|p| p.candidate_evaluations),
                block_forwards: mean(|p| p.block_forwards),
                model_passes: mean(|p| p.model_passes),
                // The worst seed's peak.
                peak_rss: ps.iter().map(|p| p.peak_rss).fold(0.0, f64::max),
                rss_start: mean(|p| p.rss_start),
                model_bytes: ps[0].model_bytes,
                cells: ps.len(),
            }
        })
        .collect())
}

const GIB: f64 = (1u64 << 30) as f64;

/// Writes `tables/scaling.{csv,md}` (the measured points), `tables/scaling_fit.{csv,md}` (per
/// strategy: the power law, its errors, the memory fit) and `tables/scaling_extrapolation.{csv,md}`
/// (LLaVA-1.5-7B and 13B, labelled extrapolated), and the figure `cost_scaling`.
pub fn write(tables: &Tables, results: &ResultsDir, figures: &Path) -> Result<()> {
    let mut pts = points(tables, results)?;
    if pts.is_empty() {
        bail!("cost_scaling: no finished quantized cell to fit");
    }
    pts.sort_by(|a, b| a.method.cmp(&b.method).then(a.flops.total_cmp(&b.flops)));
    let dir = results.tables()?;
    let col = |name: &str, f: &dyn Fn(&Point) -> f64| {
        Column::new(name.into(), pts.iter().map(f).collect::<Vec<f64>>())
    };
    let mut measured = DataFrame::new_infer_height(vec![
        Column::new("method".into(), pts.iter().map(|p| p.method.clone()).collect::<Vec<_>>()),
        Column::new("model".into(), pts.iter().map(|p| p.model.clone()).collect::<Vec<_>>()),
        col("linear_params_m", &|p| p.parameters / 1e6),
        col("calibration_tokens", &|p| p.calibration_tokens),
        col("forward_gflop", &|p| p.flops / 1e9),
        col("search_seconds", &|p| p.seconds),
        col("candidate_evaluations", &|p| p.candidate_evaluations),
        col("block_forwards", &|p| p.block_forwards),
        col("model_passes", &|p| p.model_passes),
        col("model_gib", &|p| p.model_bytes / GIB),
        col("peak_rss_gib", &|p| p.peak_rss / GIB),
        col("block_activation_gib", &|p| p.block_activation_bytes / GIB),
        col("peak_of_bound_pct", &|p| {
            100.0 * p.peak_rss / memory_bound_bytes(p.model_bytes, p.block_activation_bytes)
        }),
        col("cells", &|p| p.cells as f64),
    ])?;
    table::write(
        &mut measured,
        &dir.join("scaling.csv"),
        &dir.join("scaling.md"),
        "Search cost by model size (measured)",
        &format!(
            "`forward_gflop`: one float forward of the calibration set. `peak_rss_gib`: the \
             process's peak RSS during the search. `peak_of_bound_pct`: that peak as a share of \
             the bounded-memory formula, 2 · model tensors + 3 · one block's calibration \
             activations + {} MiB (which holds for the block-by-block strategies; VEO \
             back-propagates through the whole model).",
            MEMORY_BOUND_CONSTANT_BYTES / (1u64 << 20) as f64
        ),
    )?;

    let mut methods: Vec<String> = pts.iter().map(|p| p.method.clone()).collect();
    methods.dedup();
    let mut fit_rows: Vec<FitRow> = Vec::new();
    for m in &methods {
        let mine: Vec<&Point> = pts.iter().filter(|p| &p.method == m).collect();
        let xy: Vec<(f64, f64)> = mine.iter().map(|p| (p.flops, p.seconds)).collect();
        let Some(fit) = LinearCost::of(&xy) else { continue };
        let rel: Vec<f64> = xy.iter().map(|&(f, s)| fit.predict(f) / s - 1.0).collect();
        let rms = (rel.iter().map(|r| r * r).sum::<f64>() / rel.len() as f64).sqrt();
        let max = rel.iter().map(|r| r.abs()).fold(0.0, f64::max);
        // The largest size predicted from the others (needs at least two others).
        let holdout = (xy.len() >= 3)
            .then(|| {
                let (last, rest) = xy.split_last().expect("three points");
                LinearCost::of(rest).map(|f| f.predict(last.0) / last.1 - 1.0)
            })
            .flatten();
        fit_rows.push(FitRow {
            method: m.clone(),
            sizes: xy.len(),
            slope: loglog_slope(&xy),
            fit,
            rms,
            max,
            holdout,
            blockwise: mine.iter().all(|p| p.model_passes == 0.0),
        });
    }
    let pct = |v: Vec<Option<f64>>| v.into_iter().map(|x| x.map(|x| 100.0 * x)).collect::<Vec<_>>();
    let mut fits = DataFrame::new_infer_height(vec![
        Column::new("method".into(), fit_rows.iter().map(|r| r.method.clone()).collect::<Vec<_>>()),
        Column::new("sizes".into(), fit_rows.iter().map(|r| r.sizes as f64).collect::<Vec<_>>()),
        Column::new(
            "overhead_seconds".into(),
            fit_rows.iter().map(|r| r.fit.overhead_seconds).collect::<Vec<_>>(),
        ),
        Column::new(
            "seconds_per_tflop".into(),
            fit_rows.iter().map(|r| r.fit.seconds_per_flop * 1e12).collect::<Vec<_>>(),
        ),
        Column::new("loglog_slope".into(), fit_rows.iter().map(|r| r.slope).collect::<Vec<_>>()),
        Column::new(
            "fit_rms_rel_err_pct".into(),
            pct(fit_rows.iter().map(|r| Some(r.rms)).collect()),
        ),
        Column::new(
            "fit_max_rel_err_pct".into(),
            pct(fit_rows.iter().map(|r| Some(r.max)).collect()),
        ),
        Column::new(
            "largest_from_others_err_pct".into(),
            pct(fit_rows.iter().map(|r| r.holdout).collect()),
        ),
    ])?;
    table::write(
        &mut fits,
        &dir.join("scaling_fit.csv"),
        &dir.join("scaling_fit.md"),
        "Cost model per strategy: seconds = overhead + seconds_per_tflop · F (F: forward FLOPs of the calibration set)",
        "Least squares over the measured sizes. `loglog_slope` near 1: the points are work-bound; \
         well below 1: overhead-bound, and `seconds_per_tflop` is poorly determined. \
         `largest_from_others_err_pct`: the largest measured size predicted by the fit of the \
         smaller ones (the error of an extrapolation).",
    )?;

    // Extrapolation: LLaVA-1.5 at 576 image tokens, 64 pairs of 576 + 64 tokens.
    let seq = vec![576 + EXTRAPOLATION_TEXT_TOKENS; EXTRAPOLATION_PAIRS];
    // (model, method, TFLOP, hours, weights GiB, activations GiB, peak GiB)
    type Row = (String, String, f64, Option<f64>, f64, f64, Option<f64>);
    let mut rows: Vec<Row> = Vec::new();
    for (name, shape) in ForwardShape::targets() {
        let flops = shape.flops(&seq);
        let weights_f32 = 4.0 * shape.linear_parameters();
        let act = shape.block_activation_bytes(&seq, 4);
        for r in &fit_rows {
            let hours = (r.fit.seconds_per_flop > 0.0).then(|| r.fit.predict(flops) / 3600.0);
            let peak = r.blockwise.then(|| memory_bound_bytes(weights_f32, act) / GIB);
            rows.push((
                name.to_string(),
                r.method.clone(),
                flops / 1e12,
                hours,
                weights_f32 / GIB,
                act / GIB,
                peak,
            ));
        }
    }
    let mut extra = DataFrame::new_infer_height(vec![
        Column::new("model".into(), rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()),
        Column::new("method".into(), rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>()),
        Column::new("forward_tflop".into(), rows.iter().map(|r| r.2).collect::<Vec<_>>()),
        Column::new("extrapolated_cpu_hours".into(), rows.iter().map(|r| r.3).collect::<Vec<_>>()),
        Column::new("linear_weights_f32_gib".into(), rows.iter().map(|r| r.4).collect::<Vec<_>>()),
        Column::new("block_activation_gib".into(), rows.iter().map(|r| r.5).collect::<Vec<_>>()),
        Column::new("peak_bound_gib".into(), rows.iter().map(|r| r.6).collect::<Vec<_>>()),
    ])?;
    table::write(
        &mut extra,
        &dir.join("scaling_extrapolation.csv"),
        &dir.join("scaling_extrapolation.md"),
        "EXTRAPOLATED, not measured: the cost model at LLaVA-1.5's shapes",
        &format!(
            "{EXTRAPOLATION_PAIRS} calibration pairs of 576 image + {EXTRAPOLATION_TEXT_TOKENS} \
             text tokens, f32 on this machine's CPU (2 cores). Each line is only as good as its \
             strategy's fit: see `loglog_slope` and `largest_from_others_err_pct` in \
             scaling_fit.md; empty where the fit has no positive per-FLOP cost. `peak_bound_gib`: \
             the bounded-memory formula with the f32 linear weights (embeddings and lm_head \
             left out), for the block-by-block strategies only (empty for VEO and Q-VLM, which back-propagate \
             through the whole model)."
        ),
    )?;

    // Figure: measured points, fits drawn across to the extrapolation targets.
    let targets: Vec<(String, f64)> =
        ForwardShape::targets().iter().map(|(n, s)| (n.to_string(), s.flops(&seq))).collect();
    let series: Vec<crate::figure::FitSeries> = fit_rows
        .iter()
        .map(|r| crate::figure::FitSeries {
            name: r.method.clone(),
            measured: pts
                .iter()
                .filter(|p| p.method == r.method)
                .map(|p| (p.flops, p.seconds))
                .collect(),
            overhead: r.fit.overhead_seconds,
            per_unit: r.fit.seconds_per_flop,
        })
        .collect();
    crate::figure::loglog_fits(
        &figures.join("cost_scaling"),
        "Search time vs forward FLOPs of the calibration set (lines: fits; right: extrapolated)",
        "float forward FLOPs over the calibration set",
        "search seconds",
        &series,
        &targets,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_7b_linear_parameters_match_the_checkpoint() {
        // LLaVA-1.5-7B: Vicuna-7B's decoder linears (32 · 202.4M) + CLIP-L's 23 layers run
        // (12.6M each) + the projector (21.0M) ≈ 6.78B.
        let (_, s) = &ForwardShape::targets()[0];
        let p = s.linear_parameters();
        let decoder = 32.0 * (4.0 * 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0);
        let clip = 23.0 * (4.0 * 1024.0f64.powi(2) + 2.0 * 1024.0 * 4096.0);
        let projector = 1024.0 * 4096.0 + 4096.0 * 4096.0;
        assert_eq!(p, decoder + clip + projector);
        assert!((p / 1e9 - 6.78).abs() < 0.01, "{p}");
    }

    #[test]
    fn forward_flops_are_twice_the_macs_plus_attention() {
        let s = ForwardShape {
            vision_layers: 1,
            vision_hidden: 2,
            vision_intermediate: 3,
            vision_tokens: 5,
            image_tokens: 4,
            projector_macs: 7,
            language_layers: 2,
            language_hidden: 2,
            language_intermediate: 5,
            language_q: 2,
            language_kv: 1,
            language_heads: 1,
            vision_heads: 1,
        };
        // vision: 2·5·(16 + 12) + 4·25·2 = 480; projector 2·4·7 = 56;
        // language per layer at T = 10: 2·10·(8 + 4 + 30) + 4·100·2 = 1640.
        assert_eq!(s.flops(&[10]), 480.0 + 56.0 + 2.0 * 1640.0);
        assert_eq!(s.flops(&[10, 10]), 2.0 * s.flops(&[10]));
    }

    #[test]
    fn a_linear_cost_is_recovered_and_predicts() {
        let pts: Vec<_> = [1e9, 1e10, 1e11].iter().map(|&f: &f64| (f, 2.0 + 3e-9 * f)).collect();
        let fit = LinearCost::of(&pts).expect("fit");
        assert!((fit.overhead_seconds - 2.0).abs() < 1e-6, "{fit:?}");
        assert!((fit.predict(1e13) / (2.0 + 3e4) - 1.0).abs() < 1e-9);
        // Overhead-bound points have a log-log slope well below 1, work-bound ones near 1.
        let overhead: Vec<_> = [1e9, 1e10].iter().map(|&f: &f64| (f, 100.0 + 3e-9 * f)).collect();
        assert!(loglog_slope(&overhead).expect("slope") < 0.5);
        let work: Vec<_> = [1e12, 1e13].iter().map(|&f: &f64| (f, 2.0 + 3e-9 * f)).collect();
        assert!((loglog_slope(&work).expect("slope") - 1.0).abs() < 0.01);
    }
}
