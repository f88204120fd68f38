//! The experiment config: TOML with `deny_unknown_fields` everywhere, typed so that what parses
//! is valid field by field (bit widths, figures, dataset kinds with only their own keys, counts
//! that cannot be zero); [`load`] then checks the rules that span fields.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qvlm_core::device::{DType, DeviceSpec};
use qvlm_core::io::prompt::Template;
use qvlm_core::model::outliers::{OutlierSpec, ShiftSpec};
use serde::{Deserialize, Serialize};

use crate::data::scienceqa::Split;
use crate::methods::{preset, MethodSpec, WeightFormat, PRESETS};
use crate::prompt::scienceqa::PromptFormat;
use crate::settings::{Bits, QuantSettings};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub experiment: RunHeader,
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
    /// The config file's text (its hash is recorded with the results).
    #[serde(skip)]
    pub text: String,
}

/// The head of every command's config (`[experiment]`, the bench's `[bench]`): what the run is
/// called, where it runs, and where its results go.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunHeader {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub device: DeviceSpec,
    /// libtorch intra-op threads (0 = libtorch's default, one per core).
    #[serde(default)]
    pub threads: u16,
    #[serde(default)]
    pub seed: u64,
    /// Results folder (default `results/<name>`).
    #[serde(default)]
    pub results_dir: Option<PathBuf>,
}

impl RunHeader {
    /// The results folder: `results_dir`, else `results/<name>`.
    pub fn results_dir(&self) -> PathBuf {
        self.results_dir.clone().unwrap_or_else(|| PathBuf::from("results").join(&self.name))
    }

    /// `name` must be a plain folder name (it becomes `results/<name>`); `table` names the table
    /// in errors (`experiment`, `bench`).
    pub fn check(&self, file: &Path, table: &str) -> Result<()> {
        let name = self.name.trim();
        if name.is_empty() || name == "." || name == ".." || self.name.contains(['/', '\\']) {
            bail!(
                "{}: key `{table}.name`: `{}` is not a plain folder name (it becomes results/<name>)",
                file.display(),
                self.name
            );
        }
        Ok(())
    }
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
    /// Shift a few vision LayerNorm channels after loading (the `tiny-llava-shifted` variant).
    /// Left out of `config.json` (and so of every cell id) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shifted_outliers: Option<ShiftSpec>,
    /// How tables and reports name this model.
    #[serde(default)]
    pub label: Option<String>,
}

impl ModelEntry {
    /// Plants the outliers this entry asks for (the planted and the shifted variants) into a
    /// freshly loaded LLaVA.
    pub fn plant(&self, model: &mut qvlm_core::model::llava::Llava) -> Result<()> {
        if let Some(spec) = &self.outliers {
            qvlm_core::model::outliers::plant_outliers(model, spec);
        }
        if let Some(spec) = &self.shifted_outliers {
            qvlm_core::model::outliers::plant_shifted_outliers(model, spec)
                .with_context(|| format!("model `{}`: key `shifted_outliers`", self.name))?;
        }
        Ok(())
    }

    /// Whether loading plants anything (LLaVA only).
    pub fn plants_outliers(&self) -> bool {
        self.outliers.is_some() || self.shifted_outliers.is_some()
    }

    pub fn label(&self) -> String {
        self.label.clone().unwrap_or_else(|| self.name.clone())
    }
}

/// `[dataset]`: which benchmark a run evaluates (and draws calibration pairs from), and how its
/// questions are asked. Written as one flat table with a `kind`; each kind accepts only its own
/// keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "DatasetTable", into = "DatasetTable")]
pub struct DatasetConfig {
    pub benchmark: Benchmark,
    /// Evaluate the first `limit` questions of the split (all when absent).
    pub limit: Option<NonZeroUsize>,
    pub template: Template,
    pub batch_size: NonZeroUsize,
    /// Generation length (default per benchmark: ScienceQA 1024 as LLaVA, VQA 128, easy-VQA 4).
    pub max_new_tokens: Option<NonZeroUsize>,
}

