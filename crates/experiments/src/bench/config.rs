//! `configs/efficiency.toml`: which LLaVA shapes `experiments bench` builds (random weights), which
//! weight schemes it packs them with, and how it times prefill, decode and the memory bandwidth.
//! TOML with `deny_unknown_fields` everywhere; every error names the file and the key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::scheme::{Part, Scheme};
use super::shape::{Shape, ShapeDims, ShapeFamily};
use crate::config::RunHeader;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BenchConfig {
    pub bench: RunHeader,
    #[serde(default)]
    pub model: ModelSettings,
    #[serde(default)]
    pub measure: MeasureSettings,
    #[serde(default)]
    pub bandwidth: BandwidthSettings,
    /// Custom shapes (`[[shape]]`), named in `model.shapes` like the presets.
    #[serde(default, rename = "shape")]
    pub custom_shapes: Vec<ShapeDims>,
    /// Checkpoint directories timed as they are stored (`[[checkpoint]]`), after the shapes.
    #[serde(default, rename = "checkpoint")]
    pub checkpoints: Vec<CheckpointEntry>,
    #[serde(skip)]
    pub file: PathBuf,
    /// The config's text (its hash is recorded with the results).
    #[serde(skip)]
    pub text: String,
}

/// A model directory the bench loads and times as stored (`[[checkpoint]]`): a
/// compressed-tensors export (ours, or another tool's: llm-compressor, GPTQModel, AutoRound), a
/// llava-hf or Qwen2-VL directory, with the loaders `generate` and the grids use. Its float parts
/// are loaded in bf16, like the shapes' rows. Two rows per round: `as stored` (its packed linears
/// on the kernels this machine picks) and `BF16 own` (the same linears dequantized to bf16 on the
/// own memory-bound kernel, everything else unchanged): the fair 16-bit baseline of the same
/// weights, so that its "vs 16-bit" ratio changes one thing.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointEntry {
    /// The table's model name.
    pub name: String,
    /// The directory (with `config.json`).
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Presets (`llava-7b`, `llava-13b`) or names of `[[shape]]` tables, in run order. Default:
    /// `llava-7b`, or none when the config has `[[checkpoint]]` tables.
    #[serde(default = "default_shapes")]
    pub shapes: Vec<String>,
    /// Decoder layers built per shape, capped at the shape's own count (fewer for quick runs;
    /// rows are then labelled with the count built). Default: all.
    #[serde(default)]
    pub layers: Option<i64>,
    /// Build FP32 with at most this many decoder layers and extrapolate latency and memory per
    /// layer to the shape's count (FP32 LLaVA-7B needs ~28 GB). Default: all layers.
    #[serde(default)]
    pub fp32_layers: Option<i64>,
    /// Weight schemes, reported in this order.
    #[serde(default = "default_schemes")]
    pub schemes: Vec<Scheme>,
    /// W4A16 group size (inputs per scale and zero point).
    #[serde(default = "default_group")]
    pub w4_group: i64,
    /// Decoder layers built for a shape whose whole bf16 build does not fit in memory (capped by
    /// what fits); its rows are extrapolated per layer. Default 8.
    #[serde(default = "default_partial_layers")]
    pub partial_layers: i64,
    /// Which weights the packed schemes pack (the rest stay in the model's float dtype).
    /// Default: the decoder's linears only.
    #[serde(default = "default_parts")]
    pub packed_parts: Vec<Part>,
    /// Memory kept free when deciding whether a model fits (GiB of `MemAvailable`, CPU only).
    #[serde(default = "default_headroom")]
    pub memory_headroom_gib: f64,
}

fn default_headroom() -> f64 {
    2.0
}

fn default_partial_layers() -> i64 {
    8
}

fn default_parts() -> Vec<Part> {
    vec![Part::Decoder]
}

