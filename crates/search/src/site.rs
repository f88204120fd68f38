//! Quantization sites: one activation tensor feeding one or more linears. q/k/v share a site
//! (fused kernels quantize their common input once), as do gate/up; each site's rounding
//! function is its clipping range. Sites are listed in execution order, grouped by block
//! (transformer layer or projector). Each model lists its own ([`crate::model::SearchModel::sites`]).

use qvlm_core::layer_id::{LayerId, Slot, Tower};
use serde::{Deserialize, Serialize};

/// A block of the pipeline: one transformer layer or the projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "index")]
pub enum Block {
    Vision(usize),
    Projector,
    Language(usize),
}

impl Block {
    pub fn tower(self) -> Tower {
        match self {
            Block::Vision(_) => Tower::Vision,
            Block::Projector => Tower::Projector,
            Block::Language(_) => Tower::Language,
        }
    }
}

impl std::fmt::Display for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Block::Vision(i) => write!(f, "vision.{i}"),
            Block::Projector => write!(f, "projector"),
            Block::Language(i) => write!(f, "language.{i}"),
        }
    }
}

/// One activation tensor and the linears that consume it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    /// The first consumer; the site's name.
    pub id: LayerId,
    pub consumers: Vec<LayerId>,
    pub block: Block,
    pub width: i64,
}

impl Site {
    pub fn tower(&self) -> Tower {
        self.id.tower
    }
}

/// Where a per-input-channel scale `s` of a site (AWQ, SmoothQuant: the consumers hold `W · s`,
/// their input is `x / s`) is folded when a model is packed, as AutoAWQ's `apply_scale` does
/// (`scale_ln_fcs`, `scale_fc_fc`,
/// <https://github.com/casper-hansen/AutoAWQ/blob/88e4c76b20755db275574e6a03c83c84ba3bece5/awq/quantize/scale.py#L62-L117>).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldTarget {
    /// The norm before the block's attention (`second = false`) or its MLP (`true`): its gain
    /// (and a LayerNorm's bias) divided by `s`.
    Norm { second: bool },
    /// The rows of the block's linear in this slot: `v_proj` before `o_proj` / `out_proj`
    /// (attention is linear in the values), `up_proj` before `down_proj` (SwiGLU is
    /// `act(gate) · up`).
    Rows(Slot),
}

impl Site {
    /// What this site's input scale folds into; `None` where no linear operation produces the
    /// input: after a GELU (CLIP's and the ViTs' fc2), on the residual stream (the projector's
    /// first linear), after the projector's GELU.
    pub fn fold_target(&self) -> Option<FoldTarget> {
        use Slot::*;
        let slots: Vec<Slot> = self.consumers.iter().map(|c| c.slot).collect();
        let towers = matches!(self.tower(), Tower::Language | Tower::Vision);
        match slots.as_slice() {
            [QProj, KProj, VProj] | [Qkv] if towers => Some(FoldTarget::Norm { second: false }),
            [GateProj, UpProj] | [Fc1] if towers => Some(FoldTarget::Norm { second: true }),
            [OProj] | [OutProj] if towers => Some(FoldTarget::Rows(VProj)),
            [DownProj] if towers => Some(FoldTarget::Rows(UpProj)),
            _ => None,
        }
    }
}