/// The benchmark and its files.
#[derive(Debug, Clone, PartialEq)]
pub enum Benchmark {
    /// easy-VQA (`path`: its `data` folder; default inside `.venv`). `split = "validation"`
    /// evaluates the questions of the train split's held-out images (the last 10 % by id, for
    /// tuning); the default is the test split. Calibration pairs always come from the other train
    /// images.
    EasyVqa { path: Option<PathBuf>, validation: bool },
    /// ScienceQA's official layout: `path` holds problems.json, pid_splits.json and images/.
    Scienceqa {
        path: PathBuf,
        /// The evaluated split (default test); calibration pairs come from train.
        split: Option<Split>,
        /// QCM-LEPA (LLaVA-v1.3, Q-VLM; the default) or CQM-A (LLaVA-1.5).
        prompt_format: Option<PromptFormat>,
        /// Where the images are (default: the official `images/<split>/<pid>/`).
        images: Option<SqaImages>,
        /// Calibrate on the evaluated split's image questions instead of `train` (Q-VLM draws
        /// calibration pairs from train; without `images/train` that is an error unless this is
        /// set).
        calibrate_on_evaluated_split: bool,
    },
    /// VQA-style jsonl questions (VQAv2, VizWiz); without `answers` no accuracy, only agreement
    /// with float.
    Vqa { questions: PathBuf, images: PathBuf, answers: Option<PathBuf> },
}

/// Where a ScienceQA split's images are.
#[derive(Debug, Clone, PartialEq)]
pub enum SqaImages {
    /// `images/<split>/<pid>/<image>` below the dataset folder (`image_layout = "official"`).
    Official,
    /// One split's folder, `<folder>/<pid>/<image>` (`image_layout = "flat"`, `images = …`).
    Flat(PathBuf),
}

impl Benchmark {
    pub fn name(&self) -> &'static str {
        match self {
            Benchmark::EasyVqa { .. } => "easy_vqa",
            Benchmark::Scienceqa { .. } => "scienceqa",
            Benchmark::Vqa { .. } => "vqa",
        }
    }

    /// The files a run reads, by key (checked before a run, not at parse time, so that configs
    /// for data this machine lacks still parse and dry-run).
    fn paths(&self) -> Vec<(&'static str, &Path)> {
        match self {
            Benchmark::EasyVqa { path, .. } => path.iter().map(|p| ("path", p.as_path())).collect(),
            Benchmark::Scienceqa { path, images, .. } => {
                let mut out = vec![("path", path.as_path())];
                if let Some(SqaImages::Flat(dir)) = images {
                    out.push(("images", dir.as_path()));
                }
                out
            }
            Benchmark::Vqa { questions, images, answers } => {
                let mut out =
                    vec![("questions", questions.as_path()), ("images", images.as_path())];
                out.extend(answers.iter().map(|a| ("answers", a.as_path())));
                out
            }
        }
    }
}

/// `[dataset]` as written: one flat table. Parsing turns it into a [`DatasetConfig`] (refusing
/// keys of another kind); serializing a `DatasetConfig` writes it back, so that cell ids (which
/// hash it) and `config.json` keep the form they always had.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DatasetTable {
    kind: DatasetKind,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    limit: Option<NonZeroUsize>,
    #[serde(default = "default_template")]
    template: Template,
    #[serde(default = "default_eval_batch")]
    batch_size: NonZeroUsize,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    prompt_format: Option<String>,
    #[serde(default)]
    image_layout: Option<String>,
    #[serde(default)]
    questions: Option<PathBuf>,
    #[serde(default)]
    answers: Option<PathBuf>,
    #[serde(default)]
    images: Option<PathBuf>,
    #[serde(default)]
    max_new_tokens: Option<NonZeroUsize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    calibrate_on_evaluated_split: bool,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum DatasetKind {
    EasyVqa,
    Scienceqa,
    Vqa,
}

fn default_template() -> Template {
    Template::LlavaV1
}
fn default_eval_batch() -> NonZeroUsize {
    NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN)
}

impl TryFrom<DatasetTable> for DatasetConfig {
    type Error = String;

