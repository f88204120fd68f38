//! A plan as real low-bit storage: every linear the plan quantizes becomes a packed weight (the
//! integer form of the same quantizer [`crate::plan::apply`] fake-quantizes with), and each
//! site's activation quantizer is mapped onto what packed layers and exported checkpoints can
//! hold. What has no packed form is an error naming the layer and why (never a silent float).

use std::collections::BTreeMap;

use qvlm_core::layer_id::LayerId;
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::model::llava::Llava;
use qvlm_core::quant::packed::{ActMode, PackedWeight};
use qvlm_core::quant::spec::{Clip, Granularity, RangeMode, WeightSpec};
use qvlm_core::quant::uniform::QParams;
use qvlm_core::quant::weight::QuantizedWeight;
use tch::{Kind, Tensor};

use crate::error::{Result, SearchError};
use crate::plan::{ModelIdentity, QuantPlan, SiteAct};

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

/// Replaces every linear the plan quantizes by its packed weight on the model's device, after
/// checking the plan was searched on this model ([`ModelIdentity::check`], on the unrotated
/// model) and rotating it as the plan says. AWQ's input scales
/// are refused: packed storage would need 1/s folded into the previous operation, which is not
/// implemented (export the fake-quantized model as llava-hf instead).
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
            if sp.input_scale.is_some() {
                return Err(unsupported(
                    *c,
                    "an AWQ input scale: packing would need 1/s folded into the previous \
                     operation (not implemented); use --format llava-hf",
                ));
            }
            if let Some(a) = &sp.act {
                acts.insert(*c, a);
            }
        }
    }
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let mut packed = Packed::default();
    for linear in model.linears_mut() {
        let id = linear.id;
        let Some(wp) = plan.weights.get(&id) else {
            if acts.contains_key(&id) {
                return Err(unsupported(id, "quantized activations on a float weight"));
            }
            continue;
        };
        let act = act_form(id, acts.get(&id).copied())?;
        let w = linear.float_weight();
        let q = match &wp.solved {
            Some(solved) => solved.to_quantized(&w.size(), id)?,
            None => {
                let ratio = wp.clip_ratio.as_ref().map(|r| r.to_tensor());
                quantized_weight(&w, wp.spec, ratio.as_ref(), id)?
            }
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
