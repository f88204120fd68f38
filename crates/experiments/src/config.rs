//! The experiment config: TOML with `deny_unknown_fields` everywhere, validated across fields,
//! resolved into a grid of cells (model × bit-width × method), each with an id that hashes its
//! resolved settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qvlm_core::device::{DType, DeviceSpec};
use qvlm_core::io::prompt::Template;
use qvlm_core::model::outliers::OutlierSpec;
use qvlm_core::quant::spec::{Granularity, RangeMode};
use qvlm_search::strategy::config::StrategyConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::methods::{preset, MethodSpec};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub experiment: Experiment,
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    pub dataset: DatasetConfig,
    #[serde(default)]
    pub calibration: CalibrationConfig,
    #[serde(default)]
    pub quant: QuantSettings,
    #[serde(default)]
    pub methods: Vec<MethodSpec>,
    pub grid: GridConfig,
    #[serde(default)]
    pub outputs: Outputs,
    #[serde(skip)]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub device: DeviceSpec,
    /// libtorch intra-op threads (0 = libtorch's default).
    #[serde(default)]
    pub threads: i32,
    #[serde(default)]
    pub seed: u64,
    /// Results folder (default `results/<name>`).
    #[serde(default)]
    pub results_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub dtype: DType,
    /// Original LLaVA: the CLIP directory.
    #[serde(default)]
    pub clip: Option<PathBuf>,
    /// Plant outlier channels after loading (the `tiny-llava-outliers` variant).
    #[serde(default)]
    pub outliers: Option<OutlierSpec>,
    /// How tables and reports name this model.
    #[serde(default)]
    pub label: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// easy-VQA (`path`: its `data` folder; default inside `.venv`).
    EasyVqa,
    /// ScienceQA's official layout (`path`: the folder with problems.json, pid_splits.json and
    /// images/); `split`, `prompt_format` ("QCM-LEPA" or "CQM-A"), `image_layout`.
    Scienceqa,
    /// VQA-style jsonl questions (`questions`, `images`, optional `answers`): VQAv2, VizWiz.
    Vqa,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub kind: DatasetKind,
    /// Dataset root (easy-VQA: default inside `.venv`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Evaluate the first `limit` questions of the split (all when absent).
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default = "default_template")]
    pub template: Template,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// ScienceQA: the evaluated split (default "test"); calibration uses "train".
    #[serde(default)]
    pub split: Option<String>,
    /// ScienceQA: "QCM-LEPA" (LLaVA-v1.3, Q-VLM) or "CQM-A" (LLaVA-1.5).
    #[serde(default)]
    pub prompt_format: Option<String>,
    /// ScienceQA: "official" (`images/<split>/<pid>/`) or "flat" (`images` is one split's folder).
    #[serde(default)]
    pub image_layout: Option<String>,
    /// VQA: the jsonl question file.
    #[serde(default)]
    pub questions: Option<PathBuf>,
    /// VQA: human answers (optional; without them no accuracy, only agreement with float).
    #[serde(default)]
    pub answers: Option<PathBuf>,
    /// VQA: the image folder; ScienceQA with the flat layout: the split's image folder.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// Generation length (ScienceQA default 1024 as LLaVA; VQA 128; easy-VQA 4).
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

fn default_template() -> Template {
    Template::LlavaV1
}
fn default_eval_batch() -> usize {
    64
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CalibrationConfig {
    /// Vision-language pairs drawn (seeded) from the training split (the paper: 64).
    #[serde(default = "default_calib_samples")]
    pub samples: usize,
}

fn default_calib_samples() -> usize {
    64
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self { samples: default_calib_samples() }
    }
}

/// Activation granularity and range mode of one tower.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActSettings {
    pub granularity: Granularity,
    pub range: RangeMode,
    #[serde(default)]
    pub symmetric: bool,
}

/// Which towers are quantized and how (the bit widths come from the grid).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantSettings {
    /// Weight group size along the input dimension for RTN/AWQ weights (0 = per output channel).
    #[serde(default = "default_group")]
    pub weight_group: i64,
    /// NF4 block size (QLoRA: 64) and double quantization.
    #[serde(default = "default_nf4_block")]
    pub nf4_block: i64,
    #[serde(default = "default_true")]
    pub nf4_double_quant: bool,
    /// Vision activations: per token, static (Outlier Suppression-style, as in the paper).
    #[serde(default = "default_vision_act")]
    pub vision_act: ActSettings,
    /// Language activations: per channel, static (RPTQ-style, as in the paper).
    #[serde(default = "default_language_act")]
    pub language_act: ActSettings,
    /// Quantize the projector (Q-VLM's code keeps it in float).
    #[serde(default)]
    pub quantize_projector: bool,
    /// Quantize the vision tower (the paper does; Q-VLM's released code does not).
    #[serde(default = "default_true")]
    pub quantize_vision: bool,
}

