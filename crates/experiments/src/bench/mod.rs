//! `experiments bench CONFIG`: the paper's Table 4 for real — weight memory, resident memory,
//! prefill and per-token decode latency of FP32, BF16, W8A16, W8A8 and W4A16 on LLaVA-shaped
//! models with random weights (nothing is downloaded; accuracy is irrelevant), against the
//! machine's measured memory bandwidth (the decode roofline).
//!
//! Per shape, one model is built in bf16 and the schemes are put into it one after the other
//! (each packed weight replaces the previous one, so one configuration's packed weights are
//! resident at a time); FP32 is a separate build, with fewer layers when configured, extrapolated
//! per layer. The packed schemes pack the parts `model.packed_parts` lists (the decoder's linears,
//! and optionally CLIP's, the projector's and `lm_head`); embeddings, norms and biases stay in
//! the model's float dtype in every scheme. Results: tidy rows (`measurements.csv`) and
//! `run.json` → a table (`efficiency.csv`, `efficiency.md`) → a figure
//! (`decode_roofline.{png,svg}`).

pub mod config;
pub mod machine;
pub mod measure;
pub mod model;
pub mod report;
pub mod rows;
pub mod scheme;
pub mod shape;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use qvlm_core::device::DType;
use qvlm_core::io::config::{detect_family, ModelFamily};
use qvlm_core::io::weights::VarBuilder;
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::model::llava::{Llava, LoadOptions};
use qvlm_core::model::qwen2_vl::Qwen2Vl;
use qvlm_core::quant::bf16_own::{self, Bf16Weight};
use qvlm_core::quant::packed::Kernel;
use qvlm_core::quant::team::Isa;

use tch::{Device, Kind, Tensor};

use config::{BenchConfig, CheckpointEntry};
use machine::GIB;
use measure::{Split, Timings};
use model::BenchModel;
use rows::{Row, RunInfo, Skipped};
use scheme::Scheme;
use shape::{Shape, ShapeFamily};

use crate::progress;
use crate::results::{Owner, ResultsDir};

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub info: RunInfo,
    pub report: report::Report,
    pub dir: PathBuf,
}

/// Runs the bench of `cfg` and writes its results folder.
pub fn run(cfg: &BenchConfig) -> Result<Outcome> {
    let started = Instant::now();
    let device = cfg
        .bench
        .device
        .resolve()
        .with_context(|| format!("{}: key `bench.device`", cfg.file.display()))?;
    if cfg.bench.threads > 0 {
        tch::set_num_threads(i32::from(cfg.bench.threads));
    }
    tch::manual_seed(cfg.bench.seed as i64);
    let dir = cfg.results_dir();
    // Held to the end: one bench at a time on a folder, and never over another run's results.
    let owner = Owner::new("bench", &cfg.bench.name, &cfg.file, &cfg.text);
    let _results = ResultsDir::open(&dir, &owner)?;

    let pb = progress::spinner("memory bandwidth");
    let bw = machine::bandwidth(device, cfg.bandwidth.mib << 20, cfg.bandwidth.repeats)
        .context("measuring the memory bandwidth")?;
    pb.finish_and_clear();
    let machine = machine::describe(device, bw);
    tracing::info!("{}", machine.describe());

    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let info = |rows: &mut Vec<Row>, skipped: &[Skipped]| {
        let order = |s: Scheme| cfg.model.schemes.iter().position(|&x| x == s);
        // Shapes in config order, then the checkpoints in theirs.
        let at = |name: &str| {
            let checkpoint = cfg.checkpoints.iter().position(|c| c.name == name);
            cfg.model.shapes.iter().position(|s| s == name).or(checkpoint.map(|c| 1 << 20 | c))
        };
        rows.sort_by_key(|r| (at(&r.shape), order(r.scheme)));
        RunInfo {
            config: cfg.clone(),
            config_file: cfg.file.clone(),
            machine: machine.clone(),
            skipped: skipped.to_vec(),
            wall_seconds: started.elapsed().as_secs_f64(),
        }
    };
    for shape in cfg.shapes()? {
        run_shape(cfg, &shape, device, &mut rows, &mut skipped)
            .with_context(|| format!("benchmarking {}", shape.name))?;
        // The measurements so far are on disk before the next (larger) shape is built.
        let so_far = info(&mut rows, &skipped);
        report::write_results(&dir, &rows, &so_far)?;
    }
    for entry in &cfg.checkpoints {
        run_checkpoint(cfg, entry, device, &mut rows, &mut skipped)
            .with_context(|| format!("benchmarking {} ({})", entry.name, entry.path.display()))?;
        let so_far = info(&mut rows, &skipped);
        report::write_results(&dir, &rows, &so_far)?;
    }
    let info = info(&mut rows, &skipped);
    report::write_results(&dir, &rows, &info)?;
    let report = report::build(&dir)?;
    Ok(Outcome { rows, info, report, dir })
}

/// Decoder layers the rows of `shape` stand for.
fn layers_of(cfg: &BenchConfig, shape: &Shape) -> i64 {
    let real = shape.dims.text_layers;
    cfg.model.layers.map_or(real, |l| l.min(real))
}

/// Why a model of `params` parameters at `kind` would not fit, if it would not (CPU only: host
/// memory is what the weights take there).
fn does_not_fit(cfg: &BenchConfig, device: Device, params: i64, kind: Kind) -> Option<String> {
    let budget = memory_budget(cfg, device)?;
    let need = params as f64 * kind.elt_size_in_bytes() as f64;
    (need > budget.available - budget.headroom).then(|| {
        format!(
            "building it needs {:.1} GiB of {kind:?} weights (+ {:.1} GiB headroom) but only {:.1} GiB is available (the model is built in this dtype before it is packed, so this size decides)",
            need / GIB,
            budget.headroom / GIB,
            budget.available / GIB
        )
    })
}