    fn try_from(t: DatasetTable) -> Result<Self, String> {
        let kind = t.kind;
        let unused = |key: &str, set: bool| -> Result<(), String> {
            match set {
                true => Err(format!("key `dataset.{key}`: not used by kind = \"{}\"", kind.name())),
                false => Ok(()),
            }
        };
        let benchmark = match kind {
            DatasetKind::EasyVqa => {
                unused("calibrate_on_evaluated_split", t.calibrate_on_evaluated_split)?;
                let validation = match t.split.as_deref() {
                    None | Some("test") => false,
                    Some("validation") => true,
                    Some(other) => {
                        return Err(format!(
                            "key `dataset.split`: `{other}` is not an easy-VQA split (test, validation)"
                        ))
                    }
                };
                unused("prompt_format", t.prompt_format.is_some())?;
                unused("image_layout", t.image_layout.is_some())?;
                unused("questions", t.questions.is_some())?;
                unused("answers", t.answers.is_some())?;
                unused("images", t.images.is_some())?;
                Benchmark::EasyVqa { path: t.path, validation }
            }
            DatasetKind::Scienceqa => {
                unused("questions", t.questions.is_some())?;
                unused("answers", t.answers.is_some())?;
                let path = t.path.ok_or(
                    "key `dataset.path`: ScienceQA needs the folder holding problems.json and \
                     pid_splits.json",
                )?;
                let split = t
                    .split
                    .map(|s| s.parse::<Split>().map_err(|e| format!("key `dataset.split`: {e}")))
                    .transpose()?;
                let prompt_format = t
                    .prompt_format
                    .map(|s| {
                        s.parse::<PromptFormat>()
                            .map_err(|e| format!("key `dataset.prompt_format`: {e}"))
                    })
                    .transpose()?;
                let images = match (t.image_layout.as_deref(), t.images) {
                    (None, None) => None,
                    (Some("official"), None) => Some(SqaImages::Official),
                    (Some("flat"), Some(dir)) => Some(SqaImages::Flat(dir)),
                    (Some("flat"), None) => {
                        return Err("key `dataset.images`: the flat image layout needs the \
                                    split's image folder"
                            .into())
                    }
                    (None | Some("official"), Some(_)) => {
                        return Err("key `dataset.images`: only read with image_layout = \
                                    \"flat\" (the official layout is images/<split>/<pid>/)"
                            .into())
                    }
                    (Some(other), _) => {
                        return Err(format!(
                            "key `dataset.image_layout`: unknown layout `{other}` (official, flat)"
                        ))
                    }
                };
                Benchmark::Scienceqa {
                    path,
                    split,
                    prompt_format,
                    images,
                    calibrate_on_evaluated_split: t.calibrate_on_evaluated_split,
                }
            }
            DatasetKind::Vqa => {
                unused("calibrate_on_evaluated_split", t.calibrate_on_evaluated_split)?;
                unused("path", t.path.is_some())?;
                unused("split", t.split.is_some())?;
                unused("prompt_format", t.prompt_format.is_some())?;
                unused("image_layout", t.image_layout.is_some())?;
                let (Some(questions), Some(images)) = (t.questions, t.images) else {
                    return Err("keys `dataset.questions` and `dataset.images` are required for \
                                kind = \"vqa\""
                        .into());
                };
                Benchmark::Vqa { questions, images, answers: t.answers }
            }
        };
        Ok(DatasetConfig {
            benchmark,
            limit: t.limit,
            template: t.template,
            batch_size: t.batch_size,
            max_new_tokens: t.max_new_tokens,
        })
    }
}

impl DatasetKind {
    fn name(self) -> &'static str {
        match self {
            DatasetKind::EasyVqa => "easy_vqa",
            DatasetKind::Scienceqa => "scienceqa",
            DatasetKind::Vqa => "vqa",
        }
    }
}

