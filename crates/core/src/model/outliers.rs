//! Planting LLM-like activation outlier channels without changing the model's function.
//!
//! Large LLMs carry a few activation channels far larger than the rest (the reason LLM.int8 and
//! SmoothQuant exist); a tiny model trained briefly has none, so quantization barely hurts it. For
//! every norm that feeds linears — RMSNorm γ → q/k/v and → gate/up in the decoder, LayerNorm γ,β →
//! q/k/v and → fc1 in the vision tower — a few channels of the norm are multiplied by `s` and the
//! matching input columns of the following linears divided by `s`. The float function is unchanged
//! (up to rounding); the activations entering those linears now carry ×s outliers.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

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

/// `count` of a norm's `width` channels, drawn by shuffling them all with `rng` (the draw both
/// variants make, so a seed picks the same channels in each), in increasing order.
fn pick_channels(rng: &mut SplitMix64, width: i64, count: usize) -> Vec<i64> {
    let mut all: Vec<i64> = (0..width).collect();
    rng.shuffle(&mut all);
    let mut chosen: Vec<i64> = all.into_iter().take(count).collect();
    chosen.sort_unstable();
    chosen
}

/// Plants outlier channels in place (see the module docs).
pub fn plant_outliers(model: &mut Llava, spec: &OutlierSpec) -> PlantReport {
    let _guard = tch::no_grad_guard();
    let mut rng = SplitMix64::new(spec.seed);
    let mut report = PlantReport::default();
    let mut pick = |width: i64, name: String, report: &mut PlantReport| {
        let chosen = pick_channels(&mut rng, width, spec.channels.min(width as usize));
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

/// Channel-wise *shifted* outliers in the vision tower (the `tiny-llava-shifted` variant).
///
/// Post-LayerNorm activations of transformers with LayerNorm biases carry a few channels whose
/// values sit far from zero on every token — an offset, not a scale (Outlier Suppression+,
/// Wei et al. 2023; RepQ-ViT, Li et al. 2023). For every vision LayerNorm that feeds
/// linears (`layer_norm1` → q/k/v, `layer_norm2` → fc1), `channels` channels of its bias β are
/// raised by `shift` × the norm's RMS gain `rms(γ)`, and each consumer's bias absorbs the change:
/// `b ← b − W[:, c] δ`, so `W (y + δ) + b'` equals `W y + b` (float function unchanged up to
/// rounding). No per-channel *scaling* undoes an offset: dividing channel `c` by `s` shrinks its
/// content with the offset, so SmoothQuant and AWQ can only trade the offset between activations
/// and weights, and per-token activation ranges must span it on every token. The decoder
/// (RMSNorm without bias, linears without bias) has no place to absorb a shift and is left as is.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShiftSpec {
    /// Channels per vision LayerNorm.
    pub channels: usize,
    /// The offset added to those channels, in units of the norm's RMS gain.
    pub shift: f64,
    pub seed: u64,
}

impl ShiftSpec {
    pub fn validate(&self) -> Result<()> {
        if self.channels == 0 {
            return Err(Error::Invalid("shifted outliers: `channels` must be at least 1".into()));
        }
        if !(self.shift.is_finite() && self.shift != 0.0) {
            return Err(Error::Invalid(format!(
                "shifted outliers: `shift` must be finite and non-zero, got {}",
                self.shift
            )));
        }
        Ok(())
    }
}

/// The error for a consumer that has no bias to absorb a shift.
fn no_bias_for_shift(linear: &Linear) -> Error {
    Error::Quant {
        layer: linear.path.clone(),
        reason: "a shifted outlier needs a bias to absorb the shift; this linear has none".into(),
    }
}

/// Adds `delta` `[c]` at `channels` of the norm's output to every consumer's bias
/// (`b ← b − W[:, channels] · delta`, in f64 then the bias's kind).
fn absorb_shift(linear: &mut Linear, channels: &Tensor, delta: &Tensor) -> Result<()> {
    let w = linear.float_weight().index_select(1, channels).to_kind(Kind::Double);
    let Some(bias) = &mut linear.bias else { return Err(no_bias_for_shift(linear)) };
    let change = w.matmul(&delta.to_kind(Kind::Double));
    let updated = (bias.to_kind(Kind::Double) - change).to_kind(bias.kind());
    bias.copy_(&updated);
    Ok(())
}

/// Plants shifted outlier channels in place (see [`ShiftSpec`]).
pub fn plant_shifted_outliers(model: &mut Llava, spec: &ShiftSpec) -> Result<PlantReport> {
    spec.validate()?;
    // Check every norm and consumer before changing anything, so an error leaves the model whole.
    for layer in model.vision_tower.used_layers() {
        let width = layer.layer_norm1.weight.size()[0];
        if spec.channels as i64 > width {
            return Err(Error::Invalid(format!(
                "shifted outliers: {} channels asked for, the vision LayerNorms have {width}",
                spec.channels
            )));
        }
        let a = &layer.self_attn;
        for l in [&a.q_proj, &a.k_proj, &a.v_proj, &layer.fc1] {
            if l.bias.is_none() {
                return Err(no_bias_for_shift(l));
            }
        }
    }
    let _guard = tch::no_grad_guard();
    let mut rng = SplitMix64::new(spec.seed);
    let mut report = PlantReport::default();
    let device = model.device();
    for (i, layer) in model.vision_tower.used_layers_mut().iter_mut().enumerate() {
        for which in [1, 2] {
            let norm = if which == 1 { &mut layer.layer_norm1 } else { &mut layer.layer_norm2 };
            let chosen = pick_channels(&mut rng, norm.weight.size()[0], spec.channels);
            report.norms.push((format!("vision.{i}.layer_norm{which}"), chosen.clone()));
            let c = Tensor::from_slice(&chosen).to_device(device);
            let gain = norm.weight.to_kind(Kind::Double);
            let rms_gain = gain.square().mean(Kind::Double).sqrt().double_value(&[]);
            let before = norm.bias.index_select(0, &c).to_kind(Kind::Double);
            let shifted = (&before + spec.shift * rms_gain).to_kind(norm.bias.kind());
            let _ = norm.bias.index_copy_(0, &c, &shifted);
            // The shift as stored (after rounding to the bias's kind), so the consumers absorb
            // exactly what the norm adds.
            let delta = shifted.to_kind(Kind::Double) - before;
            if which == 1 {
                let a = &mut layer.self_attn;
                for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj] {
                    absorb_shift(l, &c, &delta)?;
                }
            } else {
                absorb_shift(&mut layer.fc1, &c, &delta)?;
            }
        }
    }
    Ok(report)
}
