//! The field's baselines as weight methods: GPTQ against a transcription of the reference
//! implementation (`python/gen_gptq_reference.py`), and GPTQ and SmoothQuant inside the search
//! on the tiny planted-outlier LLaVA, their plans stored, applied and packed.

use std::path::PathBuf;

use qvlm_core::hook::{LinearHook, NoHook};
use qvlm_core::layer_id::Slot;
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::model::llava::LlavaBundle;
use qvlm_core::quant::spec::{Granularity, WeightSpec};
use qvlm_core::quant::uniform::Grid;
use qvlm_core::quant::weight::QuantizedWeight;
use qvlm_search::calib::CalibrationSet;
use qvlm_search::engine::WeightMethod;
use qvlm_search::gptq::{self, GptqSettings};
use qvlm_search::plan::{apply, ModelIdentity, QuantPlan, Scheme, TowerScheme};
use qvlm_search::smoothquant::SmoothSettings;
use qvlm_search::strategy::config::{BaseStrategy, StrategyConfig};
use tch::{Kind, Tensor};

use super::strategies::{setup, w4a4};

/// Relative tolerance on the proxy loss and the Hessian.
const REL_TOL: f64 = 1e-9;

fn fixture() -> std::collections::BTreeMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gptq/reference.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

#[test]
fn gptq_matches_the_reference_transcription() {
    let t = fixture();
    let (w, x, h) = (&t["w"], &t["x"], &t["hessian"]);
    let ours = gptq::hessian(x);
    let rel = (&ours - h).abs().max().double_value(&[]) / h.abs().max().double_value(&[]);
    assert!(rel < REL_TOL, "Hessian differs from add_batch's by {rel:e}");
    // name: bits, symmetric, group (0 = per channel), act_order, static_groups, block size
    let cases = [
        ("g16_asym4", 4, false, 16, false, false, 32),
        ("channel_sym3_act_order", 3, true, 0, true, false, 128),
        ("g16_asym4_act_order_static", 4, false, 16, true, true, 32),
        ("g8_sym4_block5", 4, true, 8, false, false, 5),
    ];
    for (name, bits, symmetric, group, act_order, static_groups, block_size) in cases {
        let grid = Grid::new(bits, symmetric).expect("grid");
        let granularity = if group == 0 {
            Granularity::PerChannel
        } else {
            Granularity::PerGroup { size: group }
        };
        let settings = GptqSettings { damp: 0.01, act_order, static_groups, block_size };
        let q = gptq::quantize(w, h, grid, granularity, &settings, name).expect(name);
        let QuantizedWeight::Uniform { codes, scale, zero_point, .. } = &q else {
            panic!("{name}: uniform weight expected")
        };
        let want = &t[&format!("{name}.codes")];
        let mismatches = codes.ne_tensor(want).sum(Kind::Int64).int64_value(&[]) as usize;
        // Both sides run the same libtorch operations in f64: every code agrees.
        assert!(
            mismatches == 0,
            "{name}: {mismatches} of {} codes differ from the reference",
            want.numel()
        );
        for (what, ours, theirs) in [
            ("scale", scale, &t[&format!("{name}.scale")]),
            ("zero point", zero_point, &t[&format!("{name}.zero_point")]),
        ] {
            let d = (ours - theirs).abs().max().double_value(&[]);
            assert_eq!(d, 0.0, "{name}: {what} differs by {d:e}");
        }
        let loss = gptq::proxy_loss(w, &q.dequantize(), h);
        let want_loss = t[&format!("{name}.loss")].double_value(&[0]);
        assert!(
            ((loss - want_loss) / want_loss).abs() < REL_TOL,
            "{name}: proxy loss {loss} vs reference {want_loss}"
        );
    }
}

/// Logits of every position of the calibration prompts.
fn calib_logits(b: &LlavaBundle, calib: &CalibrationSet, hook: &mut dyn LinearHook) -> Tensor {
    let _g = tch::no_grad_guard();
    let features = b.model.image_features(&calib.pixels, hook);
    let images: Vec<Tensor> =
        (0..calib.len() as i64).map(|i| features.get(i).unsqueeze(0)).collect();
    let batch = b.model.prepare(&calib.prompts, &images).expect("prepare");
    b.model.logits(&batch, hook)
}