impl From<DatasetConfig> for DatasetTable {
    fn from(d: DatasetConfig) -> Self {
        let mut t = DatasetTable {
            kind: DatasetKind::EasyVqa,
            path: None,
            limit: d.limit,
            template: d.template,
            batch_size: d.batch_size,
            split: None,
            prompt_format: None,
            image_layout: None,
            questions: None,
            answers: None,
            images: None,
            max_new_tokens: d.max_new_tokens,
            calibrate_on_evaluated_split: false,
        };
        match d.benchmark {
            Benchmark::EasyVqa { path, validation } => {
                t.path = path;
                t.split = validation.then(|| "validation".to_string());
            }
            Benchmark::Scienceqa {
                path,
                split,
                prompt_format,
                images,
                calibrate_on_evaluated_split,
            } => {
                t.kind = DatasetKind::Scienceqa;
                t.calibrate_on_evaluated_split = calibrate_on_evaluated_split;
                t.path = Some(path);
                t.split = split.map(|s| s.name().to_string());
                t.prompt_format = prompt_format.map(|f| f.name().to_string());
                match images {
                    None => {}
                    Some(SqaImages::Official) => t.image_layout = Some("official".into()),
                    Some(SqaImages::Flat(dir)) => {
                        t.image_layout = Some("flat".into());
                        t.images = Some(dir);
                    }
                }
            }
            Benchmark::Vqa { questions, images, answers } => {
                t.kind = DatasetKind::Vqa;
                t.questions = Some(questions);
                t.images = Some(images);
                t.answers = answers;
            }
        }
        t
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CalibrationConfig {
    /// Vision-language pairs drawn (seeded) from the training split (the paper: 64).
    #[serde(default = "default_calib_samples")]
    pub samples: NonZeroUsize,
    /// Run with fewer pairs when the split has fewer than `samples` (each cell's manifest records
    /// how many were used); without it that is an error. (Left out of the cell record when off,
    /// so ids of earlier runs stay.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_fewer: bool,
}

fn default_calib_samples() -> NonZeroUsize {
    NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN)
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self { samples: default_calib_samples(), allow_fewer: false }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GridConfig {
    pub models: Vec<String>,
    /// Bit settings like "W4A4", "W6A6", "W8A8", "W4A16" (16 = float).
    pub bits: Vec<Bits>,
    pub methods: Vec<String>,
    /// Also evaluate each model in float (the reference for KL / agreement).
    #[serde(default = "default_true")]
    pub include_float: bool,
    /// Calibration seeds: every quantized cell runs once per seed (a seed draws the calibration
    /// pairs and seeds libtorch). Default: `experiment.seed` alone. Tables give the mean and the
    /// standard deviation over seeds, and the paired tests average each question over them.
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// Cells of the cross product left out, each with its reason (e.g. the scaling series, where
    /// VEO on the largest models would take hours): the dry run and the report list them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<SkipRule>,
}

/// `[[grid.skip]]`: these methods are not run on this model, and why.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SkipRule {
    pub model: String,
    pub methods: Vec<String>,
    pub reason: String,
}

impl GridConfig {
    /// The rule that leaves out `method` on `model`, if any.
    pub fn skipped(&self, model: &str, method: &str) -> Option<&SkipRule> {
        self.skip.iter().find(|r| r.model == model && r.methods.iter().any(|m| m == method))
    }
}

impl GridConfig {
    /// The calibration seeds of the quantized cells.
    pub fn seeds(&self, experiment_seed: u64) -> Vec<u64> {
        if self.seeds.is_empty() {
            vec![experiment_seed]
        } else {
            self.seeds.clone()
        }
    }
}

fn default_true() -> bool {
    true
}

/// A figure a run can draw (from its tables).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    /// Grouped bars: accuracy per method, one group per bit width (Table 1).
    AccuracyByMethod,
    /// Accuracy against the methods' `sweep` values, one line per bit width (Fig. 3b).
    AccuracyVsSweep,
    /// DED against the dependency entropy per calibration sample (Fig. 2).
    DedVsEntropy,
    /// Accuracy and search cost against the maximum block depth (Fig. 3a).
    DepthTradeoff,
    /// Accuracy by bits × method (the sensitivity map).
    SensitivityHeatmap,
    /// Search time against the calibration set's forward FLOPs across the grid's models, with
    /// the cost model fitted per strategy and extrapolated to LLaVA-1.5-7B/13B (issue #21;
    /// also writes `tables/scaling*.csv`).
    CostScaling,
}

impl Figure {
    pub fn name(self) -> &'static str {
        match self {
            Figure::AccuracyByMethod => "accuracy_by_method",
            Figure::AccuracyVsSweep => "accuracy_vs_sweep",
            Figure::DedVsEntropy => "ded_vs_entropy",
            Figure::DepthTradeoff => "depth_tradeoff",
            Figure::SensitivityHeatmap => "sensitivity_heatmap",
            Figure::CostScaling => "cost_scaling",
        }
    }
}

