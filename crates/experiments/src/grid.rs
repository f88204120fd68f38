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
    out
}
