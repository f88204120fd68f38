//! Planting LLM-like activation outlier channels without changing the model's function.
//!
//! Large LLMs carry a few activation channels far larger than the rest (the reason LLM.int8 and
//! SmoothQuant exist); a tiny model trained briefly has none, so quantization barely hurts it. For
//! every norm that feeds linears — RMSNorm γ → q/k/v and → gate/up in the decoder, LayerNorm γ,β →
//! q/k/v and → fc1 in the vision tower — a few channels of the norm are multiplied by `s` and the
//! matching input columns of the following linears divided by `s`. The float function is unchanged
//! (up to rounding); the activations entering those linears now carry ×s outliers.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::model::linear::{Linear, LinearWeight};
use crate::model::llava::Llava;
use crate::rng::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSpec {
    /// Channels per norm.
    pub channels: usize,
    /// Scale of the planted channels.
    pub scale: f64,
    pub seed: u64,
}

impl Default for OutlierSpec {
    /// The prototype's choice: 4 channels, s = 30.
    fn default() -> Self {
        Self { channels: 4, scale: 30.0, seed: 0 }
    }
}

/// Which channels were planted where (for the run's record).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PlantReport {
    /// `(norm name, channels)` in execution order.
    pub norms: Vec<(String, Vec<i64>)>,
}

fn scale_input_columns(linear: &mut Linear, channels: &Tensor, s: f64) {
    // Planting happens on float models; a packed weight is unpacked first to keep the function.
    if let LinearWeight::Packed(_) = linear.weight {
        linear.weight = LinearWeight::Float(linear.float_weight());
    }
    let LinearWeight::Float(w) = &mut linear.weight else { return };
    let cols = w.index_select(1, channels) / s;
    let _ = w.index_copy_(1, channels, &cols);
}

fn scale_entries(t: &mut Tensor, channels: &Tensor, s: f64) {
    let v = t.index_select(0, channels) * s;
    let _ = t.index_copy_(0, channels, &v);
}

/// Plants outlier channels in place (see the module docs).
pub fn plant_outliers(model: &mut Llava, spec: &OutlierSpec) -> PlantReport {
    let _guard = tch::no_grad_guard();
    let mut rng = SplitMix64::new(spec.seed);
    let mut report = PlantReport::default();
    let mut pick = |width: i64, name: String, report: &mut PlantReport| {
        let mut all: Vec<i64> = (0..width).collect();
        rng.shuffle(&mut all);
        let mut chosen: Vec<i64> =
            all.into_iter().take(spec.channels.min(width as usize)).collect();
        chosen.sort_unstable();
        report.norms.push((name, chosen.clone()));
        Tensor::from_slice(&chosen)
    };
    let s = spec.scale;
    let device = model.device();
    for (i, layer) in model.vision_tower.used_layers_mut().iter_mut().enumerate() {
        let width = layer.layer_norm1.weight.size()[0];
        let c = pick(width, format!("vision.{i}.layer_norm1"), &mut report).to_device(device);
        scale_entries(&mut layer.layer_norm1.weight, &c, s);
        scale_entries(&mut layer.layer_norm1.bias, &c, s);
        let a = &mut layer.self_attn;
        for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj] {
            scale_input_columns(l, &c, s);
        }
        let c = pick(width, format!("vision.{i}.layer_norm2"), &mut report).to_device(device);
        scale_entries(&mut layer.layer_norm2.weight, &c, s);
        scale_entries(&mut layer.layer_norm2.bias, &c, s);
        scale_input_columns(&mut layer.fc1, &c, s);
    }
    for (i, layer) in model.language_model.layers.iter_mut().enumerate() {
        let width = layer.input_layernorm.weight.size()[0];
        let c = pick(width, format!("language.{i}.input_layernorm"), &mut report).to_device(device);
        scale_entries(&mut layer.input_layernorm.weight, &c, s);
        let a = &mut layer.self_attn;
        for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj] {
            scale_input_columns(l, &c, s);
        }
        let c = pick(width, format!("language.{i}.post_attention_layernorm"), &mut report)
            .to_device(device);
        scale_entries(&mut layer.post_attention_layernorm.weight, &c, s);
        scale_input_columns(&mut layer.gate_proj, &c, s);
        scale_input_columns(&mut layer.up_proj, &c, s);
    }
    report
}