/// Which tables and figures the run writes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Outputs {
    /// Paper tables to compare against (file names under `paper/`), e.g. "table1_components".
    #[serde(default)]
    pub paper: Vec<String>,
    #[serde(default)]
    pub figures: Vec<Figure>,
    /// A controlled comparison: rows in order, each naming the row it differs from and the one
    /// change between them. `tables/comparisons.csv` and `report.md` give each row's mean ± std
    /// over seeds and a paired test against its `vs` row (per model and bit width).
    #[serde(default)]
    pub rows: Vec<ComparisonRow>,
}

/// One row of a controlled comparison.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComparisonRow {
    /// A method of the grid.
    pub method: String,
    /// The method this row differs from by exactly `change` (absent for the first row).
    #[serde(default)]
    pub vs: Option<String>,
    /// What differs from `vs`, in words.
    #[serde(default)]
    pub change: String,
}

/// Parses TOML `text` (from the file `path`) into `T`. An error is one line naming the file, the
/// key it is about and the position: `f.toml: key `grid.bits[0]`: line 38, column 8: …`.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let f = path.display();
    let at = |e: &toml::de::Error| match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {}", e.message().trim())
        }
        None => e.message().trim().to_string(),
    };
    let de = toml::Deserializer::parse(text).map_err(|e| anyhow::anyhow!("{f}: {}", at(&e)))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = at(e.inner()).replace('\n', " ");
        // Messages of this crate's own checks name their key already.
        let names_key = inner.contains("key `");
        if key == "." || names_key {
            anyhow::anyhow!("{f}: {inner}")
        } else {
            anyhow::anyhow!("{f}: key `{key}`: {inner}")
        }
    })
}

/// The commands whose configs this binary reads, told apart by their top-level tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigKind {
    /// `[experiment]` + `[grid]`: `experiments CONFIG`.
    Experiment,
    /// `[bench]`: `experiments bench CONFIG`.
    Bench,
    /// `out` + `[arch]` + `[train]`, or `base` + `out` + `[outliers]` + `[finetune]` (the
    /// trained-outlier variant): `experiments train-tiny CONFIG`.
    TrainTiny,
}

impl ConfigKind {
    fn of(text: &str) -> Option<ConfigKind> {
        let t = text.parse::<toml::Table>().ok()?;
        if t.contains_key("experiment") {
            Some(ConfigKind::Experiment)
        } else if t.contains_key("bench") {
            Some(ConfigKind::Bench)
        } else if (t.contains_key("arch") && t.contains_key("train")) || t.contains_key("finetune")
        {
            Some(ConfigKind::TrainTiny)
        } else {
            None
        }
    }

    fn command(self, file: &Path) -> String {
        let f = file.display();
        match self {
            ConfigKind::Experiment => format!("experiments {f}"),
            ConfigKind::Bench => format!("experiments bench {f}"),
            ConfigKind::TrainTiny => format!("experiments train-tiny {f}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            ConfigKind::Experiment => "an experiment",
            ConfigKind::Bench => "a bench",
            ConfigKind::TrainTiny => "a train-tiny",
        }
    }

    /// Refuses `text` when it is recognisably the config of another command, saying which.
    pub fn expect(self, text: &str, file: &Path) -> Result<()> {
        match ConfigKind::of(text) {
            Some(other) if other != self => bail!(
                "{}: this is {} config, not {} config: run `{}`",
                file.display(),
                other.name(),
                self.name(),
                other.command(file)
            ),
            _ => Ok(()),
        }
    }
}

pub fn load(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text, path)
}

/// Parses and validates config text; `path` names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Config> {
    ConfigKind::Experiment.expect(text, path)?;
    let mut cfg: Config = parse_toml(text, path)?;
    cfg.file = path.to_path_buf();
    cfg.text = text.to_string();
    validate(&cfg)?;
    Ok(cfg)
}

