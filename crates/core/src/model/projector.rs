//! The multimodal projector: `linear` (LLaVA-v1.3) or `mlp2x_gelu` (LLaVA-1.5 / llava-hf's
//! `LlavaMultiModalProjector`, <https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/llava/modeling_llava.py#L85-L101>).

use tch::Tensor;

use crate::error::Result;
use crate::hook::LinearHook;
use crate::io::config::{Activation, LlavaConfig, ProjectorKind};
use crate::io::weights::VarBuilder;
use crate::layer_id::{LayerId, Slot, Tower};
use crate::model::clip::activate;
use crate::model::linear::Linear;

#[derive(Debug)]
pub struct Projector {
    pub linear_1: Linear,
    /// `None` for the single-linear projector.
    pub linear_2: Option<Linear>,
    act: Activation,
}

impl Projector {
    pub fn load(vb: &VarBuilder, cfg: &LlavaConfig) -> Result<Self> {
        let (v, t) = (cfg.vision.hidden_size, cfg.text.hidden_size);
        let id = |slot| LayerId::new(Tower::Projector, 0, slot);
        let linear_1 =
            Linear::load(&vb.pp("linear_1"), id(Slot::Linear1), v, t, cfg.projector_bias)?;
        let linear_2 = match cfg.projector {
            ProjectorKind::Linear => None,
            ProjectorKind::Mlp2xGelu => {
                Some(Linear::load(&vb.pp("linear_2"), id(Slot::Linear2), t, t, cfg.projector_bias)?)
            }
        };
        Ok(Self { linear_1, linear_2, act: cfg.projector_act })
    }

    pub fn forward(&self, features: &Tensor, hook: &mut dyn LinearHook) -> Tensor {
        let h = self.linear_1.forward(features, hook);
        match &self.linear_2 {
            Some(l2) => l2.forward(&activate(self.act, &h), hook),
            None => h,
        }
    }

    pub fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        for l in self.linears() {
            l.named_tensors(out);
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        std::iter::once(&self.linear_1).chain(self.linear_2.as_ref()).collect()
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        std::iter::once(&mut self.linear_1).chain(self.linear_2.as_mut()).collect()
    }
}
