//! Model memory: quantized linears at their storage size (codes + scales/zeros, from the
//! quantizers' own byte accounting), everything else (embeddings, norms, lm_head, float
//! linears) at 2 bytes an element (fp16, as deployed).

use std::collections::BTreeMap;

use anyhow::Result;
use qvlm_core::quant::weight::QuantizedWeight;
use qvlm_search::model::SearchModel;
use qvlm_search::plan::QuantPlan;
use tch::{Kind, Tensor};

#[derive(Debug, Default)]
pub struct ModelBytes {
    pub total: u64,
    /// "vision", "projector", "language", "other" (embeddings, norms, lm_head).
    pub by_tower: BTreeMap<String, u64>,
}

/// Bytes of the model as the plan stores it (float model when `plan` is `None`).
pub fn model_bytes(model: &dyn SearchModel, plan: Option<&QuantPlan>) -> Result<ModelBytes> {
    let mut out = ModelBytes::default();
    let mut linear_elems = 0u64;
    for l in model.linears() {
        let tower = l.id.tower.name().to_string();
        let elems = (l.in_features * l.out_features) as u64;
        linear_elems += elems + l.bias.as_ref().map_or(0, |b| b.numel() as u64);
        let bytes = match plan.and_then(|p| p.weights.get(&l.id)) {
            Some(wp) => {
                // Byte counts depend on shapes and the spec only: quantize a zero weight.
                let zero =
                    Tensor::zeros([l.out_features, l.in_features], (Kind::Float, tch::Device::Cpu));
                QuantizedWeight::quantize(&zero, &wp.spec, &l.id.to_string())?.bytes() as u64
            }
            None => 2 * elems,
        } + 2 * l.bias.as_ref().map_or(0, |b| b.numel() as u64);
        *out.by_tower.entry(tower).or_default() += bytes;
    }
    let all: u64 = model.named_tensors().iter().map(|(_, t)| t.numel() as u64).sum();
    let other = 2 * all.saturating_sub(linear_elems);
    out.by_tower.insert("other".into(), other);
    out.total = out.by_tower.values().sum();
    Ok(out)
}
