//! Normalisation layers: CLIP's LayerNorm and LLaMA's RMSNorm.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::io::weights::{Init, VarBuilder};

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    /// The canonical name it was loaded under.
    pub path: String,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, size: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[size], Init::Ones)?,
            bias: vb.get("bias", &[size], Init::Zeros)?,
            eps,
            path: vb.path(),
        })
    }

    pub fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{}.weight", self.path), self.weight.shallow_clone()));
        out.push((format!("{}.bias", self.path), self.bias.shallow_clone()));
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = self.weight.size();
        x.layer_norm(size.as_slice(), Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// `w · x / sqrt(mean(x²) + eps)`, computed in f32 and cast back before the weight, as
/// transformers' `LlamaRMSNorm`
/// (<https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/llama/modeling_llama.py#L60-L75>).
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    /// The canonical name it was loaded under.
    pub path: String,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, size: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get("weight", &[size], Init::Ones)?, eps, path: vb.path() })
    }

    pub fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{}.weight", self.path), self.weight.shallow_clone()));
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (x32 * (variance + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}
