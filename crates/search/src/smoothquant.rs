//! SmoothQuant (Xiao et al., 2023): a per-input-channel scale `s_j = max|X_j|^α / max|W_j|^(1−α)`
//! migrates activation outliers into the weights (the input is divided by `s`, the consumers'
//! weight columns multiplied by it), as `smooth_ln_fcs_llama_like` computes it:
//! <https://github.com/mit-han-lab/smoothquant/blob/43ded6c9550c63fe26f7d8cfb383c7bb19e52731/smoothquant/smooth.py#L47-L67>
//!
//! Upstream smooths only the inputs that leave a norm (q/k/v and the first MLP layer), where
//! `1/s` folds into the norm's gain; [`smooths`] is that rule for this crate's sites.

use qvlm_core::layer_id::Slot;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{setting, Result};
use crate::site::Site;

/// Migration strength α (upstream's default 0.5).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmoothSettings {
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

fn default_alpha() -> f64 {
    0.5
}

impl Default for SmoothSettings {
    fn default() -> Self {
        Self { alpha: default_alpha() }
    }
}

impl SmoothSettings {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(setting(
                "smoothquant.alpha",
                format!("must be in [0, 1], got {}", self.alpha),
            ));
        }
        Ok(())
    }
}

/// Whether SmoothQuant smooths this site: its input leaves a norm (LLaMA's q/k/v and gate/up,
/// CLIP's q/k/v and fc1, Qwen2-VL's vision qkv and fc1 or gate/up), so `1/s` folds into the
/// norm's gain in a deployment.
pub fn smooths(site: &Site) -> bool {
    matches!(site.id.slot, Slot::QProj | Slot::Qkv | Slot::Fc1 | Slot::GateProj)
}

/// The scale `s` `[in]` of one site from its calibration rows `x` `[N, in]` and its consumers'
/// weights (`[out, in]` each): `max|X_j|^α / max_consumers max_rows |W_ij|^(1−α)`, both terms
/// clamped at 1e-5 as upstream.
pub fn scale(x: &Tensor, weights: &[Tensor], settings: &SmoothSettings) -> Result<Tensor> {
    settings.validate()?;
    let act = x.abs().amax(0, false).to_kind(Kind::Float);
    let mut w_max = Tensor::zeros_like(&act);
    for w in weights {
        w_max = w_max.maximum(&w.abs().amax(0, false).to_kind(Kind::Float).to_device(act.device()));
    }
    let w_max = w_max.clamp_min(1e-5);
    Ok((act.pow_tensor_scalar(settings.alpha) / w_max.pow_tensor_scalar(1.0 - settings.alpha))
        .clamp_min(1e-5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_half_balances_activation_and_weight_ranges() -> Result<()> {
        let x = Tensor::from_slice(&[4.0f32, -1.0, 0.5, 9.0]).reshape([2, 2]);
        let w = Tensor::from_slice(&[1.0f32, 4.0, -9.0, 1.0]).reshape([2, 2]);
        let s = scale(&x, &[w.shallow_clone()], &SmoothSettings::default())?;
        // max|X| = [4, 9], max|W| = [9, 4]: s = sqrt(4/9), sqrt(9/4).
        let want = Tensor::from_slice(&[(4.0f32 / 9.0).sqrt(), 1.5]);
        assert!((s - &want).abs().max().double_value(&[]) < 1e-6);
        // After migration both ranges are sqrt(max|X| · max|W|) = [6, 6].
        let xs = x.abs().amax(0, false) / &want;
        let ws = (w * want.unsqueeze(0)).abs().amax(0, false);
        assert!((xs - ws).abs().max().double_value(&[]) < 1e-5);
        assert!(scale(&x, &[], &SmoothSettings { alpha: 1.5 }).is_err());
        Ok(())
    }
}