/// Host memory for a build: what is available now and what must stay free.
struct Budget {
    available: f64,
    headroom: f64,
}

/// `None` off the CPU (or where `/proc/meminfo` cannot be read): no limit is checked.
fn memory_budget(cfg: &BenchConfig, device: Device) -> Option<Budget> {
    if device != Device::Cpu {
        return None;
    }
    let available = machine::meminfo("MemAvailable")? as f64;
    Some(Budget { available, headroom: cfg.model.memory_headroom_gib * GIB })
}

/// How many of `layers` decoder layers of `shape` to build at `kind`: all when they fit in
/// memory, else `model.partial_layers` (or as many as fit, if fewer); or why not even one fits.
fn layers_that_fit(
    cfg: &BenchConfig,
    device: Device,
    shape: &Shape,
    layers: i64,
    kind: Kind,
) -> std::result::Result<i64, String> {
    let Some(budget) = memory_budget(cfg, device) else { return Ok(layers) };
    let bytes = |l: i64| shape.dims.parameters(l) as f64 * kind.elt_size_in_bytes() as f64;
    let fits = |l: i64| bytes(l) <= budget.available - budget.headroom;
    if fits(layers) {
        return Ok(layers);
    }
    largest_count(cfg.model.partial_layers.min(layers), fits).ok_or_else(|| {
        does_not_fit(cfg, device, shape.dims.parameters(1), kind)
            .unwrap_or_else(|| "one decoder layer does not fit".into())
    })
}

/// The largest `l` in `1..=most` for which `fits(l)` holds (`fits` is monotone, decreasing in
/// `l`); `None` when none does.
fn largest_count(most: i64, fits: impl Fn(i64) -> bool) -> Option<i64> {
    (1..=most).rev().find(|&l| fits(l))
}

fn run_shape(
    cfg: &BenchConfig,
    shape: &Shape,
    device: Device,
    rows: &mut Vec<Row>,
    skipped: &mut Vec<Skipped>,
) -> Result<()> {
    let real = shape.dims.text_layers;
    let layers = layers_of(cfg, shape);
    let model = if layers == real {
        shape.name.clone()
    } else {
        format!("{} ({layers}/{real} layers)", shape.name)
    };
    let schemes = &cfg.model.schemes;
    let dense16: Vec<Scheme> =
        Scheme::ALL.into_iter().filter(|s| *s != Scheme::Fp32 && schemes.contains(s)).collect();
    // The packed schemes start from a bf16 build: when the whole shape does not fit, as many
    // decoder layers as fit are built and every row of the family is extrapolated per layer.
    let mut bf16_built = layers;
    if !dense16.is_empty() {
        match layers_that_fit(cfg, device, shape, layers, Kind::BFloat16) {
            Ok(built) => bf16_built = built,
            Err(reason) => {
                tracing::warn!("skipping {model}: {reason}");
                let schemes = schemes.iter().map(|s| s.label(cfg.model.w4_group)).collect();
                skipped.push(Skipped { model, schemes: join(schemes), reason });
                return Ok(());
            }
        }
        if bf16_built < layers {
            tracing::warn!(
                "{model}: building {bf16_built} of {layers} decoder layers in bf16 (all do not fit in memory); its rows are extrapolated per layer"
            );
        }
    }
    if schemes.contains(&Scheme::Fp32) {
        let built = cfg.model.fp32_layers.map_or(layers, |l| l.min(layers));
        match does_not_fit(cfg, device, shape.dims.parameters(built), Kind::Float) {
            Some(reason) => {
                tracing::warn!("skipping FP32 of {model}: {reason}");
                skipped.push(Skipped { model: model.clone(), schemes: "FP32".into(), reason });
            }
            None => rows.push(run_fp32(cfg, shape, &model, layers, built, device)?),
        }
    }
    if !dense16.is_empty() {
        let family =
            Family { shape, label: &model, layers, built: bf16_built, schemes: &dense16, device };
        run_bf16_family(cfg, &family, rows, skipped)?;
    }
    Ok(())
}

fn join(v: Vec<String>) -> String {
    v.join(", ")
}

/// A model of `shape` with `layers` decoder layers and random float weights of `kind`.
fn build(shape: &Shape, layers: i64, kind: Kind, device: Device, what: &str) -> Result<BenchModel> {
    let pb = progress::spinner(what);
    pb.set_message(format!("random {kind:?} weights, {layers} decoder layers"));
    let vb = VarBuilder::fresh(device, kind);
    let started = Instant::now();
    let model = match shape.dims.family {
        ShapeFamily::Llava => {
            Llava::build(&vb, &shape.llava_config(layers)).map(|m| BenchModel::Llava(Box::new(m)))
        }
        ShapeFamily::Qwen2Vl => Qwen2Vl::build(&vb, &shape.qwen2_vl_config(layers))
            .map(|m| BenchModel::Qwen2Vl(Box::new(m))),
    }
    .with_context(|| format!("building {} with random weights", shape.name))?;
    // The builder keeps a handle on every variable it created: drop it so that replaced
    // weights are freed.
    drop(vb);
    pb.finish_and_clear();
    tracing::info!("{what}: built in {:.1} s", started.elapsed().as_secs_f64());
    Ok(model)
}

/// Bytes of every weight of a model that holds no packed weight: `numel · element size`.
fn float_bytes(model: &BenchModel) -> i64 {
    model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum()
}

/// Bytes of the decoder linears as held (float or packed storage).
fn decoder_linear_bytes(model: &BenchModel) -> i64 {
    scheme::decoder_linears(model).iter().map(|l| l.weight.bytes()).sum()
}

