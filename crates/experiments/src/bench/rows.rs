//! What a bench run measured: one row per (shape, scheme), what was not run, and the run's
//! settings and machine. The report turns these into the table and the figure.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::config::BenchConfig;
use super::machine::Machine;
use super::measure::Split;
use super::scheme::Scheme;

/// One measured (or per-layer extrapolated) configuration of one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The shape's name (`llava-7b`).
    pub shape: String,
    /// The shape, with `(built/real layers)` when built with fewer layers than the shape has.
    pub model: String,
    pub scheme: Scheme,
    /// The scheme's table label (`W4A16 g128`).
    pub label: String,
    /// The decoder linears' code path: `dense`, a [`Kernel`] name, or a mix with counts.
    pub kernel: String,
    /// Decoder layers the row stands for.
    pub layers: i64,
    /// Decoder layers of the model actually built (fewer: the row is extrapolated per layer).
    pub layers_built: i64,
    /// Every weight of the model (exact: packed storage `bytes()`, float `numel · size`).
    pub weight_bytes: i64,
    /// The decoder linears' share of `weight_bytes`.
    pub decoder_linear_bytes: i64,
    /// Weights one decode step reads: decoder linears and norms, final norm, `lm_head`, one
    /// embedding row.
    pub decode_bytes_per_token: i64,
    /// Growth of `VmRSS` from before the model was built to after its measurement.
    pub rss_delta_bytes: Option<i64>,
    /// Positions of the prefill (prompt tokens + image features).
    pub prefill_positions: i64,
    pub prefill: Split,
    /// Mean of the timed decode steps.
    pub decode: Split,
    /// The fastest timed decode step (total).
    pub decode_min_ms: f64,
    /// Mean of the timed passes of the decoder's linears alone (`measure`'s module doc),
    /// extrapolated per layer like `decode`.
    pub decode_linears_ms: f64,
    /// Mean of the same decode steps through the fused decode path (`measure`'s module doc),
    /// extrapolated per layer like `decode`; `None` off the CPU.
    pub decode_fused: Option<Split>,
    /// The largest difference between a fused step's final hidden state and the libtorch step's,
    /// relative to the latter's largest |value|.
    pub fused_max_rel_diff: Option<f64>,
    /// Packed weights (any part) on the dequantized fallback.
    pub fallback_linears: usize,
    /// The memory roof (streaming read, bytes/s) measured just before and just after the row.
    pub roof_before_bytes_per_s: f64,
    pub roof_after_bytes_per_s: f64,
    /// Decode time (total ms) of this scheme in each round of the run (`measure.rounds`: the
    /// whole model family built and measured again, minutes later); the row's other columns are
    /// those of the round with the median decode time. One entry for a row outside the rounds.
    pub round_decode_ms: Vec<f64>,
    /// Per round, the fastest 16-bit row's decode time of that round ÷ this row's (a paired
    /// ratio: both measured in the same round, so a machine whose bandwidth drifts between rounds
    /// moves both); empty where the model has no 16-bit row.
    pub round_speedup_16bit: Vec<f64>,
    /// The same per-round paired ratio for the fused decode path: the round's fastest 16-bit
    /// fused step ÷ this row's fused step.
    pub round_fused_speedup_16bit: Vec<f64>,
    /// Mean of the step-paired 16-bit partner's fused steps (`measure`'s module doc), each right
    /// after one of this row's fused steps, extrapolated per layer like `decode`; `None` without
    /// a partner.
    pub partner_fused: Option<Split>,
    /// Per round, the partner's mean fused step ÷ this row's (the steps interleaved, so both met
    /// the same bandwidth); empty without a partner.
    pub round_fused_speedup_stepped: Vec<f64>,
    /// The median over the fused steps of each step's weight traffic (`decode_bytes_per_token`
    /// over its time, extrapolated like `decode`) ÷ the roof read right after it, in percent
    /// (`measure.roof_each_step_mib`); `None` without those reads.
    pub fused_stepped_roof_pct: Option<f64>,
}

impl Row {
    pub fn extrapolated(&self) -> bool {
        self.layers_built < self.layers
    }
}

/// A shape (or part of one) that was not run, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub model: String,
    pub schemes: String,
    pub reason: String,
}

/// Everything besides the rows that the table needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub config: BenchConfig,
    pub config_file: PathBuf,
    pub machine: Machine,
    pub skipped: Vec<Skipped>,
    /// Wall time of the measurements (the report is built after).
    pub wall_seconds: f64,
}
