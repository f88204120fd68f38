//! A plan as real low-bit storage: every linear the plan quantizes becomes a packed weight (the
//! integer form of the same quantizer [`crate::plan::apply`] fake-quantizes with), and each
//! site's activation quantizer is mapped onto what packed layers and exported checkpoints can
//! hold. What has no packed form is an error naming the layer and why (never a silent float).

use std::collections::BTreeMap;

use qvlm_core::layer_id::{LayerId, Slot, Tower};
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::model::llava::Llava;
use qvlm_core::quant::packed::{ActMode, PackedWeight};
use qvlm_core::quant::spec::{Clip, Granularity, RangeMode, WeightSpec};
use qvlm_core::quant::uniform::QParams;
use qvlm_core::quant::weight::QuantizedWeight;
use tch::{Kind, Tensor};

use crate::error::{Result, SearchError};
use crate::plan::{ModelIdentity, QuantPlan, SiteAct};
use crate::site::{FoldTarget, Site};

/// What [`pack`] did besides packing the weights.
#[derive(Debug, Default)]
pub struct Packed {
    /// Linears packed, by id.
    pub layers: Vec<LayerId>,
}

fn unsupported(layer: LayerId, reason: impl Into<String>) -> SearchError {
    SearchError::Unsupported { layer: layer.to_string(), reason: reason.into() }
}

/// The activation side of a packed layer: float, dynamic per-token int8 or int4, or symmetric
/// int8 with the plan's static per-tensor scale.
fn act_form(layer: LayerId, act: Option<&SiteAct>) -> Result<ActMode> {
    let Some(a) = act else { return Ok(ActMode::Float) };
    let s = a.spec;
    let int8_sym = s.grid.bits == 8 && s.grid.symmetric;
    match (s.range, s.granularity, &a.range) {
        (RangeMode::Dynamic, Granularity::PerToken, None) if int8_sym && s.clip == Clip::MinMax => {
            Ok(ActMode::Int8PerToken)
        }
        // W4A4 with QuaRot-style per-token ranges: the own VNNI kernel (4-bit weights only).
        (RangeMode::Dynamic, Granularity::PerToken, None)
            if s.grid.bits == 4 && s.grid.symmetric && s.clip == Clip::MinMax =>
        {
            Ok(ActMode::Int4PerToken)
        }
        (RangeMode::Static, Granularity::PerTensor, Some((lo, hi))) if int8_sym => {
            let qp = QParams::from_range(s.grid, &lo.to_tensor(), &hi.to_tensor());
            let scale = qp.scale.reshape([-1]);
            if scale.numel() != 1 {
                return Err(unsupported(layer, "a per-tensor range that is not one number"));
            }
            // The f32 scale the fake-quant reference computes, so the packed layer quantizes
            // exactly as the searched model did.
            Ok(ActMode::Int8PerTensor { scale: scale.double_value(&[0]) as f32 })
        }
        _ => Err(unsupported(
            layer,
            format!(
                "activations {}-bit {} {:?} {:?} (clip {:?}) have no packed form: packed layers \
                 take float activations, symmetric int8 or int4 per token (dynamic, min-max) or \
                 symmetric int8 per tensor (static)",
                s.grid.bits,
                if s.grid.symmetric { "symmetric" } else { "asymmetric" },
                s.granularity,
                s.range,
                s.clip
            ),
        )),
    }
}

/// The integer form of `Q(W)` under the plan's weight quantizer, clipping ratios included (the
/// same ranges as [`crate::awq::clipped_rtn`]); a plan's solved codes (GPTQ) are used as stored.
fn quantized_weight(
    w: &Tensor,
    spec: WeightSpec,
    clip_ratio: Option<&Tensor>,
    layer: LayerId,
) -> Result<QuantizedWeight> {
    let name = layer.to_string();
    let (Some(ratio), WeightSpec::Rtn { grid, granularity }) = (clip_ratio, spec) else {
        return Ok(QuantizedWeight::quantize(w, &spec, &name)?);
    };
    let (out, inp) = (w.size()[0], w.size()[1]);
    let group = match granularity {
        Granularity::PerTensor | Granularity::PerChannel => inp,
        Granularity::PerGroup { size } => size,
        Granularity::PerToken => return Err(unsupported(layer, "per-token weight groups")),
    };
    if inp % group != 0 {
        return Err(unsupported(layer, format!("group {group} does not divide {inp}")));
    }
    let g = w.to_kind(Kind::Float).reshape([out, inp / group, group]);
    let r = ratio.to_device(w.device()).to_kind(Kind::Float).reshape([out, 1, 1]);
    let qp = QParams::from_range(grid, &(g.amin(-1, true) * &r), &(g.amax(-1, true) * &r));
    let (qmin, _) = grid.range();
    let codes = (qp.quantize(&g) - qmin as f64).reshape([out, inp]).to_kind(Kind::Uint8);
    Ok(QuantizedWeight::Uniform {
        grid,
        group,
        codes,
        scale: qp.scale.reshape([out, inp / group]),
        zero_point: qp.zero_point.reshape([out, inp / group]),
    })
}