fn default_group() -> i64 {
    64
}
fn default_nf4_block() -> i64 {
    64
}
fn default_true() -> bool {
    true
}
fn default_vision_act() -> ActSettings {
    ActSettings { granularity: Granularity::PerToken, range: RangeMode::Static, symmetric: false }
}
fn default_language_act() -> ActSettings {
    ActSettings { granularity: Granularity::PerChannel, range: RangeMode::Static, symmetric: false }
}

impl Default for QuantSettings {
    fn default() -> Self {
        Self {
            weight_group: default_group(),
            nf4_block: default_nf4_block(),
            nf4_double_quant: true,
            vision_act: default_vision_act(),
            language_act: default_language_act(),
            quantize_projector: false,
            quantize_vision: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GridConfig {
    pub models: Vec<String>,
    /// Bit settings like "W4A4", "W6A6", "W8A8", "W4A16" (16 = float).
    pub bits: Vec<String>,
    pub methods: Vec<String>,
    /// Also evaluate each model in float (the reference for KL / agreement).
    #[serde(default = "default_true")]
    pub include_float: bool,
}

/// Which tables and figures the run writes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Outputs {
    /// Paper tables to compare against (file names under `paper/`), e.g. "table1_components".
    #[serde(default)]
    pub paper: Vec<String>,
    /// Figures: "accuracy_by_method", "ded_vs_entropy", "depth_tradeoff", "sensitivity_heatmap".
    #[serde(default)]
    pub figures: Vec<String>,
}

/// Bit widths of a cell; 16 means float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
pub struct Bits {
    pub w: u8,
    pub a: u8,
}

impl Bits {
    pub fn parse(s: &str) -> Option<Bits> {
        let rest = s.strip_prefix('W')?;
        let (w, a) = rest.split_once('A')?;
        let (w, a): (u8, u8) = (w.parse().ok()?, a.parse().ok()?);
        let ok = |b: u8| (2..=8).contains(&b) || b == 16;
        (ok(w) && ok(a)).then_some(Bits { w, a })
    }

    pub fn label(self) -> String {
        format!("W{}A{}", self.w, self.a)
    }
}

/// One resolved cell of the grid.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cell {
    pub id: String,
    pub model: ModelEntry,
    pub bits: Option<Bits>,
    pub method: String,
    /// Resolved method (weights + strategy); absent for the float reference.
    pub spec: Option<MethodSpec>,
    pub quant: QuantSettings,
    pub calibration: CalibrationConfig,
    pub dataset: DatasetConfig,
    pub seed: u64,
}

impl Cell {
    pub fn is_float(&self) -> bool {
        self.spec.is_none()
    }
}

fn cell_id(value: &impl Serialize) -> Result<String> {
    let json = serde_json::to_string(value)?;
    let digest = Sha256::digest(json.as_bytes());
    Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
}

pub fn load(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg: Config =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    cfg.file = path.to_path_buf();
    validate(&cfg)?;
    Ok(cfg)
}

fn validate(cfg: &Config) -> Result<()> {
    let f = cfg.file.display();
    if cfg.experiment.name.trim().is_empty() || cfg.experiment.name.contains(['/', '\\']) {
        bail!("{f}: key `experiment.name`: must be a non-empty folder name");
    }
    if cfg.experiment.threads < 0 {
        bail!("{f}: key `experiment.threads`: must be ≥ 0");
    }
    let mut names = std::collections::BTreeSet::new();
    for m in &cfg.models {
        if !names.insert(m.name.as_str()) {
            bail!("{f}: key `models`: model `{}` is defined twice", m.name);
        }
        if let Some(o) = &m.outliers {
            if o.channels == 0 || o.scale <= 0.0 {
                bail!(
                    "{f}: key `models.outliers` of `{}`: channels and scale must be positive",
                    m.name
                );
            }
        }
    }
    if cfg.grid.models.is_empty() || cfg.grid.bits.is_empty() || cfg.grid.methods.is_empty() {
        bail!("{f}: key `grid`: models, bits and methods must each name at least one entry (the grid is empty)");
    }
    for m in &cfg.grid.models {
        if !cfg.models.iter().any(|e| &e.name == m) {
            bail!("{f}: key `grid.models`: unknown model `{m}` (define it under [[models]])");
        }
    }
    for b in &cfg.grid.bits {
        if Bits::parse(b).is_none() {
            bail!("{f}: key `grid.bits`: `{b}` is not W<bits>A<bits> with bits 2–8 or 16");
        }
    }
    if cfg.quant.language_act.granularity == Granularity::PerToken
        && cfg.quant.language_act.range == RangeMode::Static
    {
        bail!("{f}: key `quant.language_act`: static per-token ranges need a fixed sequence length; use range = \"dynamic\" for per-token language activations");
    }
    for m in &cfg.grid.methods {
        let Some(spec) = resolve_method(cfg, m) else {
            bail!(
                "{f}: key `grid.methods`: unknown method `{m}` (presets: {}; or define it under [[methods]])",
                crate::methods::PRESETS.join(", ")
            );
        };
        let act = spec.language_act.unwrap_or(cfg.quant.language_act);
        if act.granularity == Granularity::PerToken
            && act.range == RangeMode::Static
            && !spec.dynamic_activations
        {
            bail!("{f}: method `{m}`: static per-token language activations need a fixed sequence length; use range = \"dynamic\"");
        }
    }
    let d = &cfg.dataset;
    match d.kind {
        DatasetKind::EasyVqa => {
            for (key, set) in [
                ("split", d.split.is_some()),
                ("prompt_format", d.prompt_format.is_some()),
                ("questions", d.questions.is_some()),
                ("answers", d.answers.is_some()),
                ("images", d.images.is_some()),
                ("image_layout", d.image_layout.is_some()),
            ] {
                if set {
                    bail!("{f}: key `dataset.{key}`: not used by easy_vqa");
                }
            }
        }
        DatasetKind::Scienceqa => {
            if d.path.is_none() {
                bail!("{f}: key `dataset.path`: ScienceQA needs the folder holding problems.json and pid_splits.json");
            }
            if let Some(s) = &d.split {
                s.parse::<crate::data::scienceqa::Split>()
                    .map_err(|e| anyhow::anyhow!("{f}: key `dataset.split`: {e}"))?;
            }
            if let Some(p) = &d.prompt_format {
                p.parse::<crate::data::scienceqa::PromptFormat>()
                    .map_err(|e| anyhow::anyhow!("{f}: key `dataset.prompt_format`: {e}"))?;
            }
            match d.image_layout.as_deref() {
                None | Some("official") => {}
                Some("flat") if d.images.is_some() => {}
                Some("flat") => bail!("{f}: key `dataset.images`: the flat image layout needs the split's image folder"),
                Some(other) => bail!("{f}: key `dataset.image_layout`: unknown layout `{other}` (official, flat)"),
            }
        }
        DatasetKind::Vqa => {
            if d.questions.is_none() || d.images.is_none() {
                bail!("{f}: keys `dataset.questions` and `dataset.images` are required for vqa");
            }
        }
    }
    if d.max_new_tokens == Some(0) {
        bail!("{f}: key `dataset.max_new_tokens`: must be at least 1");
    }
    if cfg.calibration.samples == 0 {
        bail!("{f}: key `calibration.samples`: must be at least 1");
    }
    if cfg.dataset.batch_size == 0 {
        bail!("{f}: key `dataset.batch_size`: must be at least 1");
    }
    let q = &cfg.quant;
    if q.weight_group < 0 || q.nf4_block <= 0 {
        bail!("{f}: key `quant.weight_group`/`quant.nf4_block`: must be non-negative / positive");
    }
    for (key, act) in [("quant.vision_act", q.vision_act), ("quant.language_act", q.language_act)] {
        if let Granularity::PerGroup { size } = act.granularity {
            if size <= 0 {
                bail!("{f}: key `{key}.granularity.size`: must be positive");
            }
        }
    }
    for o in &cfg.outputs.paper {
        if !paper_dir(cfg).join(format!("{o}.csv")).is_file() {
            bail!("{f}: key `outputs.paper`: no paper/{o}.csv");
        }
    }
    for fig in &cfg.outputs.figures {
        if !crate::figure::FIGURES.contains(&fig.as_str()) {
            bail!(
                "{f}: key `outputs.figures`: unknown figure `{fig}` ({})",
                crate::figure::FIGURES.join(", ")
            );
        }
    }
    Ok(())
}

/// Checks the paths a run reads (dataset, models) before anything runs; separate from [`load`]
/// so that configs for data this machine lacks still parse, resolve and dry-run.
pub fn check_paths(cfg: &Config) -> Result<()> {
    let f = cfg.file.display();
    let d = &cfg.dataset;
    for (key, p) in [
        ("path", &d.path),
        ("questions", &d.questions),
        ("answers", &d.answers),
        ("images", &d.images),
    ] {
        if let Some(p) = p {
            if !p.exists() {
                bail!("{f}: key `dataset.{key}`: {} does not exist", p.display());
            }
        }
    }
    for m in cfg.models.iter().filter(|m| cfg.grid.models.contains(&m.name)) {
        if !m.path.join("config.json").is_file() {
            bail!(
                "{f}: key `models.path` of `{}`: {} is not a checkpoint directory (no config.json)",
                m.name,
                m.path.display()
            );
        }
    }
    Ok(())
}

/// The `paper/` folder: in the working directory, else in the nearest folder above the config
/// that has one (`configs/../paper`, `configs/real/../../paper`).
pub fn paper_dir(cfg: &Config) -> PathBuf {
    let here = PathBuf::from("paper");
    if here.is_dir() {
        return here;
    }
    cfg.file.ancestors().skip(1).map(|a| a.join("paper")).find(|p| p.is_dir()).unwrap_or(here)
}

/// A method by name: defined in the config, else a preset.
pub fn resolve_method(cfg: &Config, name: &str) -> Option<MethodSpec> {
    cfg.methods.iter().find(|m| m.name == name).cloned().or_else(|| preset(name))
}

/// The grid's cells in a stable order (model, bits, method), float references first.
pub fn cells(cfg: &Config) -> Result<Vec<Cell>> {
    let mut out = Vec::new();
    for model_name in &cfg.grid.models {
        let model = cfg
            .models
            .iter()
            .find(|m| &m.name == model_name)
            .context("model checked in validate")?;
        let mut push = |bits: Option<Bits>, method: &str, spec: Option<MethodSpec>| -> Result<()> {
            let mut cell = Cell {
                id: String::new(),
                model: model.clone(),
                bits,
                method: method.to_string(),
                spec,
                quant: cfg.quant.clone(),
                calibration: cfg.calibration.clone(),
                dataset: cfg.dataset.clone(),
                seed: cfg.experiment.seed,
            };
            cell.id = cell_id(&cell)?;
            out.push(cell);
            Ok(())
        };
        if cfg.grid.include_float {
            push(None, "fp", None)?;
        }
        for b in &cfg.grid.bits {
            let bits = Bits::parse(b).context("bits checked in validate")?;
            for m in &cfg.grid.methods {
                let spec = resolve_method(cfg, m).context("method checked in validate")?;
                push(Some(bits), m, Some(spec))?;
            }
        }
    }
    Ok(out)
}

pub fn print_plan(cfg: &Config, cells: &[Cell]) {
    println!(
        "experiment `{}` from {} — {} cells",
        cfg.experiment.name,
        cfg.file.display(),
        cells.len()
    );
    for c in cells {
        let bits = c.bits.map(Bits::label).unwrap_or_else(|| "FP".into());
        let strategy = c.spec.as_ref().map(|s| s.strategy_name()).unwrap_or_else(|| "float".into());
        println!("  {}  {:<22} {:<6} {:<14} {}", c.id, c.model.name, bits, c.method, strategy);
    }
}

pub fn results_dir(cfg: &Config) -> PathBuf {
    cfg.experiment
        .results_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("results").join(&cfg.experiment.name))
}

/// Strategy names by cell (for reports).
pub fn strategy_of(spec: &MethodSpec) -> &StrategyConfig {
    &spec.strategy
}

/// Labels of models for tables.
pub fn model_labels(cfg: &Config) -> BTreeMap<String, String> {
    cfg.models
        .iter()
        .map(|m| (m.name.clone(), m.label.clone().unwrap_or_else(|| m.name.clone())))
        .collect()
}