/// Weights one decode step reads besides the decoder linears' weights: every layer's
/// [`layer_rest_bytes`], the final norm, `lm_head` (or the tied embedding) as held, and one
/// embedding row.
fn decode_extra_bytes(model: &BenchModel) -> i64 {
    let lm = model.language_model();
    let head = lm.lm_head.as_ref().map_or_else(|| size(&lm.embed_tokens), |h| h.weight.bytes());
    let row = lm.cfg.hidden_size * lm.embed_tokens.kind().elt_size_in_bytes() as i64;
    lm.layers.len() as i64 * layer_rest_bytes(model) + size(&lm.norm.weight) + head + row
}

/// Bytes of one decoder layer besides its linears' weights: its two norms and its linears'
/// biases (Qwen2's q/k/v).
fn layer_rest_bytes(model: &BenchModel) -> i64 {
    let Some(layer) = model.language_model().layers.first() else {
        return 0;
    };
    let biases: i64 = layer.linears().iter().filter_map(|l| l.bias.as_ref()).map(size).sum();
    size(&layer.input_layernorm.weight) + size(&layer.post_attention_layernorm.weight) + biases
}

fn size(t: &tch::Tensor) -> i64 {
    t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
}

/// The decoder linears' kernels (one name, or `name×count` joined by `+`), and how many packed
/// weights anywhere in the model are on the dequantized fallback.
fn kernels(model: &BenchModel) -> (String, usize) {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for l in scheme::decoder_linears(model) {
        let name = match &l.weight {
            LinearWeight::Float(_) => "dense",
            LinearWeight::Packed(p) => p.kernel().name(),
            LinearWeight::Bf16Own(w) => match w.isa() {
                Isa::Avx512 => "bf16_avx512",
                Isa::Avx2 => "bf16_avx2",
            },
        };
        *counts.entry(name).or_default() += 1;
    }
    let mut fallbacks = 0;
    for linear in model.linears_and_head() {
        if let LinearWeight::Packed(p) = &linear.weight {
            if p.kernel() == Kernel::Dequantized {
                fallbacks += 1;
                tracing::warn!(
                    layer = %linear.id,
                    reason = p.fallback_reason().unwrap_or(""),
                    "dequantized fallback"
                );
            }
        }
    }
    let text = if counts.len() == 1 {
        counts.keys().next().map(|s| s.to_string()).unwrap_or_default()
    } else {
        counts.iter().map(|(k, n)| format!("{k}×{n}")).collect::<Vec<_>>().join("+")
    };
    (text, fallbacks)
}

/// The row's timings, between two measurements of the memory roof (before, after): the machines
/// are shared, and a roof taken once at the start of a long run is not the roof of its last row.
fn measure(
    model: &BenchModel,
    partner: Option<&BenchModel>,
    cfg: &BenchConfig,
    image_side: i64,
    what: &str,
) -> Result<(Timings, [f64; 2])> {
    let m = &cfg.measure;
    let roof = || {
        machine::read_roof(model.device(), cfg.bandwidth.mib << 20, cfg.bandwidth.repeats)
            .with_context(|| format!("{what}: measuring the memory roof"))
    };
    let before = roof()?;
    let pb = progress::bar((m.warmup_tokens + m.decode_tokens) as u64, what);
    pb.set_message(format!("prefill {} tokens, then decode", m.prefill_tokens));
    let timings = measure::run(model, partner, m, image_side, &pb)?;
    pb.finish_and_clear();
    Ok((timings, [before, roof()?]))
}

fn rss_delta(base: Option<u64>) -> Option<i64> {
    Some(machine::rss_bytes()? as i64 - base? as i64)
}

/// What one configuration measured on a model built with `built` of `layers` decoder layers.
struct Measured {
    scheme: Scheme,
    kernel: String,
    fallbacks: usize,
    /// Whole-model weight bytes of the built model.
    all: i64,
    /// Decoder-linear bytes of the built model.
    linears: i64,
    /// [`decode_extra_bytes`] of the built model.
    extra: i64,
    /// [`layer_rest_bytes`] of the built model.
    layer_rest: i64,
    rss: Option<i64>,
    timings: Timings,
    /// The memory roof measured before and after the timings (bytes/s).
    roof: [f64; 2],
}

/// A table row, extrapolated per layer to `layers` when fewer were built: every decoder layer has
/// the same weights and work, so the decoder's time, bytes and memory scale with the count.
fn row(cfg: &BenchConfig, shape: &str, model: &str, layers: i64, built: i64, m: Measured) -> Row {
    let scale = layers as f64 / built as f64;
    let add_layers = layers - built;
    let layer_linears = m.linears / built;
    let layer_bytes = layer_linears + m.layer_rest;
    let stretch = |s: Split| Split { layers_ms: s.layers_ms * scale, ..s };
    let t = &m.timings;
    let partner_fused = t.partner_fused_mean().map(stretch);
    let stepped = t
        .fused_mean()
        .map(stretch)
        .zip(partner_fused)
        .filter(|(own, _)| own.total_ms() > 0.0)
        .map(|(own, partner)| partner.total_ms() / own.total_ms());
    // Each fused step's weight traffic over the roof read right after it (extrapolated like the
    // step itself: the built layers' time scaled to the shape's, over the shape's bytes).
    let decode_bytes = m.linears + m.extra + add_layers * layer_bytes;
    let step_shares: Vec<f64> = t
        .fused
        .iter()
        .zip(&t.fused_roofs)
        .filter_map(|(&s, &roof)| {
            let seconds = stretch(s).total_ms() / 1e3;
            (seconds > 0.0 && roof > 0.0).then(|| 100.0 * decode_bytes as f64 / seconds / roof)
        })
        .collect();
    let fused_stepped_roof_pct = (!step_shares.is_empty()).then(|| report::median(&step_shares));
    let min_step = t
        .decode
        .iter()
        .copied()
        .min_by(|a, b| a.total_ms().total_cmp(&b.total_ms()))
        .unwrap_or_default();
    Row {
        shape: shape.to_string(),
        model: model.to_string(),
        scheme: m.scheme,
        label: m.scheme.label(cfg.model.w4_group),
        kernel: m.kernel,
        layers,
        layers_built: built,
        weight_bytes: m.all + add_layers * layer_bytes,
        decoder_linear_bytes: layer_linears * layers,
        decode_bytes_per_token: decode_bytes,
        rss_delta_bytes: m.rss.map(|r| r + add_layers * layer_bytes),
        prefill_positions: t.prefill_positions,
        prefill: stretch(t.prefill),
        decode: stretch(t.decode_mean()),
        decode_min_ms: stretch(min_step).total_ms(),
        decode_linears_ms: t.linears_mean() * scale,
        decode_fused: t.fused_mean().map(stretch),
        fused_max_rel_diff: t.fused_max_rel_diff,
        fallback_linears: m.fallbacks,
        roof_before_bytes_per_s: m.roof[0],
        roof_after_bytes_per_s: m.roof[1],
        round_decode_ms: vec![stretch(t.decode_mean()).total_ms()],
        round_speedup_16bit: Vec::new(),
        round_fused_speedup_16bit: Vec::new(),
        partner_fused,
        round_fused_speedup_stepped: stepped.into_iter().collect(),
        fused_stepped_roof_pct,
    }
}