fn run(
    bundle: &mut LlavaBundle,
    calib: &CalibrationSet,
    scheme: Scheme,
    weights: WeightMethod,
) -> QuantPlan {
    let mut progress = |_: usize, _: usize, _: &str| {};
    let strategy: StrategyConfig = BaseStrategy::Rtn {}.into();
    let mut plan = qvlm_search::strategy::run(
        &mut bundle.model,
        calib,
        scheme,
        weights,
        &strategy,
        &mut progress,
    )
    .expect("strategy runs");
    plan.model = Some(
        ModelIdentity::of(&bundle.model, "tiny-planted", "models/tiny-llava").expect("identity"),
    );
    plan
}

/// GPTQ inside the search: every quantized linear carries its solved codes, the plan survives
/// JSON, applying it gives exactly those codes' weights, packing gives the same weights, and on
/// the calibration inputs GPTQ's layer outputs are closer to float than round-to-nearest's.
#[test]
fn gptq_plans_store_their_codes_and_apply_and_pack_to_them() {
    let (mut bundle, calib) = setup();
    let float: Vec<(qvlm_core::layer_id::LayerId, Tensor)> =
        bundle.model.linears().iter().map(|l| (l.id, l.float_weight().copy())).collect();
    let weights_only = Scheme {
        vision: TowerScheme { weight: w4a4().vision.weight, act: None },
        projector: TowerScheme::default(),
        language: TowerScheme { weight: w4a4().language.weight, act: None },
    };
    let plan = run(&mut bundle, &calib, weights_only, WeightMethod::Gptq(GptqSettings::default()));
    let rtn = run(&mut bundle, &calib, weights_only, WeightMethod::Plain);
    assert!(!plan.weights.is_empty());
    assert!(plan.weights.values().all(|wp| wp.solved.is_some()), "every GPTQ weight has codes");
    let back: QuantPlan =
        serde_json::from_str(&serde_json::to_string(&plan).expect("json")).expect("parse");
    assert_eq!(back, plan, "a GPTQ plan round-trips through JSON");

    let mut applied = setup().0;
    let _ = apply(&mut applied.model, &back).expect("apply");
    let mut packed = setup().0;
    let p = qvlm_search::pack::pack(&mut packed.model, &back).expect("pack");
    assert_eq!(p.layers.len(), plan.weights.len());
    let mut gptq_closer = 0;
    for ((l, a), (id, w)) in applied.model.linears().iter().zip(packed.model.linears()).zip(&float)
    {
        let Some(wp) = plan.weights.get(id) else { continue };
        let solved = wp.solved.as_ref().expect("solved");
        let want = solved.to_quantized(&w.size(), *id).expect("codes").dequantize();
        assert_eq!((l.float_weight() - &want).abs().max().double_value(&[]), 0.0, "{id}: applied");
        assert!(matches!(a.weight, LinearWeight::Packed(_)), "{id}: packed");
        assert_eq!((a.float_weight() - &want).abs().max().double_value(&[]), 0.0, "{id}: packed");
        // RTN of the same spec for comparison: GPTQ changes the weights.
        let rtn_w =
            qvlm_search::plan::quantize_weight(w, &rtn.weights[id], None, *id).expect("rtn");
        if (&rtn_w - &want).abs().max().double_value(&[]) > 0.0 {
            gptq_closer += 1;
        }
    }
    assert_eq!(gptq_closer, plan.weights.len(), "GPTQ's weights differ from RTN's on every layer");
    // End to end on the calibration prompts: GPTQ's logits are closer to float than RTN's.
    let mut rtn_model = setup().0;
    let _ = apply(&mut rtn_model.model, &rtn).expect("apply rtn");
    let float_model = setup().0;
    let logits = |b: &LlavaBundle| calib_logits(b, &calib, &mut NoHook);
    let reference = logits(&float_model);
    let err =
        |b| (logits(b) - &reference).pow_tensor_scalar(2).mean(Kind::Double).double_value(&[]);
    let (e_gptq, e_rtn) = (err(&applied), err(&rtn_model));
    assert!(e_gptq < e_rtn, "logit MSE: GPTQ {e_gptq:e} vs RTN {e_rtn:e}");
}

