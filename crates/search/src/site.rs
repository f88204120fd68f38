//! Quantization sites: one activation tensor feeding one or more linears. q/k/v share a site
//! (fused kernels quantize their common input once), as do gate/up; each site's rounding
//! function is its clipping range. Sites are listed in execution order, grouped by block
//! (transformer layer or projector).

use qvlm_core::layer_id::{LayerId, Slot, Tower};
use qvlm_core::model::llava::Llava;
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

/// Sites of a model in execution order.
pub fn sites(model: &Llava) -> Vec<Site> {
    let mut out = Vec::new();
    let mk = |block: Block, slots: &[Slot], width: i64| {
        let tower = block.tower();
        let index = match block {
            Block::Vision(i) | Block::Language(i) => i as u32,
            Block::Projector => 0,
        };
        let consumers: Vec<LayerId> =
            slots.iter().map(|&s| LayerId::new(tower, index, s)).collect();
        Site { id: consumers[0], consumers, block, width }
    };
    let v = &model.cfg.vision;
    for i in 0..model.vision_tower.used_layers().len() {
        let b = Block::Vision(i);
        out.push(mk(b, &[Slot::QProj, Slot::KProj, Slot::VProj], v.hidden_size));
        out.push(mk(b, &[Slot::OutProj], v.hidden_size));
        out.push(mk(b, &[Slot::Fc1], v.hidden_size));
        out.push(mk(b, &[Slot::Fc2], v.intermediate_size));
    }
    out.push(mk(Block::Projector, &[Slot::Linear1], v.hidden_size));
    if model.projector.linear_2.is_some() {
        out.push(mk(Block::Projector, &[Slot::Linear2], model.cfg.text.hidden_size));
    }
    let t = &model.cfg.text;
    for i in 0..model.language_model.layers.len() {
        let b = Block::Language(i);
        out.push(mk(b, &[Slot::QProj, Slot::KProj, Slot::VProj], t.hidden_size));
        out.push(mk(b, &[Slot::OProj], t.num_attention_heads * t.head_dim));
        out.push(mk(b, &[Slot::GateProj, Slot::UpProj], t.hidden_size));
        out.push(mk(b, &[Slot::DownProj], t.intermediate_size));
    }
    out
}

/// Blocks in execution order.
pub fn blocks(model: &Llava) -> Vec<Block> {
    let mut out: Vec<Block> =
        (0..model.vision_tower.used_layers().len()).map(Block::Vision).collect();
    out.push(Block::Projector);
    out.extend((0..model.language_model.layers.len()).map(Block::Language));
    out
}