/// One row per scheme from the rows of every round (`rounds[r]`: the schemes measured in round
/// `r`, in the same order each round): the round with the median decode time (the lower median
/// for an even count), with every round's decode time and the per-round (paired) speed-up over
/// that round's fastest 16-bit row. Its fused-vs-libtorch difference is the largest of all
/// rounds: each round builds its model anew, with its own random weights, and a rounding
/// difference that some weights bring out and others do not must not hang on which round was
/// the median by time (it did: 7B W4A16 q8 read 0 in one full run and 0.01 in the next, 2026-12-06,
/// same seed, while one configuration run twice gave the same 0.0136 both times).
fn median_rounds(rounds: Vec<Vec<Row>>) -> Vec<Row> {
    // Per round, the fastest 16-bit row's time by `time` (the libtorch step, or the fused one).
    let best16 = |time: fn(&Row) -> Option<f64>| -> Vec<Option<f64>> {
        rounds
            .iter()
            .map(|rows| {
                rows.iter()
                    .filter(|r| matches!(r.scheme, Scheme::Bf16 | Scheme::Bf16Own))
                    .filter_map(time)
                    .min_by(f64::total_cmp)
            })
            .collect()
    };
    let step = |r: &Row| Some(r.decode.total_ms());
    let fused = |r: &Row| r.decode_fused.map(|s| s.total_ms());
    let (best_step, best_fused) = (best16(step), best16(fused));
    let schemes = rounds.first().map_or(0, Vec::len);
    let mut by_scheme: Vec<Vec<Row>> = (0..schemes).map(|_| Vec::new()).collect();
    for rows in rounds {
        for (i, r) in rows.into_iter().enumerate() {
            by_scheme[i].push(r);
        }
    }
    // Per round, that round's fastest 16-bit time ÷ this row's.
    let paired = |rows: &[Row], time: fn(&Row) -> Option<f64>, best: &[Option<f64>]| {
        rows.iter()
            .zip(best)
            .filter_map(|(r, b)| Some(b.as_ref()? / time(r).filter(|ms| *ms > 0.0)?))
            .collect::<Vec<f64>>()
    };
    by_scheme
        .into_iter()
        .filter_map(|mut rows| {
            let decode: Vec<f64> = rows.iter().map(|r| r.decode.total_ms()).collect();
            let speedup = paired(&rows, step, &best_step);
            let fused_speedup = paired(&rows, fused, &best_fused);
            let fused_max_rel_diff =
                rows.iter().filter_map(|r| r.fused_max_rel_diff).max_by(f64::total_cmp);
            let stepped: Vec<f64> =
                rows.iter().flat_map(|r| r.round_fused_speedup_stepped.iter().copied()).collect();
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.sort_by(|&a, &b| decode[a].total_cmp(&decode[b]));
            let median = *order.get(order.len().saturating_sub(1) / 2)?;
            let mut row = rows.swap_remove(median);
            row.round_decode_ms = decode;
            row.round_speedup_16bit = speedup;
            row.round_fused_speedup_16bit = fused_speedup;
            row.fused_max_rel_diff = fused_max_rel_diff;
            row.round_fused_speedup_stepped = stepped;
            Some(row)
        })
        .collect()
}

/// FP32 with `built` decoder layers, extrapolated per layer to `layers` when fewer.
fn run_fp32(
    cfg: &BenchConfig,
    shape: &Shape,
    model_label: &str,
    layers: i64,
    built: i64,
    device: Device,
) -> Result<Row> {
    let base = machine::rss_bytes();
    let what = format!("{} FP32", shape.name);
    let model = build(shape, built, Kind::Float, device, &what)?;
    let (kernel, fallbacks) = kernels(&model);
    let (timings, roof) = measure(&model, None, cfg, shape.dims.image_size, &what)?;
    let m = Measured {
        scheme: Scheme::Fp32,
        kernel,
        fallbacks,
        all: float_bytes(&model),
        linears: decoder_linear_bytes(&model),
        extra: decode_extra_bytes(&model),
        layer_rest: layer_rest_bytes(&model),
        timings,
        roof,
        rss: rss_delta(base),
    };
    drop(model);
    Ok(row(cfg, &shape.name, model_label, layers, built, m))
}

/// A shape's bf16 family: the schemes measured on one bf16 build with `built` of the shape's
/// `layers` decoder layers (`label`: the table's model name).
struct Family<'a> {
    shape: &'a Shape,
    label: &'a str,
    layers: i64,
    built: i64,
    schemes: &'a [Scheme],
    device: Device,
}