/// The rules that span fields (or reach into types of the other crates).
fn validate(cfg: &Config) -> Result<()> {
    let f = cfg.file.display();
    cfg.experiment.check(&cfg.file, "experiment")?;
    let mut names = std::collections::BTreeSet::new();
    for m in &cfg.models {
        if !names.insert(m.name.as_str()) {
            bail!("{f}: key `models`: model `{}` is defined twice", m.name);
        }
        if let Some(o) = &m.outliers {
            if o.channels == 0 || !(o.scale.is_finite() && o.scale > 0.0) {
                bail!(
                    "{f}: key `models.outliers` of `{}`: channels and scale must be positive (and finite)",
                    m.name
                );
            }
        }
        if let Some(o) = &m.shifted_outliers {
            if let Err(e) = o.validate() {
                bail!("{f}: key `models.shifted_outliers` of `{}`: {e}", m.name);
            }
        }
    }
    if cfg.grid.models.is_empty() || cfg.grid.bits.is_empty() || cfg.grid.methods.is_empty() {
        bail!("{f}: key `grid`: models, bits and methods must each name at least one entry (the grid is empty)");
    }
    let labels: Vec<String> = cfg.grid.bits.iter().map(|b| b.label()).collect();
    for (key, names) in [
        ("grid.models", cfg.grid.models.clone()),
        ("grid.bits", labels),
        ("grid.methods", cfg.grid.methods.clone()),
        ("methods", cfg.methods.iter().map(|m| m.name.clone()).collect()),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = names.iter().find(|n| !seen.insert(n.as_str())) {
            bail!("{f}: key `{key}`: `{twice}` is listed twice (the first would silently win)");
        }
    }
    let seeds: Vec<String> = cfg.grid.seeds.iter().map(u64::to_string).collect();
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = seeds.iter().find(|n| !seen.insert(n.as_str())) {
        bail!("{f}: key `grid.seeds`: `{twice}` is listed twice");
    }
    for (i, row) in cfg.outputs.rows.iter().enumerate() {
        for (key, m) in [("method", Some(&row.method)), ("vs", row.vs.as_ref())] {
            if let Some(m) = m {
                if !cfg.grid.methods.contains(m) {
                    bail!("{f}: key `outputs.rows[{i}].{key}`: `{m}` is not a method of the grid");
                }
            }
        }
        if row.vs.is_some() && row.change.trim().is_empty() {
            bail!("{f}: key `outputs.rows[{i}].change`: say what differs from `vs`");
        }
    }
    for (i, m) in cfg.methods.iter().enumerate() {
        m.strategy
            .check()
            .map_err(|e| anyhow::anyhow!("{f}: key `methods[{i}].strategy` (`{}`): {e}", m.name))?;
        if let Some(sweep) = &m.sweep {
            if !sweep.value.is_finite() {
                bail!("{f}: key `methods[{i}].sweep.value` (`{}`): must be finite", m.name);
            }
        }
    }
    for (i, rule) in cfg.grid.skip.iter().enumerate() {
        if !cfg.grid.models.contains(&rule.model) {
            bail!("{f}: key `grid.skip[{i}].model`: `{}` is not a model of the grid", rule.model);
        }
        if let Some(m) = rule.methods.iter().find(|m| !cfg.grid.methods.contains(m)) {
            bail!("{f}: key `grid.skip[{i}].methods`: `{m}` is not a method of the grid");
        }
        if rule.reason.trim().is_empty() {
            bail!("{f}: key `grid.skip[{i}].reason`: say why these cells are left out");
        }
    }
    for m in &cfg.grid.models {
        if !cfg.models.iter().any(|e| &e.name == m) {
            bail!("{f}: key `grid.models`: unknown model `{m}` (define it under [[models]])");
        }
    }
    if cfg.quant.language_act.is_static_per_token() {
        bail!("{f}: key `quant.language_act`: static per-token ranges need a fixed sequence length; use range = \"dynamic\" for per-token language activations");
    }
    for m in &cfg.grid.methods {
        let Some(spec) = resolve_method(cfg, m) else {
            bail!(
                "{f}: key `grid.methods`: unknown method `{m}` (presets: {}; or define it under [[methods]])",
                PRESETS.join(", ")
            );
        };
        let act = spec.language_act.unwrap_or(cfg.quant.language_act);
        if act.is_static_per_token() && !spec.dynamic_activations {
            bail!("{f}: method `{m}`: static per-token language activations need a fixed sequence length; use range = \"dynamic\"");
        }
        if let WeightFormat::Awq(a) = spec.weights {
            if a.grid < 2 || a.clip_steps < 2 {
                bail!("{f}: method `{m}`: awq needs grid ≥ 2 and clip_steps ≥ 2");
            }
        }
        if let Err(e) = spec.weights.validate() {
            bail!("{f}: method `{m}`: {e}");
        }
        if let WeightFormat::Gptq(g) = spec.weights {
            if g.act_order && !g.static_groups && cfg.quant.weight_group > 0 {
                bail!(
                    "{f}: method `{m}`: gptq act_order with weight groups (quant.weight_group = {}) needs static_groups = true",
                    cfg.quant.weight_group
                );
            }
        }
    }
    let q = &cfg.quant;
    if q.weight_group < 0 || q.nf4_block <= 0 {
        bail!("{f}: key `quant.weight_group`/`quant.nf4_block`: must be non-negative / positive");
    }
    for o in &cfg.outputs.paper {
        if !paper_dir(cfg).join(format!("{o}.csv")).is_file() {
            bail!("{f}: key `outputs.paper`: no paper/{o}.csv");
        }
    }
    Ok(())
}