/// What a scaled site's input is produced by, in this model.
enum Producer {
    /// The norm of this block (attention's, or the MLP's when `second`).
    Norm { block: u32, tower: Tower, second: bool },
    /// The rows of this linear.
    Rows(LayerId),
}

/// The producer of a scaled site's input ([`Site::fold_target`]), or why its scale cannot be
/// folded here.
fn producer(model: &Llava, site: &Site, s: &Tensor) -> Result<Producer> {
    let (tower, block) = (site.id.tower, site.id.block);
    match site.fold_target() {
        Some(FoldTarget::Norm { second }) => Ok(Producer::Norm { block, tower, second }),
        Some(FoldTarget::Rows(Slot::VProj)) if tower == Tower::Language => {
            // Grouped-query attention: one value row feeds every query head of its group, so
            // the scale must be the same across the group's heads.
            let t = &model.cfg.text;
            let (heads, kv, d) = (t.num_attention_heads, t.num_key_value_heads, t.head_dim);
            if kv != heads {
                let by_head = s.to_kind(Kind::Float).reshape([kv, heads / kv, d]);
                let spread = (&by_head - by_head.select(1, 0).unsqueeze(1)).abs().max();
                if spread.double_value(&[]) != 0.0 {
                    return Err(unsupported(
                        site.id,
                        "an input scale that differs between the query heads sharing a value \
                         head (grouped-query attention): it cannot be folded into v_proj (AWQ \
                         with `sites = \"foldable\"` leaves this site unscaled, as llm-awq does)",
                    ));
                }
            }
            Ok(Producer::Rows(LayerId::new(tower, block, Slot::VProj)))
        }
        Some(FoldTarget::Rows(Slot::UpProj)) => {
            let down = &model.language_model.layers[block as usize].down_proj;
            if down.input_rotation.is_some() {
                return Err(unsupported(
                    site.id,
                    "an input scale after the online Hadamard rotation: the rotation mixes \
                     up_proj's rows, so 1/s cannot be folded into them",
                ));
            }
            Ok(Producer::Rows(LayerId::new(tower, block, Slot::UpProj)))
        }
        Some(FoldTarget::Rows(slot)) => Ok(Producer::Rows(LayerId::new(tower, block, slot))),
        None => Err(unsupported(
            site.id,
            "an input scale after a nonlinearity or on the residual stream (CLIP's fc2, the \
             projector) has no operation to fold 1/s into; leave it unscaled (AWQ with \
             `sites = \"foldable\"`), do not quantize that tower (`quantize_vision = false`, \
             `quantize_projector = false`), or use --format llava-hf",
        )),
    }
}

/// The site's per-channel scale `s` `[in]` as the hook divides by it: the f32 reciprocal.
fn reciprocal(s: &Tensor) -> Tensor {
    s.to_kind(Kind::Float).reciprocal()
}

/// `t · inv` along its last dimension (a gain or bias `[in]`), in `t`'s dtype.
fn times(t: &Tensor, inv: &Tensor) -> Tensor {
    (t.to_kind(Kind::Float) * inv.to_device(t.device())).to_kind(t.kind())
}

/// Folds every input scale of the plan into the operation producing the site's input (norm
/// gains here; linears' rows returned, to be applied to their quantized form so that their codes
/// stay the plan's). Checked for every site before anything changes.
fn fold_norms(model: &mut Llava, plan: &QuantPlan) -> Result<BTreeMap<LayerId, Tensor>> {
    let mut folds = Vec::new();
    for sp in &plan.sites {
        if let Some(s) = &sp.input_scale {
            let s = s.to_tensor();
            folds.push((producer(model, &sp.site, &s)?, reciprocal(&s)));
        }
    }
    let mut rows = BTreeMap::new();
    let _guard = tch::no_grad_guard();
    for (p, inv) in folds {
        match p {
            Producer::Norm { block, tower: Tower::Language, second } => {
                let layer = &mut model.language_model.layers[block as usize];
                let norm = if second {
                    &mut layer.post_attention_layernorm
                } else {
                    &mut layer.input_layernorm
                };
                norm.weight = times(&norm.weight, &inv);
            }
            Producer::Norm { block, second, .. } => {
                let layer = &mut model.vision_tower.used_layers_mut()[block as usize];
                let norm = if second { &mut layer.layer_norm2 } else { &mut layer.layer_norm1 };
                norm.weight = times(&norm.weight, &inv);
                norm.bias = times(&norm.bias, &inv);
            }
            Producer::Rows(id) => {
                rows.insert(id, inv);
            }
        }
    }
    Ok(rows)
}