/// `measure.rounds` rounds of [`run_bf16_round`], one row per scheme ([`median_rounds`]).
fn run_bf16_family(
    cfg: &BenchConfig,
    family: &Family,
    rows: &mut Vec<Row>,
    skipped: &mut Vec<Skipped>,
) -> Result<()> {
    in_rounds(cfg, family.label, rows, skipped, |skipped| run_bf16_round(cfg, family, skipped))
}

/// `measure.rounds` rounds of `round` (the rows of one model, in the same order each round), one
/// row per scheme ([`median_rounds`]); what cannot run is listed once, from the first round.
fn in_rounds(
    cfg: &BenchConfig,
    label: &str,
    rows: &mut Vec<Row>,
    skipped: &mut Vec<Skipped>,
    mut round: impl FnMut(&mut Vec<Skipped>) -> Result<Vec<Row>>,
) -> Result<()> {
    let rounds = cfg.measure.rounds.max(1);
    let mut per_round = Vec::with_capacity(rounds);
    for r in 0..rounds {
        if rounds > 1 {
            tracing::info!("{label}: round {} of {rounds}", r + 1);
        }
        let mut later_rounds = Vec::new();
        let skipped = if r == 0 { &mut *skipped } else { &mut later_rounds };
        per_round.push(round(skipped)?);
    }
    rows.extend(median_rounds(per_round));
    Ok(())
}

/// One bf16 build of the family's shape; its schemes (BF16 and the packed ones, in
/// [`Scheme::ALL`] order) are put into it one after the other and measured.
fn run_bf16_round(
    cfg: &BenchConfig,
    family: &Family,
    skipped: &mut Vec<Skipped>,
) -> Result<Vec<Row>> {
    let Family { shape, label: model_label, layers, built, schemes, device } = *family;
    let mut rows = Vec::new();
    let group = cfg.model.w4_group;
    let base = machine::rss_bytes();
    let mut model = build(shape, built, Kind::BFloat16, device, &format!("{} BF16", shape.name))?;
    // Whole-model bytes of a scheme: the float build's, with the packable weights as now held.
    let float_all = float_bytes(&model);
    let float_packable = scheme::packable_bytes(&model);
    let parts = &cfg.model.packed_parts;
    // Built before the first W4 row's measurement that it fits beside
    // (`measure.step_paired_16bit`), once the round's model holds W4 weights.
    let mut partner: Option<Partner> = None;
    let mut partner_never = false;
    for &s in schemes {
        let what = format!("{} {}", shape.name, s.label(group));
        if let Some(reason) = s.not_here(device) {
            tracing::warn!("skipping {what}: {reason}");
            skipped.push(Skipped { model: model_label.into(), schemes: s.label(group), reason });
            continue;
        }
        let n = scheme::packed_count(&model, parts) as u64;
        let pb = progress::bar(n, &format!("packing {}", s.label(group)));
        let started = Instant::now();
        scheme::apply(&mut model, s, group, parts, &pb)?;
        pb.finish_and_clear();
        if s != Scheme::Bf16 {
            tracing::info!("{what}: packed in {:.1} s", started.elapsed().as_secs_f64());
        }
        if cfg.measure.step_paired_16bit && s.is_w4() && partner.is_none() && !partner_never {
            match build_partner(cfg, family)? {
                Ok(p) => partner = Some(p),
                Err(Refusal { reason, for_good }) => {
                    tracing::warn!("{what}: no step-paired 16-bit partner: {reason}");
                    // What the CPU cannot run is listed once; a partner that does not fit
                    // beside this scheme's model is tried again beside the next one.
                    let schemes = if for_good {
                        "step-paired BF16 own partner of the W4 rows".into()
                    } else {
                        format!("{}: its step-paired BF16 own partner", s.label(group))
                    };
                    skipped.push(Skipped { model: model_label.into(), schemes, reason });
                    partner_never = for_good;
                }
            }
        }
        let paired = partner.as_ref();
        let (kernel, fallbacks) = kernels(&model);
        let partner_model = paired.filter(|_| s.is_w4()).map(|p| &p.model);
        let (timings, roof) = measure(&model, partner_model, cfg, shape.dims.image_size, &what)?;
        // The rows' resident memory without the partner's; unknown (and said so) where the
        // difference comes out negative: the two reads were not comparable.
        let rss = match paired {
            None => rss_delta(base),
            Some(p) => match rss_delta(base).zip(p.rss_bytes) {
                Some((all, partner)) if all >= partner => Some(all - partner),
                Some(_) => {
                    tracing::warn!("{what}: RSS less the partner's is negative; left out");
                    None
                }
                None => None,
            },
        };
        let m = Measured {
            scheme: s,
            kernel,
            fallbacks,
            all: float_all - float_packable + scheme::packable_bytes(&model),
            linears: decoder_linear_bytes(&model),
            extra: decode_extra_bytes(&model),
            layer_rest: layer_rest_bytes(&model),
            timings,
            roof,
            rss,
        };
        let r = row(cfg, &shape.name, model_label, layers, built, m);
        tracing::info!(
            "{what}: decode {:.1} ms/token, prefill {:.0} ms{}",
            r.decode.total_ms(),
            r.prefill.total_ms(),
            if r.extrapolated() { " (extrapolated per layer)" } else { "" }
        );
        rows.push(r);
    }
    Ok(rows)
}

/// A round's step-paired 16-bit partner (`measure.step_paired_16bit`): the family's shape with
/// as many decoder layers as the round's model, its `packed_parts` on the own bf16 kernel — the
/// BF16 own row's model — and the growth of resident memory its build caused (`None` where it
/// cannot be read), which the rows measured beside it do not count.
struct Partner {
    model: BenchModel,
    rss_bytes: Option<i64>,
}

/// Why a [`Partner`] was not built, and whether that holds for the whole run (the device or the
/// CPU) or only beside the model of the moment (memory).
struct Refusal {
    reason: String,
    for_good: bool,
}

