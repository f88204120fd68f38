//! What a quantizer does, as data: grid, granularity, static or dynamic ranges, clipping.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::quant::uniform::Grid;

/// Which elements share a scale. Written `{ kind = "per_token" }`, `{ kind = "per_group", size =
/// 64 }`; other keys and a group size below 1 are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", try_from = "GranularityTable")]
pub enum Granularity {
    PerTensor,
    /// One range per input channel (last axis), shared by all tokens (RPTQ-style, LLM side).
    PerChannel,
    /// One range per token (row). Static per-token ranges are per token *position* and need a
    /// fixed sequence length (the vision tower's; Outlier-Suppression-style, vision side).
    PerToken,
    /// Groups of `size` consecutive channels; per token when dynamic.
    PerGroup {
        size: i64,
    },
}

/// [`Granularity`] as written: struct variants, so that stray keys are refused (serde lets an
/// internally tagged unit variant ignore them).
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
#[allow(clippy::enum_variant_names)] // the names are the kinds users write (`per_token`, …)
enum GranularityTable {
    PerTensor {},
    PerChannel {},
    PerToken {},
    PerGroup { size: i64 },
}

impl TryFrom<GranularityTable> for Granularity {
    type Error = String;

    fn try_from(t: GranularityTable) -> std::result::Result<Self, String> {
        Ok(match t {
            GranularityTable::PerTensor {} => Granularity::PerTensor,
            GranularityTable::PerChannel {} => Granularity::PerChannel,
            GranularityTable::PerToken {} => Granularity::PerToken,
            GranularityTable::PerGroup { size } if size >= 1 => Granularity::PerGroup { size },
            GranularityTable::PerGroup { size } => {
                return Err(format!("per_group size {size} must be at least 1"))
            }
        })
    }
}

/// Where ranges come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RangeMode {
    /// Calibrated once and stored ("stored rounding parameters").
    Static,
    /// Measured on each input at run time.
    Dynamic,
}

/// How the observed range is narrowed before quantization.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Clip {
    /// The full observed range.
    MinMax,
    /// min and max multiplied by a ratio in (0, 1] (the released Q-VLM code's shrink factors).
    Ratio(f64),
    /// The p and 1−p quantiles of the observed distribution, p in (0.5, 1] (the paper's PACT-style
    /// percentile).
    Percentile(f64),
}

impl Clip {
    pub fn validate(self) -> Result<Self> {
        match self {
            Clip::Ratio(r) if !(r > 0.0 && r <= 1.0) => {
                Err(Error::Invalid(format!("clip ratio {r} is not in (0, 1]")))
            }
            Clip::Percentile(p) if !(p > 0.5 && p <= 1.0) => {
                Err(Error::Invalid(format!("clip percentile {p} is not in (0.5, 1]")))
            }
            ok => Ok(ok),
        }
    }
}

/// An activation quantizer's specification.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActSpec {
    pub grid: Grid,
    pub granularity: Granularity,
    pub range: RangeMode,
    pub clip: Clip,
}

/// A weight quantizer's specification (weights `[out, in]`: per channel = per output row, groups
/// along the input dimension).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum WeightSpec {
    /// Round-to-nearest uniform with min–max ranges.
    Rtn { grid: Grid, granularity: Granularity },
    /// QLoRA's NormalFloat-4 with block-wise absmax (and optional double quantization).
    Nf4 { block: i64, double_quant: bool },
}

impl WeightSpec {
    pub fn bits(&self) -> u8 {
        match self {
            WeightSpec::Rtn { grid, .. } => grid.bits,
            WeightSpec::Nf4 { .. } => 4,
        }
    }
}

/// Which orthogonal matrices a QuaRot-style rotation uses ([`crate::model::rotation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationKind {
    /// Randomized Hadamard (QuaRot's choice): entries ±1/√n.
    Hadamard,
    /// Haar-random orthogonal (QR of a Gaussian, signs fixed).
    RandomOrthogonal,
}

/// A rotation of the language model; `seed` draws the random signs or the Gaussian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationSpec {
    pub kind: RotationKind,
    #[serde(default)]
    pub seed: u64,
}