/// `q`'s output rows scaled by `inv` `[out]`: the same codes, scales times `inv`.
fn scale_rows(q: QuantizedWeight, inv: &Tensor, layer: LayerId) -> Result<QuantizedWeight> {
    match q {
        QuantizedWeight::Uniform { grid, group, codes, scale, zero_point } => {
            let scale = scale.to_kind(Kind::Float) * inv.to_device(scale.device()).unsqueeze(1);
            Ok(QuantizedWeight::Uniform { grid, group, codes, scale, zero_point })
        }
        QuantizedWeight::Nf4(_) => Err(unsupported(
            layer,
            "NF4 blocks do not follow rows: an input scale of the next layer cannot be folded in",
        )),
    }
}

/// Replaces every linear the plan quantizes by its packed weight on the model's device, after
/// checking the plan was searched on this model ([`ModelIdentity::check`], on the unrotated
/// model) and rotating it as the plan says. Input scales (AWQ, SmoothQuant) are folded as
/// AutoAWQ does: the consumers hold `Q(W · s)`, the producing norm's gain (and bias) or the
/// producing linear's rows are divided by `s`; a site whose input no linear operation produces
/// (CLIP's fc2 after GELU, the projector) is an error naming it.
pub fn pack(model: &mut Llava, plan: &QuantPlan) -> Result<Packed> {
    if let Some(r) = &model.rotation {
        return Err(SearchError::PlanMismatch(format!(
            "pack takes the unrotated model (its weights are checked against the plan's before it \
             is rotated); this one is already rotated ({r:?})"
        )));
    }
    ModelIdentity::check(plan, model)?;
    crate::plan::ensure_rotation(model, plan)?;
    let mut acts: BTreeMap<LayerId, &SiteAct> = BTreeMap::new();
    for sp in &plan.sites {
        for c in &sp.site.consumers {
            if let Some(a) = &sp.act {
                acts.insert(*c, a);
            }
        }
    }
    let scales = crate::plan::input_scales(plan);
    let rows = fold_norms(model, plan)?;
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let mut packed = Packed::default();
    for linear in model.linears_mut() {
        let id = linear.id;
        let row_inv = rows.get(&id);
        if let (Some(inv), Some(b)) = (row_inv, &linear.bias) {
            linear.bias = Some(times(b, inv));
        }
        let Some(wp) = plan.weights.get(&id) else {
            if acts.contains_key(&id) {
                return Err(unsupported(id, "quantized activations on a float weight"));
            }
            if let Some(inv) = row_inv {
                let w = linear.float_weight();
                let folded = (w.to_kind(Kind::Float) * inv.to_device(w.device()).unsqueeze(1))
                    .to_kind(w.kind());
                linear.weight = LinearWeight::Float(folded);
            }
            continue;
        };
        let act = act_form(id, acts.get(&id).copied())?;
        let w = linear.float_weight();
        let q = match &wp.solved {
            Some(solved) => solved.to_quantized(&w.size(), id)?,
            None => {
                let ratio = wp.clip_ratio.as_ref().map(|r| r.to_tensor());
                let scaled = match scales.get(&id) {
                    Some(s) => w.to_kind(Kind::Float) * s.to_device(w.device()).unsqueeze(0),
                    None => w.shallow_clone(),
                };
                quantized_weight(&scaled, wp.spec, ratio.as_ref(), id)?
            }
        };
        let q = match row_inv {
            Some(inv) => scale_rows(q, inv, id)?,
            None => q,
        };
        let p = PackedWeight::from_quantized(&q, act, w.kind(), device, &id.to_string())?;
        linear.weight = LinearWeight::Packed(p);
        packed.layers.push(id);
    }
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use qvlm_core::layer_id::{Slot, Tower};
    use qvlm_core::quant::spec::ActSpec;
    use qvlm_core::quant::uniform::Grid;

    use super::*;

    fn site(bits: u8, symmetric: bool, granularity: Granularity) -> SiteAct {
        let grid = Grid { bits, symmetric };
        let spec = ActSpec { grid, granularity, range: RangeMode::Dynamic, clip: Clip::MinMax };
        SiteAct { spec, range: None }
    }

    #[test]
    fn dynamic_per_token_activations_map_onto_the_integer_modes() {
        let id = LayerId::new(Tower::Language, 0, Slot::QProj);
        let form = |a: SiteAct| act_form(id, Some(&a));
        let per_token = Granularity::PerToken;
        assert_eq!(form(site(8, true, per_token)).ok(), Some(ActMode::Int8PerToken));
        // W4A4 with QuaRot-style ranges: the own VNNI kernel's mode.
        assert_eq!(form(site(4, true, per_token)).ok(), Some(ActMode::Int4PerToken));
        assert_eq!(act_form(id, None).ok(), Some(ActMode::Float));
        // Asymmetric 4-bit or per-channel ranges have no packed form: an error naming the layer.
        for a in [site(4, false, per_token), site(4, true, Granularity::PerChannel)] {
            let err = form(a).expect_err("no packed form").to_string();
            assert!(err.contains("no packed form") && err.contains(&id.to_string()), "{err}");
        }
    }
}
