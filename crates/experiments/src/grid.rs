//! A config's grid resolved into cells (model × bit-width × method, float references first), each
//! with an id that hashes its resolved settings.

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{resolve_method, CalibrationConfig, Config, DatasetConfig, ModelEntry};
use crate::methods::MethodSpec;
use crate::settings::{Bits, QuantSettings};

/// One resolved cell of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub id: String,
    pub model: ModelEntry,
    pub kind: CellKind,
    pub quant: QuantSettings,
    pub calibration: CalibrationConfig,
    pub dataset: DatasetConfig,
    pub seed: u64,
}

/// What a cell evaluates: the model in float (the reference for KL and agreement), or quantized
/// at some bit widths by a method.
#[derive(Debug, Clone, PartialEq)]
pub enum CellKind {
    Float,
    Quantized { bits: Bits, method: Box<MethodSpec> },
}

impl Cell {
    /// `fp` for the float reference, else the method's name (as tables name it).
    pub fn method_name(&self) -> &str {
        match &self.kind {
            CellKind::Float => "fp",
            CellKind::Quantized { method, .. } => &method.name,
        }
    }

    /// `FP` for the float reference, else `W4A4` etc.
    pub fn bits_label(&self) -> String {
        match &self.kind {
            CellKind::Float => "FP".into(),
            CellKind::Quantized { bits, .. } => bits.label(),
        }
    }

    pub fn bits(&self) -> Option<Bits> {
        match &self.kind {
            CellKind::Float => None,
            CellKind::Quantized { bits, .. } => Some(*bits),
        }
    }

    pub fn method(&self) -> Option<&MethodSpec> {
        match &self.kind {
            CellKind::Float => None,
            CellKind::Quantized { method, .. } => Some(method),
        }
    }

    /// The cell's activation quantizers per tower and whether an integer kernel can execute
    /// them (`language per_channel static: fake-quant only; vision per_token static: integer
    /// kernel`); `float` when no activation is quantized. Tables print it beside every row.
    pub fn activation_setting(&self) -> String {
        let CellKind::Quantized { bits, method } = &self.kind else { return "float".into() };
        let Ok(scheme) = method.scheme(*bits, &self.quant) else { return "invalid scheme".into() };
        crate::methods::activation_setting(&scheme)
    }

    /// `<model> <bits> <method>`, for messages.
    pub fn title(&self) -> String {
        format!("{} {} {}", self.model.name, self.bits_label(), self.method_name())
    }

    fn record<'a>(&'a self, id: &'a str) -> CellRecord<'a> {
        let (bits, spec) = match &self.kind {
            CellKind::Float => (None, None),
            CellKind::Quantized { bits, method } => {
                (Some(BitsRecord { w: bits.w, a: bits.a }), Some(method.as_ref()))
            }
        };
        CellRecord {
            id,
            model: &self.model,
            bits,
            method: self.method_name(),
            spec,
            quant: &self.quant,
            calibration: &self.calibration,
            dataset: &self.dataset,
            seed: self.seed,
        }
    }
}

/// How a cell is written to `config.json` and hashed into its id. The shape is frozen (it is the
/// one cells had before `CellKind`), so that the ids of finished cells stay valid: change it only
/// together with every results folder.
#[derive(Serialize)]
struct CellRecord<'a> {
    id: &'a str,
    model: &'a ModelEntry,
    bits: Option<BitsRecord>,
    method: &'a str,
    spec: Option<&'a MethodSpec>,
    quant: &'a QuantSettings,
    calibration: &'a CalibrationConfig,
    dataset: &'a DatasetConfig,
    seed: u64,
}

#[derive(Serialize)]
struct BitsRecord {
    w: u8,
    a: u8,
}

impl Serialize for Cell {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.record(&self.id).serialize(s)
    }
}