fn default_shapes() -> Vec<String> {
    vec!["llava-7b".into()]
}
fn default_schemes() -> Vec<Scheme> {
    Scheme::ALL.to_vec()
}
fn default_group() -> i64 {
    128
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            shapes: default_shapes(),
            layers: None,
            fp32_layers: None,
            schemes: default_schemes(),
            w4_group: default_group(),
            partial_layers: default_partial_layers(),
            packed_parts: default_parts(),
            memory_headroom_gib: default_headroom(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeasureSettings {
    /// Prompt tokens of the timed prefill (batch 1).
    #[serde(default = "default_prefill")]
    pub prefill_tokens: i64,
    /// Put one image (vision tower + projector, spliced into the prompt) into the prefill; off,
    /// the prefill is text only.
    #[serde(default)]
    pub prefill_image: bool,
    /// Decode steps run and discarded before timing.
    #[serde(default = "default_warmup")]
    pub warmup_tokens: usize,
    /// Decode steps timed (M = 1 with the KV cache), averaged.
    #[serde(default = "default_decode")]
    pub decode_tokens: usize,
    /// Times the BF16 family of a shape (BF16 and every packed scheme) is built and measured,
    /// one round after the other; each row reports its median round and the range, and the
    /// speed-up over the fastest 16-bit row is the median of the per-round (paired) ratios. More
    /// than one on a machine whose memory bandwidth drifts (seen: ±50 % within minutes).
    #[serde(default = "default_rounds")]
    pub rounds: usize,
    /// On the CPU, follow every fused decode step of a W4 row with a fused step of a second
    /// model of the same shape on the own bf16 kernel (the BF16 own row's model), so that the
    /// W4 row's "vs 16-bit" ratio is taken step by step in the same seconds
    /// (`fused_speedup_vs_bf16_own_stepped`): the per-round rows run minutes apart, and the
    /// machine's bandwidth moves by tens of percent within minutes. The partner is built once a
    /// round, after the first W4 scheme is put in (both must fit in memory; otherwise it is
    /// listed under "Not run").
    #[serde(default)]
    pub step_paired_16bit: bool,
    /// On the CPU, read the memory roof again right after every fused decode step: one
    /// streaming read of this many MiB in each prefetch variant, the fastest counting (one buffer,
    /// allocated for the row and freed after it). Each step's weight traffic is then divided by
    /// the roof of its own seconds (`fused_roof_pct_stepped`, the median over the row's steps),
    /// where `roof_gb_s` is read before and after the row, 10–30 s apart: the 2-core machines'
    /// bandwidth switched between ~47 and ~70 GB/s within seconds (AMD EPYC, 2026-12-06). Off
    /// (absent) by default. Short reads ran faster on that EPYC (256 MiB ~12 % above 1 GiB), so
    /// it should be as large as `bandwidth.mib`.
    #[serde(default)]
    pub roof_each_step_mib: Option<usize>,
}

fn default_rounds() -> usize {
    1
}

fn default_prefill() -> i64 {
    64
}
fn default_warmup() -> usize {
    2
}
fn default_decode() -> usize {
    8
}

impl Default for MeasureSettings {
    fn default() -> Self {
        Self {
            prefill_tokens: default_prefill(),
            prefill_image: false,
            warmup_tokens: default_warmup(),
            decode_tokens: default_decode(),
            rounds: default_rounds(),
            step_paired_16bit: false,
            roof_each_step_mib: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BandwidthSettings {
    /// Size of the copied tensor (MiB); well above the last-level cache.
    #[serde(default = "default_mib")]
    pub mib: i64,
    /// Timed copies; the best is kept.
    #[serde(default = "default_repeats")]
    pub repeats: usize,
}

fn default_mib() -> i64 {
    1024
}
fn default_repeats() -> usize {
    5
}

impl Default for BandwidthSettings {
    fn default() -> Self {
        Self { mib: default_mib(), repeats: default_repeats() }
    }
}

impl BenchConfig {
    /// The shapes of `model.shapes`, resolved (presets or `[[shape]]` tables).
    pub fn shapes(&self) -> Result<Vec<Shape>> {
        let f = self.file.display();
        self.model
            .shapes
            .iter()
            .map(|name| {
                Shape::resolve(name, &self.custom_shapes).with_context(|| {
                    format!("{f}: key `model.shapes`: unknown shape `{name}` (presets: {}; or define it under [[shape]])", Shape::PRESETS.join(", "))
                })
            })
            .collect()
    }

    pub fn results_dir(&self) -> PathBuf {
        self.bench.results_dir()
    }
}

/// Reads and validates a bench config.
pub fn load(path: &Path) -> Result<BenchConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text, path)
}

/// Parses and validates config text; `path` names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<BenchConfig> {
    crate::config::ConfigKind::Bench.expect(text, path)?;
    // `[bench]` is the run header every command shares; the one bench-only key it held moved.
    if let Ok(t) = text.parse::<toml::Table>() {
        if t.get("bench").and_then(|b| b.get("memory_headroom_gib")).is_some() {
            bail!(
                "{}: key `bench.memory_headroom_gib` is now `model.memory_headroom_gib` (move it to [model])",
                path.display()
            );
        }
    }
    let mut cfg: BenchConfig = crate::config::parse_toml(text, path)?;
    cfg.file = path.to_path_buf();
    cfg.text = text.to_string();
    // The default shape (`llava-7b`) is for configs that name nothing to time: with
    // `[[checkpoint]]` tables and no `model.shapes`, only the checkpoints run.
    let names_shapes = text
        .parse::<toml::Table>()
        .ok()
        .is_some_and(|t| t.get("model").and_then(|m| m.get("shapes")).is_some());
    if !names_shapes && !cfg.checkpoints.is_empty() {
        cfg.model.shapes.clear();
    }
    validate(&cfg)?;
    Ok(cfg)
}

fn validate(cfg: &BenchConfig) -> Result<()> {
    let f = cfg.file.display();
    cfg.bench.check(&cfg.file, "bench")?;
    let m = &cfg.model;
    if !(m.memory_headroom_gib.is_finite() && m.memory_headroom_gib >= 0.0) {
        bail!("{f}: key `model.memory_headroom_gib`: must be a finite number ≥ 0");
    }
    if m.shapes.is_empty() && cfg.checkpoints.is_empty() {
        bail!("{f}: key `model.shapes`: name at least one shape (or a `[[checkpoint]]`)");
    }
    if m.schemes.is_empty() {
        bail!("{f}: key `model.schemes`: name at least one scheme");
    }
    let mut seen = BTreeSet::new();
    for s in &m.schemes {
        if *s == Scheme::Stored {
            bail!(
                "{f}: key `model.schemes`: `stored` is the row of a `[[checkpoint]]`, not a \
                 scheme to put into a shape"
            );
        }
        if !seen.insert(*s) {
            bail!("{f}: key `model.schemes`: `{}` is listed twice", s.key());
        }
    }
    for (key, v) in [
        ("model.layers", m.layers),
        ("model.fp32_layers", m.fp32_layers),
        ("model.partial_layers", Some(m.partial_layers)),
    ] {
        if v.is_some_and(|v| v < 1) {
            bail!("{f}: key `{key}`: must be at least 1");
        }
    }
    let mut parts = BTreeSet::new();
    for p in &m.packed_parts {
        if !parts.insert(*p) {
            bail!("{f}: key `model.packed_parts`: `{}` is listed twice", p.key());
        }
    }
    if !parts.contains(&Part::Decoder) {
        bail!(
            "{f}: key `model.packed_parts`: must include `decoder` (the schemes are defined by it)"
        );
    }
    if m.w4_group <= 0 {
        bail!("{f}: key `model.w4_group`: must be positive");
    }
    // The VNNI kernel's rule (`int4_vnni::unsupported`): whole 128-input blocks per group.
    if let Some(s) = m.schemes.iter().find(|s| s.on_vnni()) {
        if m.w4_group % 128 != 0 {
            bail!(
                "{f}: key `model.w4_group`: {} runs on the own VNNI kernel, which takes groups \
                 that are multiples of 128, not {}",
                s.key(),
                m.w4_group
            );
        }
    }
    let mut names = BTreeSet::new();
    for (i, s) in cfg.custom_shapes.iter().enumerate() {
        if Shape::PRESETS.contains(&s.name.as_str()) || !names.insert(s.name.as_str()) {
            bail!("{f}: key `shape[{i}].name`: `{}` is defined twice (or is a preset)", s.name);
        }
        if let Err(reason) = s.check() {
            bail!("{f}: key `shape[{i}]` (`{}`): {reason}", s.name);
        }
    }
    let mut listed = BTreeSet::new();
    for shape in cfg.shapes()? {
        if !listed.insert(shape.name.clone()) {
            bail!("{f}: key `model.shapes`: `{}` is listed twice", shape.name);
        }
        let d = &shape.dims;
        if !m.schemes.iter().any(|s| s.is_w4()) {
            continue;
        }
        // The inputs of every packed linear must split into whole groups.
        let mut inputs = vec![("decoder", d.text_hidden), ("decoder", d.text_intermediate)];
        if parts.contains(&Part::Vision) {
            inputs.extend([("vision", d.vision_hidden), ("vision", d.vision_intermediate)]);
        }
        if parts.contains(&Part::Projector) {
            inputs.extend(match d.family {
                ShapeFamily::Llava => {
                    [("projector", d.vision_hidden), ("projector", d.text_hidden)]
                }
                // The patch merger: both linears take 2×2 merged patches.
                ShapeFamily::Qwen2Vl => [("projector", 4 * d.vision_hidden); 2],
            });
        }
        if let Some((part, k)) = inputs.into_iter().find(|(_, k)| k % m.w4_group != 0) {
            bail!(
                "{f}: key `model.w4_group`: {} does not divide `{}`'s {part} inputs ({k})",
                m.w4_group,
                shape.name,
            );
        }
    }
    for (i, c) in cfg.checkpoints.iter().enumerate() {
        if c.name.is_empty() || listed.contains(&c.name) || !names.insert(c.name.as_str()) {
            bail!(
                "{f}: key `checkpoint[{i}].name`: `{}` is empty or names a shape or another \
                 checkpoint",
                c.name
            );
        }
        if !c.path.join("config.json").is_file() {
            bail!("{f}: key `checkpoint[{i}].path`: {} has no config.json", c.path.display());
        }
    }
    let me = &cfg.measure;
    if me.prefill_tokens < 1 {
        bail!("{f}: key `measure.prefill_tokens`: must be at least 1");
    }
    if me.decode_tokens < 1 {
        bail!("{f}: key `measure.decode_tokens`: must be at least 1");
    }
    if !(1..=15).contains(&me.rounds) {
        bail!("{f}: key `measure.rounds`: must be between 1 and 15, got {}", me.rounds);
    }
    if !(1..=1 << 20).contains(&cfg.bandwidth.mib) || cfg.bandwidth.repeats < 1 {
        bail!(
            "{f}: key `bandwidth.mib`/`bandwidth.repeats`: must be at least 1 (mib at most 2^20)"
        );
    }
    for (key, v) in [
        ("measure.prefill_tokens", me.prefill_tokens as u128),
        ("measure.warmup_tokens", me.warmup_tokens as u128),
        ("measure.decode_tokens", me.decode_tokens as u128),
        ("model.layers", m.layers.unwrap_or(1) as u128),
        ("model.fp32_layers", m.fp32_layers.unwrap_or(1) as u128),
        ("model.partial_layers", m.partial_layers as u128),
        ("model.w4_group", m.w4_group as u128),
    ] {
        if v > 1 << 20 {
            bail!("{f}: key `{key}`: {v} is above 2^20");
        }
    }
    Ok(())
}
