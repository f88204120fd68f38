//! Quantization sites: one activation tensor feeding one or more linears. q/k/v share a site
//! (fused kernels quantize their common input once), as do gate/up; each site's rounding
//! function is its clipping range. Sites are listed in execution order, grouped by block
//! (transformer layer or projector). Each model lists its own ([`crate::model::SearchModel::sites`]).

use qvlm_core::layer_id::{LayerId, Tower};
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