/// Checks the paths a run reads (dataset, models) before anything runs; separate from [`load`]
/// so that configs for data this machine lacks still parse, resolve and dry-run.
pub fn check_paths(cfg: &Config) -> Result<()> {
    let f = cfg.file.display();
    for (key, p) in cfg.dataset.benchmark.paths() {
        if !p.exists() {
            bail!("{f}: key `dataset.{key}`: {} does not exist", p.display());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(text: &str) -> Result<DatasetConfig, String> {
        #[derive(Deserialize)]
        struct Wrap {
            dataset: DatasetConfig,
        }
        toml::from_str::<Wrap>(text).map(|w| w.dataset).map_err(|e| e.to_string())
    }

    #[test]
    fn each_dataset_kind_takes_only_its_own_keys() {
        let sqa = dataset(
            "[dataset]\nkind = \"scienceqa\"\npath = \"x\"\nsplit = \"val\"\nprompt_format = \"CQM-A\"",
        )
        .expect("scienceqa");
        assert_eq!(
            sqa.benchmark,
            Benchmark::Scienceqa {
                path: "x".into(),
                split: Some(Split::Val),
                prompt_format: Some(PromptFormat::CqmA),
                images: None,
                calibrate_on_evaluated_split: false,
            }
        );
        for (text, wanted) in [
            ("kind = \"easy_vqa\"\nsplit = \"train\"", "not an easy-VQA split"),
            (
                "kind = \"vqa\"\nquestions = \"q\"\nimages = \"i\"\npath = \"p\"",
                "key `dataset.path`",
            ),
            ("kind = \"vqa\"\nquestions = \"q\"", "`dataset.images` are required"),
            ("kind = \"scienceqa\"", "key `dataset.path`"),
            ("kind = \"scienceqa\"\npath = \"p\"\nsplit = \"dev\"", "unknown ScienceQA split"),
            ("kind = \"scienceqa\"\npath = \"p\"\nimages = \"i\"", "only read with image_layout"),
            (
                "kind = \"scienceqa\"\npath = \"p\"\nimage_layout = \"flat\"",
                "needs the split's image folder",
            ),
            ("kind = \"easy_vqa\"\nbatch_size = 0", "nonzero"),
            ("kind = \"easy_vqa\"\nlimitt = 3", "unknown field `limitt`"),
        ] {
            let err = dataset(&format!("[dataset]\n{text}")).expect_err(text);
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }

    #[test]
    fn a_dataset_serializes_to_the_table_it_was_read_from() {
        for text in [
            "kind = \"easy_vqa\"\nlimit = 10",
            "kind = \"scienceqa\"\npath = \"p\"\nimage_layout = \"flat\"\nimages = \"i\"",
            "kind = \"vqa\"\nquestions = \"q\"\nimages = \"i\"\nanswers = \"a\"\nmax_new_tokens = 3",
        ] {
            let d = dataset(&format!("[dataset]\n{text}")).expect(text);
            let table: toml::Value = toml::from_str(text).expect("toml");
            let mut written = serde_json::to_value(&d).expect("json");
            // Absent keys are written as null (and defaults filled in): compare what was given.
            let given = serde_json::to_value(&table).expect("json");
            for (k, v) in given.as_object().expect("table") {
                assert_eq!(written[k], *v, "{text}: {k}");
            }
            written.as_object_mut().expect("object").retain(|_, v| !v.is_null());
            let again: DatasetConfig = serde_json::from_value(written).expect("reparse");
            assert_eq!(again, d);
        }
    }
}