/// The first 12 hex digits of the SHA-256 of `value`'s JSON.
pub fn short_hash(value: &impl Serialize) -> Result<String> {
    let json = serde_json::to_string(value)?;
    let digest = Sha256::digest(json.as_bytes());
    Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
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
        let mut push = |kind: CellKind, seed: u64| -> Result<()> {
            let mut cell = Cell {
                id: String::new(),
                model: model.clone(),
                kind,
                quant: cfg.quant.clone(),
                calibration: cfg.calibration.clone(),
                dataset: cfg.dataset.clone(),
                seed,
            };
            cell.id = short_hash(&cell.record(""))?;
            out.push(cell);
            Ok(())
        };
        if cfg.grid.include_float {
            // The float reference draws no calibration set: one cell, at the experiment's seed.
            push(CellKind::Float, cfg.experiment.seed)?;
        }
        for &bits in &cfg.grid.bits {
            for m in &cfg.grid.methods {
                if cfg.grid.skipped(model_name, m).is_some() {
                    continue;
                }
                let method = resolve_method(cfg, m).context("method checked in validate")?;
                for seed in cfg.grid.seeds(cfg.experiment.seed) {
                    push(CellKind::Quantized { bits, method: Box::new(method.clone()) }, seed)?;
                }
            }
        }
    }
    Ok(out)
}

/// The resolved cells as the dry run prints them.
pub fn plan_text(cfg: &Config, cells: &[Cell]) -> String {
    let mut out = format!(
        "experiment `{}` from {} — {} cells\n",
        cfg.experiment.name,
        cfg.file.display(),
        cells.len()
    );
    for c in cells {
        let strategy = c.method().map_or_else(|| "float".into(), MethodSpec::strategy_name);
        let seed = match c.kind {
            CellKind::Float => String::new(),
            CellKind::Quantized { .. } if cfg.grid.seeds.len() > 1 => format!(" seed {}", c.seed),
            CellKind::Quantized { .. } => String::new(),
        };
        out.push_str(&format!(
            "  {}  {:<22} {:<6} {:<14} {}{seed}\n",
            c.id,
            c.model.name,
            c.bits_label(),
            c.method_name(),
            strategy
        ));
    }
    for r in &cfg.grid.skip {
        out.push_str(&format!(
            "  skipped: {} on {} — {}\n",
            r.methods.join(", "),
            r.model,
            r.reason
        ));
    }
    out
}

/// `--shard I/N`: shard `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let parsed = s.split_once('/').and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => anyhow::bail!(
                "`{s}` is not a shard: write I/N with 0 <= I < N (shard 0/4 is the first of four)"
            ),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The shard of a Slurm array task: `SLURM_ARRAY_TASK_ID` within `SLURM_ARRAY_TASK_COUNT`
    /// (ids 0..count), else within `SLURM_ARRAY_TASK_MIN..=SLURM_ARRAY_TASK_MAX` (step 1).
    /// `None` outside an array task.
    pub fn from_slurm_env() -> Result<Option<Shard>> {
        Self::from_env(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
        let Some(id) = var("SLURM_ARRAY_TASK_ID") else { return Ok(None) };
        let number = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| v.parse::<usize>().with_context(|| format!("{k}={v} is not a number")))
                .transpose()
        };
        let id = id
            .parse::<usize>()
            .with_context(|| format!("SLURM_ARRAY_TASK_ID={id} is not a number"))?;
        if let Some(step) = number("SLURM_ARRAY_TASK_STEP")?.filter(|&s| s != 1) {
            anyhow::bail!("SLURM_ARRAY_TASK_STEP={step}: shards need an array of consecutive ids (or pass --shard I/N)");
        }
        let shard = match (number("SLURM_ARRAY_TASK_MIN")?, number("SLURM_ARRAY_TASK_MAX")?) {
            (Some(min), Some(max)) if min <= id && id <= max => {
                Shard { index: id - min, count: max - min + 1 }
            }
            _ => match number("SLURM_ARRAY_TASK_COUNT")? {
                Some(count) if id < count => Shard { index: id, count },
                _ => anyhow::bail!(
                    "SLURM_ARRAY_TASK_ID={id} without a SLURM_ARRAY_TASK_COUNT above it or SLURM_ARRAY_TASK_MIN/MAX around it: pass --shard I/N"
                ),
            },
        };
        Ok(Some(shard))
    }
}