/// The family's [`Partner`] when the own bf16 kernel runs here and the model fits in the memory
/// available now (beside the round's model); otherwise why not.
fn build_partner(
    cfg: &BenchConfig,
    family: &Family,
) -> Result<std::result::Result<Partner, Refusal>> {
    let Family { shape, built, device, .. } = *family;
    let for_good = |reason: String| Ok(Err(Refusal { reason, for_good: true }));
    if device != Device::Cpu {
        return for_good("the fused decode path runs on the CPU only".into());
    }
    if let Some(reason) = Scheme::Bf16Own.not_here(device) {
        return for_good(reason);
    }
    // The bf16 weights that the packing freed stay in the heap until handed back (the first full
    // run with a partner found 13.0–13.3 GiB available beside each W4 model, 2 GiB short of
    // 13.2 + the headroom; a one-scheme run, nothing freed before, fitted). Where the C library
    // cannot trim, the check below decides on what is available.
    let _ = qvlm_core::memory::release_freed_heap();
    if let Some(reason) = does_not_fit(cfg, device, shape.dims.parameters(built), Kind::BFloat16) {
        let reason = format!("beside this scheme's model: {reason}");
        return Ok(Err(Refusal { reason, for_good: false }));
    }
    let base = machine::rss_bytes();
    let what = format!("{} BF16 own, step-paired partner", shape.name);
    let mut model = build(shape, built, Kind::BFloat16, device, &what)?;
    let parts = &cfg.model.packed_parts;
    let pb = progress::bar(scheme::packed_count(&model, parts) as u64, &what);
    scheme::apply(&mut model, Scheme::Bf16Own, cfg.model.w4_group, parts, &pb)?;
    pb.finish_and_clear();
    // The libtorch tensors its conversion freed, handed back before its growth is read: counted
    // in, they made the growth larger than the partner and the W4 rows' RSS beside it negative
    // (−2.6 to −3.9 GiB on 7B, 2026-12-06 12:23 UTC).
    let _ = qvlm_core::memory::release_freed_heap();
    Ok(Ok(Partner { model, rss_bytes: rss_delta(base) }))
}

/// `measure.rounds` rounds of [`checkpoint_round`], one row per scheme ([`median_rounds`]).
fn run_checkpoint(
    cfg: &BenchConfig,
    entry: &CheckpointEntry,
    device: Device,
    rows: &mut Vec<Row>,
    skipped: &mut Vec<Skipped>,
) -> Result<()> {
    // Whether the BF16 own row runs is decided in the first round and kept: every round has the
    // same rows (the paired ratios pair them by round).
    let mut bf16_own: Option<std::result::Result<(), String>> = None;
    in_rounds(cfg, &entry.name, rows, skipped, |skipped| {
        checkpoint_round(cfg, entry, device, &mut bf16_own, skipped)
    })
}

/// The checkpoint loaded from its directory with its float parts in bf16 (packed linears as the
/// checkpoint stores them, on the kernels this machine picks).
fn load_checkpoint(entry: &CheckpointEntry, device: Device) -> Result<BenchModel> {
    let opts = LoadOptions { device, dtype: DType::Bf16, clip_dir: None };
    let pb = progress::spinner(&format!("loading {}", entry.name));
    let model = match detect_family(&entry.path.join("config.json"))? {
        ModelFamily::Llava => BenchModel::Llava(Box::new(Llava::load(&entry.path, &opts)?)),
        ModelFamily::Qwen2Vl => BenchModel::Qwen2Vl(Box::new(Qwen2Vl::load(&entry.path, &opts)?)),
    };
    pb.finish_and_clear();
    Ok(model)
}

/// Bytes of every tensor of `model` besides its linears' weights (embeddings, norms, biases,
/// the vision tower's patch and position embeddings) at their held dtype. The linears' weights
/// are taken out while the model is walked, so a packed weight is not dequantized to be counted.
fn non_linear_bytes(model: &mut BenchModel) -> i64 {
    let empty = || LinearWeight::Float(Tensor::zeros([0], (Kind::BFloat16, Device::Cpu)));
    let mut held = Vec::new();
    for linear in model.linears_and_head_mut() {
        held.push(std::mem::replace(&mut linear.weight, empty()));
    }
    // CLIP layers past the feature layer are loaded (the checkpoint holds them) but never run:
    // their linears count at their held size too.
    let mut unused = Vec::new();
    if let BenchModel::Llava(m) = model {
        let used = m.vision_tower.used_layers().len();
        for layer in &mut m.vision_tower.layers[used..] {
            for linear in layer.linears_mut() {
                unused.push(std::mem::replace(&mut linear.weight, empty()));
            }
        }
    }
    let bytes = float_bytes(model) + unused.iter().map(LinearWeight::bytes).sum::<i64>();
    for (linear, weight) in model.linears_and_head_mut().into_iter().zip(held) {
        linear.weight = weight;
    }
    if let BenchModel::Llava(m) = model {
        let used = m.vision_tower.used_layers().len();
        let linears = m.vision_tower.layers[used..].iter_mut().flat_map(|l| l.linears_mut());
        for (linear, weight) in linears.zip(unused) {
            linear.weight = weight;
        }
    }
    bytes
}