/// SmoothQuant scales exactly the sites that follow a norm, applying the plan divides those
/// inputs by s, and with 4-bit weights and per-channel 4-bit activations the migration is part
/// of the stored plan. A bad α is a named error.
#[test]
fn smoothquant_scales_the_sites_after_norms() {
    let (mut bundle, calib) = setup();
    let plan =
        run(&mut bundle, &calib, w4a4(), WeightMethod::SmoothQuant(SmoothSettings::default()));
    for sp in &plan.sites {
        let after_norm = matches!(sp.site.id.slot, Slot::QProj | Slot::Fc1 | Slot::GateProj);
        assert_eq!(sp.input_scale.is_some(), after_norm, "{}", sp.site.id);
        if let Some(s) = &sp.input_scale {
            assert!(s.values.iter().all(|v| v.is_finite() && *v >= 1e-5), "{}", sp.site.id);
        }
    }
    let bad = qvlm_search::strategy::run(
        &mut bundle.model,
        &calib,
        w4a4(),
        WeightMethod::SmoothQuant(SmoothSettings { alpha: 2.0 }),
        &BaseStrategy::Rtn {}.into(),
        &mut |_: usize, _: usize, _: &str| {},
    );
    let msg = format!("{:?}", bad.expect_err("alpha 2 is refused"));
    assert!(msg.contains("smoothquant.alpha"), "{msg}");
    // A GPTQ scheme on NF4 weights is refused, naming the layer.
    let nf4 = Scheme {
        language: TowerScheme {
            weight: Some(WeightSpec::Nf4 { block: 64, double_quant: false }),
            act: None,
        },
        ..Scheme::default()
    };
    let err = qvlm_search::strategy::run(
        &mut bundle.model,
        &calib,
        nf4,
        WeightMethod::Gptq(GptqSettings::default()),
        &BaseStrategy::Rtn {}.into(),
        &mut |_: usize, _: usize, _: &str| {},
    );
    let msg = format!("{}", err.expect_err("nf4 is refused"));
    assert!(msg.contains("language") && msg.contains("uniform weight grid"), "{msg}");
}

/// A search on a rotated model records the rotation; applying its plan to a fresh, unrotated
/// model rotates it the same way and gives the same quantized model as the searched one; a model
/// rotated otherwise is refused.
#[test]
fn rotated_plans_rotate_the_model_they_are_applied_to() {
    use qvlm_core::model::rotation::{rotate, RotationKind, RotationSpec};
    let (mut bundle, calib) = setup();
    let identity =
        ModelIdentity::of(&bundle.model, "tiny-planted", "models/tiny-llava").expect("id");
    let spec = RotationSpec { kind: RotationKind::Hadamard, seed: 0 };
    rotate(&mut bundle.model, &spec).expect("rotate");
    let mut progress = |_: usize, _: usize, _: &str| {};
    let mut plan = qvlm_search::strategy::run(
        &mut bundle.model,
        &calib,
        w4a4(),
        WeightMethod::Plain,
        &BaseStrategy::Rtn {}.into(),
        &mut progress,
    )
    .expect("search");
    plan.model = Some(identity);
    assert_eq!(plan.rotation, Some(spec));
    let back: QuantPlan =
        serde_json::from_str(&serde_json::to_string(&plan).expect("json")).expect("parse");
    assert_eq!(back.rotation, Some(spec));
    let mut searched_hook = apply(&mut bundle.model, &back).expect("apply on the searched model");
    let mut fresh = setup().0;
    let mut fresh_hook = apply(&mut fresh.model, &back).expect("apply on a fresh model");
    assert_eq!(fresh.model.rotation, Some(spec));
    let logits = |b: &LlavaBundle, hook: &mut dyn LinearHook| calib_logits(b, &calib, hook);
    let d = (logits(&bundle, &mut searched_hook) - logits(&fresh, &mut fresh_hook))
        .abs()
        .max()
        .double_value(&[]);
    assert_eq!(d, 0.0, "the searched and the freshly applied model agree");
    // pack checks the plan's model against the unrotated weights, so it refuses a rotated model.
    let err = qvlm_search::pack::pack(&mut fresh.model, &back).expect_err("rotated model");
    assert!(err.to_string().contains("unrotated"), "{err}");
    let mut other = setup().0;
    rotate(&mut other.model, &RotationSpec { kind: RotationKind::RandomOrthogonal, seed: 0 })
        .expect("rotate");
    let err = apply(&mut other.model, &back).expect_err("another rotation is refused");
    assert!(err.to_string().contains("rotation"), "{err}");
}