/// Which of a grid's cells a process runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    All,
    /// The cells at positions `index`, `index + count`, … of the grid's order (round robin: the
    /// shards of one config differ by at most one cell, and every cell is in exactly one).
    Shard(Shard),
    /// These cell ids (`--cell`), as the Slurm array tasks `experiments slurm` writes run them.
    Cells(Vec<String>),
}

impl Selection {
    /// The selected cells, in grid order; an id not in the grid is an error.
    pub fn pick<'a>(&self, cells: &'a [Cell]) -> Result<Vec<&'a Cell>> {
        match self {
            Selection::All => Ok(cells.iter().collect()),
            Selection::Shard(s) => {
                Ok(cells.iter().skip(s.index).step_by(s.count).collect())
            }
            Selection::Cells(ids) => ids
                .iter()
                .map(|id| {
                    cells.iter().find(|c| &c.id == id).with_context(|| {
                        format!("cell `{id}` is not in this config's grid (`--dry-run` lists its cells)")
                    })
                })
                .collect(),
        }
    }

    /// For messages: `all cells`, `shard 1/4`, `cells a, b`.
    pub fn describe(&self) -> String {
        match self {
            Selection::All => "all cells".into(),
            Selection::Shard(s) => format!("shard {s}"),
            Selection::Cells(ids) => format!("cell {}", ids.join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_come_from_the_slurm_array_variables() {
        assert_eq!("1/4".parse::<Shard>().expect("shard"), Shard { index: 1, count: 4 });
        for bad in ["4/4", "1", "a/2", "-1/2", "1/0"] {
            let err = bad.parse::<Shard>().expect_err(bad);
            assert!(err.to_string().contains("I/N"), "{err}");
        }
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(Shard::from_env(env(&[])).expect("none"), None);
        let count = env(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "3")]);
        assert_eq!(Shard::from_env(count).expect("count"), Some(Shard { index: 2, count: 3 }));
        let range = env(&[
            ("SLURM_ARRAY_TASK_ID", "12"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_MAX", "13"),
        ]);
        assert_eq!(Shard::from_env(range).expect("range"), Some(Shard { index: 2, count: 4 }));
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert!(Shard::from_env(stepped).is_err());
        assert!(Shard::from_env(env(&[("SLURM_ARRAY_TASK_ID", "5")])).is_err());
    }

    #[test]
    fn the_shards_of_a_grid_cover_it_once() {
        let text = r#"
[experiment]
name = "shards"
[[models]]
name = "m"
path = "models/tiny-llava"
[dataset]
kind = "easy_vqa"
[grid]
models = ["m"]
bits = ["W4A4", "W8A8"]
methods = ["rtn", "sequential", "cdm"]
"#;
        let cfg = crate::config::parse(text, std::path::Path::new("shards.toml")).expect("config");
        let cells = cells(&cfg).expect("cells");
        assert_eq!(cells.len(), 7, "FP + 2 × 3");
        let mut seen: Vec<&str> = Vec::new();
        for index in 0..3 {
            let picked = Selection::Shard(Shard { index, count: 3 }).pick(&cells).expect("pick");
            assert!((2..=3).contains(&picked.len()));
            seen.extend(picked.iter().map(|c| c.id.as_str()));
        }
        seen.sort_unstable();
        let mut all: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        all.sort_unstable();
        assert_eq!(seen, all);
        let err = Selection::Cells(vec!["nope".into()]).pick(&cells).expect_err("unknown");
        assert!(err.to_string().contains("`nope`"), "{err}");
    }
}