/// One round of a checkpoint: loaded and measured as stored, then its packed linears (and only
/// those) dequantized to bf16 on the own bf16 kernel and measured again (`BF16 own`).
fn checkpoint_round(
    cfg: &BenchConfig,
    entry: &CheckpointEntry,
    device: Device,
    bf16_own: &mut Option<std::result::Result<(), String>>,
    skipped: &mut Vec<Skipped>,
) -> Result<Vec<Row>> {
    let base = machine::rss_bytes();
    let mut model = load_checkpoint(entry, device)?;
    let layers = model.language_model().layers.len() as i64;
    let other = non_linear_bytes(&mut model);
    // A prefill image at the checkpoint's own resolution (Qwen2-VL: the bench presets' 336 px).
    let image_side = match &model {
        BenchModel::Llava(m) => m.cfg.vision.image_size,
        BenchModel::Qwen2Vl(_) => 336,
    };
    let mut rows = Vec::new();
    let packed: Vec<usize> = model
        .linears_and_head()
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l.weight, LinearWeight::Packed(_)))
        .map(|(i, _)| i)
        .collect();
    for scheme in [Scheme::Stored, Scheme::Bf16Own] {
        let what = format!("{} {}", entry.name, scheme.label(cfg.model.w4_group));
        if scheme == Scheme::Bf16Own {
            let decided = bf16_own.get_or_insert_with(|| {
                let reason = if packed.is_empty() {
                    Some(
                        "the checkpoint holds no packed linear: its stored row is already 16-bit"
                            .into(),
                    )
                } else {
                    let extra: i64 = model
                        .linears_and_head()
                        .iter()
                        .filter(|l| matches!(l.weight, LinearWeight::Packed(_)))
                        .map(|l| l.out_features * l.in_features)
                        .sum();
                    scheme
                        .not_here(device)
                        .or_else(|| does_not_fit(cfg, device, extra, Kind::BFloat16))
                };
                match reason {
                    Some(reason) => {
                        tracing::warn!("skipping {what}: {reason}");
                        skipped.push(Skipped {
                            model: entry.name.clone(),
                            schemes: scheme.label(cfg.model.w4_group),
                            reason: reason.clone(),
                        });
                        Err(reason)
                    }
                    None => Ok(()),
                }
            });
            if decided.is_err() {
                continue;
            }
            let pb = progress::bar(packed.len() as u64, &format!("{}: bf16 own", entry.name));
            for (i, linear) in model.linears_and_head_mut().into_iter().enumerate() {
                if let (true, LinearWeight::Packed(p)) = (packed.contains(&i), &linear.weight) {
                    let name = linear.id.to_string();
                    let w = p.dequantize().to_kind(Kind::BFloat16);
                    let [n, k] = p.shape().map(|d| d as usize);
                    // A shape the own kernel does not take stays a dense bf16 weight (libtorch's
                    // linear); the `kernel` column then counts it as `dense`.
                    linear.weight = match bf16_own::unsupported(n, k) {
                        None => {
                            LinearWeight::Bf16Own(Bf16Weight::from_tensor(&w, &name).with_context(
                                || format!("putting {name} on the own bf16 kernel"),
                            )?)
                        }
                        Some(_) => LinearWeight::Float(w),
                    };
                    pb.inc(1);
                }
            }
            pb.finish_and_clear();
        }
        let (kernel, fallbacks) = kernels(&model);
        let (timings, roof) = measure(&model, None, cfg, image_side, &what)?;
        let m = Measured {
            scheme,
            kernel,
            fallbacks,
            all: other + scheme::packable_bytes(&model),
            linears: decoder_linear_bytes(&model),
            extra: decode_extra_bytes(&model),
            layer_rest: layer_rest_bytes(&model),
            timings,
            roof,
            rss: rss_delta(base),
        };
        let r = row(cfg, &entry.name, &entry.name, layers, layers, m);
        tracing::info!("{what}: decode {:.1} ms/token", r.decode.total_ms());
        rows.push(r);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(scheme: Scheme, decode_ms: f64) -> Row {
        let split = Split { vision_ms: 0.0, layers_ms: decode_ms, head_ms: 0.0 };
        Row {
            shape: "s".into(),
            model: "s".into(),
            scheme,
            label: scheme.label(128),
            kernel: "k".into(),
            layers: 1,
            layers_built: 1,
            weight_bytes: 1,
            decoder_linear_bytes: 1,
            decode_bytes_per_token: 1,
            rss_delta_bytes: None,
            prefill_positions: 1,
            prefill: split,
            decode: split,
            decode_min_ms: decode_ms,
            decode_linears_ms: decode_ms,
            decode_fused: Some(Split { layers_ms: decode_ms / 2.0, ..split }),
            fused_max_rel_diff: Some(0.0),
            fallback_linears: 0,
            roof_before_bytes_per_s: 1.0,
            roof_after_bytes_per_s: 1.0,
            round_decode_ms: vec![decode_ms],
            round_speedup_16bit: Vec::new(),
            round_fused_speedup_16bit: Vec::new(),
            partner_fused: None,
            round_fused_speedup_stepped: Vec::new(),
            fused_stepped_roof_pct: None,
        }
    }

    #[test]
    fn rounds_give_the_median_row_and_paired_ratios() {
        // Round 2 ran on a slow machine: both rows slowed, the paired ratio did not move.
        // The slow round's weights also brought out a rounding difference in the fused step.
        let w4 = |ms: f64, stepped: f64| Row {
            round_fused_speedup_stepped: vec![stepped],
            ..measured(Scheme::W4a16, ms)
        };
        let mut slow_w4 = w4(200.0, 3.25);
        slow_w4.fused_max_rel_diff = Some(0.01);
        let rounds = vec![
            vec![measured(Scheme::Bf16Own, 400.0), w4(100.0, 3.5)],
            vec![measured(Scheme::Bf16Own, 800.0), slow_w4],
            vec![measured(Scheme::Bf16Own, 420.0), w4(140.0, 3.75)],
        ];
        let rows = median_rounds(rounds);
        assert_eq!(rows.len(), 2);
        let (own, w4) = (&rows[0], &rows[1]);
        assert_eq!((own.scheme, w4.scheme), (Scheme::Bf16Own, Scheme::W4a16));
        assert_eq!(own.decode.total_ms(), 420.0, "the median round");
        assert_eq!(w4.decode.total_ms(), 140.0);
        assert_eq!(w4.round_decode_ms, vec![100.0, 200.0, 140.0]);
        assert_eq!(w4.round_speedup_16bit, vec![4.0, 4.0, 3.0]);
        assert_eq!(own.round_speedup_16bit, vec![1.0, 1.0, 1.0]);
        // The fused steps pair the same way (each row's fused step is half its step here).
        assert_eq!(w4.round_fused_speedup_16bit, vec![4.0, 4.0, 3.0]);
        // The step-paired ratios of every round, in round order.
        assert_eq!(w4.round_fused_speedup_stepped, vec![3.5, 3.25, 3.75]);
        assert!(own.round_fused_speedup_stepped.is_empty());
        // The fused-vs-libtorch difference: the largest of all rounds, not the median round's.
        assert_eq!((w4.fused_max_rel_diff, own.fused_max_rel_diff), (Some(0.01), Some(0.0)));
        // One round: the row as measured; without a 16-bit row, no paired ratio.
        let one = median_rounds(vec![vec![measured(Scheme::W4a8, 90.0)]]);
        assert_eq!(one[0].round_decode_ms, vec![90.0]);
        assert!(one[0].round_speedup_16bit.is_empty());
        assert!(median_rounds(Vec::new()).is_empty());
    }

    /// A W4A16 measurement of a built model whose weights are all `bytes` of decoder linears.
    fn w4_measured(bytes: i64, timings: Timings) -> Measured {
        Measured {
            scheme: Scheme::W4a16,
            kernel: "k".into(),
            fallbacks: 0,
            all: bytes,
            linears: bytes,
            extra: 0,
            layer_rest: 0,
            rss: None,
            timings,
            roof: [1.0, 1.0],
        }
    }

    /// A row built with fewer layers: the partner's steps and the row's are both extrapolated
    /// per layer before they are divided (the head is not per layer).
    #[test]
    fn the_step_paired_ratio_is_taken_on_extrapolated_steps() {
        let text = "[bench]\nname = \"t\"\n[model]\nshapes = [\"llava-7b\"]\n";
        let cfg = config::parse(text, std::path::Path::new("t.toml")).expect("config");
        let step = |layers_ms: f64, head_ms: f64| Split { vision_ms: 0.0, layers_ms, head_ms };
        let timings = Timings {
            prefill_positions: 1,
            prefill: step(1.0, 1.0),
            decode: vec![step(20.0, 2.0)],
            linears: vec![15.0],
            fused: vec![step(9.0, 2.0), step(11.0, 2.0)],
            fused_max_rel_diff: Some(0.0),
            partner_fused: vec![step(30.0, 3.0), step(30.0, 3.0)],
            fused_roofs: Vec::new(),
        };
        let measured = |timings: Timings| w4_measured(1, timings);
        // 1 of 4 layers built: the row's fused step 4 · 10 + 2, the partner's 4 · 30 + 3.
        let r = row(&cfg, "s", "s", 4, 1, measured(timings.clone()));
        assert_eq!(r.partner_fused.map(|p| p.total_ms()), Some(123.0));
        assert_eq!(r.round_fused_speedup_stepped, vec![123.0 / 42.0]);
        // Without a partner: no ratio.
        let alone = Timings { partner_fused: Vec::new(), ..timings };
        let r = row(&cfg, "s", "s", 4, 1, measured(alone));
        assert!(r.partner_fused.is_none() && r.round_fused_speedup_stepped.is_empty());
    }

    /// Each fused step against the roof read right after it: the step extrapolated per layer,
    /// over the shape's bytes, then the median over the steps.
    #[test]
    fn each_fused_step_is_divided_by_the_roof_read_after_it() {
        let text = "[bench]\nname = \"t\"\n[model]\nshapes = [\"llava-7b\"]\n";
        let cfg = config::parse(text, std::path::Path::new("t.toml")).expect("config");
        let step = |layers_ms: f64| Split { vision_ms: 0.0, layers_ms, head_ms: 0.0 };
        // 1 of 4 layers built, 1000 decoder-linear bytes in it: 4000 bytes a token. The steps,
        // extrapolated: 40, 40 and 20 ms, i.e. 100 000, 100 000 and 200 000 bytes/s.
        let timings = Timings {
            prefill_positions: 1,
            prefill: step(1.0),
            decode: vec![step(20.0); 3],
            linears: vec![15.0; 3],
            fused: vec![step(10.0), step(10.0), step(5.0)],
            fused_max_rel_diff: Some(0.0),
            partner_fused: Vec::new(),
            fused_roofs: vec![200_000.0, 100_000.0, 400_000.0],
        };
        let measured = |timings: Timings| w4_measured(1000, timings);
        let r = row(&cfg, "s", "s", 4, 1, measured(timings.clone()));
        assert_eq!(r.decode_bytes_per_token, 4000);
        // 50 %, 100 % and 50 %: the median is 50 %.
        assert_eq!(r.fused_stepped_roof_pct, Some(50.0));
        // Without the reads: none.
        let unread = Timings { fused_roofs: Vec::new(), ..timings };
        assert_eq!(row(&cfg, "s", "s", 4, 1, measured(unread)).fused_stepped_roof_pct, None);
    }

    #[test]
    fn the_largest_fitting_layer_count_is_found() {
        // 40 layers of 0.6 GiB over 1.3 GiB of the rest, 12 GiB to spend → 17 layers.
        let bytes = |l: i64| 1.3 + 0.6 * l as f64;
        assert_eq!(largest_count(40, |l| bytes(l) <= 12.0), Some(17));
        assert_eq!(largest_count(40, |l| bytes(l) <= 100.0), Some(40));
        assert_eq!(largest_count(8, |l| bytes(l) <= 12.0), Some(8));
        assert_eq!(largest_count(40, |_| false), None);
    }
}
