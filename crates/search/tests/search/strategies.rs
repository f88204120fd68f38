//! Every strategy runs from its config on the embedded tiny LLaVA (planted-outlier variant, where
//! clipping decides the result), returns a plan that covers every site, serializes, and applies;
//! joint search never ends worse than the sequential start; costs are counted.

use std::path::PathBuf;

use qvlm_core::hook::NoHook;
use qvlm_core::io::prompt::Template;
use qvlm_core::model::llava::{LlavaBundle, LoadOptions};
use qvlm_core::model::outliers::{plant_outliers, OutlierSpec};
use qvlm_core::quant::spec::{Granularity, RangeMode, WeightSpec};
use qvlm_core::quant::uniform::Grid;
use qvlm_search::calib::CalibrationSet;
use qvlm_search::engine::WeightMethod;
use qvlm_search::model::SearchModel;
use qvlm_search::partition::Threshold;
use qvlm_search::plan::{apply, ActScheme, QuantPlan, Scheme, TowerScheme};
use qvlm_search::strategy::config::{
    BaseStrategy, BlockedConfig, CandidateGrid, EntropyPairs, Proxy, RuleKind, StrategyConfig,
    VeoConfig,
};
use tch::{Kind, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn easy_vqa_train_image(id: usize) -> PathBuf {
    let lib = root().join(".venv/lib");
    let py = std::fs::read_dir(&lib).expect(".venv/lib").flatten().next().expect("python").path();
    py.join("site-packages/easy_vqa/data/train/images").join(format!("{id}.png"))
}

pub(super) fn setup() -> (LlavaBundle, CalibrationSet) {
    let mut bundle = LlavaBundle::load(&root().join("models/tiny-llava"), &LoadOptions::default())
        .expect("tiny model");
    plant_outliers(&mut bundle.model, &OutlierSpec::default());
    let questions = [
        "what color is the shape?",
        "is there a circle in the image?",
        "what shape is present?",
        "is there not a red shape?",
    ];
    let answers = ["blue", "no", "rectangle", "yes"];
    let n = 12;
    let mut pixels = Vec::new();
    let mut prompts = Vec::new();
    let mut ans = Vec::new();
    for i in 0..n {
        pixels.push(bundle.images.preprocess_file(&easy_vqa_train_image(i)).expect("image"));
        let prompt = Template::LlavaV1.render(&Template::image_question(questions[i % 4], false));
        prompts.push(bundle.tokenizer.tokenize_prompt(&prompt, 1).expect("tokenize"));
        let mut a = bundle.tokenizer.encode_text(answers[i % 4], false).expect("answer");
        a.extend(bundle.eos_ids());
        ans.push(a);
    }
    (
        bundle,
        CalibrationSet { pixels: Tensor::stack(&pixels, 0), grids: vec![], prompts, answers: ans },
    )
}

pub(super) fn w4a4() -> Scheme {
    let weight = Some(WeightSpec::Rtn {
        grid: Grid::new(4, false).expect("grid"),
        granularity: Granularity::PerGroup { size: 64 },
    });
    Scheme {
        vision: TowerScheme {
            weight,
            act: Some(ActScheme {
                bits: 4,
                symmetric: false,
                granularity: Granularity::PerToken,
                range: RangeMode::Static,
            }),
        },
        projector: TowerScheme::default(),
        language: TowerScheme {
            weight,
            act: Some(ActScheme {
                bits: 4,
                symmetric: false,
                granularity: Granularity::PerChannel,
                range: RangeMode::Static,
            }),
        },
    }
}

fn run(bundle: &mut LlavaBundle, calib: &CalibrationSet, strategy: &StrategyConfig) -> QuantPlan {
    let mut progress = |_: usize, _: usize, _: &str| {};
    qvlm_search::strategy::run(
        &mut bundle.model,
        calib,
        w4a4(),
        WeightMethod::Plain,
        strategy,
        &mut progress,
    )
    .expect("strategy runs")
}

fn blocked(proxy: Proxy, rule: RuleKind) -> BaseStrategy {
    BaseStrategy::EntropyBlocked(BlockedConfig {
        proxy,
        rule,
        h0: Threshold::Quantile(0.3),
        ..BlockedConfig::default()
    })
}

#[test]
fn every_strategy_plans_every_site_and_the_plan_round_trips() {
    let (mut bundle, calib) = setup();
    let n_sites = bundle.model.sites().len();
    let weights_before: Vec<Tensor> =
        bundle.model.linears().iter().map(|l| l.float_weight().copy()).collect();
    let strategies = [
        BaseStrategy::Rtn {}.into(),
        BaseStrategy::LpInit { p: 2.4, ratios: vec![1.0, 0.9, 0.8] }.into(),
        BaseStrategy::Sequential { candidates: CandidateGrid::default() }.into(),
        blocked(Proxy::Entropy, RuleKind::Eq7).into(),
        blocked(Proxy::QuantError, RuleKind::Eq7).into(),
        blocked(Proxy::Entropy, RuleKind::ReleasedGate).into(),
        BaseStrategy::Oracle { candidates: CandidateGrid::Percentile(vec![1.0, 0.99]), window: 3 }
            .into(),
        StrategyConfig::Disentangled {
            veo: VeoConfig { epochs: 1, batch_size: 6, ..VeoConfig::default() },
            then: blocked(Proxy::Entropy, RuleKind::Eq7),
        },
    ];
    for s in &strategies {
        let plan = run(&mut bundle, &calib, s);
        assert_eq!(plan.sites.len(), n_sites, "{}: every site planned", s.name());
        assert!(
            plan.sites
                .iter()
                .all(|sp| sp.act.is_some()
                    == (sp.site.tower() != qvlm_core::layer_id::Tower::Projector)),
            "{}: every vision/language site quantized, the projector in float",
            s.name()
        );
        assert_eq!(
            plan.weights.len(),
            bundle.model.linears().len() - 2,
            "{}: every vision/language linear (projector stays float)",
            s.name()
        );
        // The model's float weights are untouched by a search.
        for (l, w) in bundle.model.linears().iter().zip(&weights_before) {
            assert_eq!(
                (l.float_weight() - w).abs().max().double_value(&[]),
                0.0,
                "{}: {} changed",
                s.name(),
                l.id
            );
        }
        let json = serde_json::to_string(&plan).expect("serialize");
        let back: QuantPlan = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, plan, "{}: plan round-trips through JSON", s.name());
        assert!(
            plan.cost.peak_cache_bytes > 0 && plan.cost.block_forwards > 0,
            "{}: cost counted",
            s.name()
        );
    }
}

#[test]
fn joint_search_never_ends_worse_than_the_sequential_start() {
    let (mut bundle, calib) = setup();
    for s in [
        blocked(Proxy::Entropy, RuleKind::Eq7),
        // A window of 4 spans sites of different widths (192 → 384), so the DED pair is not the
        // window's ends; three candidates keep its exhaustive search (3⁴ per window) quick.
        BaseStrategy::Oracle {
            candidates: CandidateGrid::Percentile(vec![1.0, 0.999, 0.99]),
            window: 4,
        },
    ] {
        let plan = run(&mut bundle, &calib, &s.clone().into());
        assert!(plan.groups.iter().any(|g| g.sites.len() > 1), "{}: some joint groups", s.name());
        for g in &plan.groups {
            assert!(
                g.objective <= g.sequential_objective * (1.0 + 1e-9),
                "{}: group {:?} joint {} > sequential {}",
                s.name(),
                g.sites,
                g.objective,
                g.sequential_objective
            );
        }
        if let BaseStrategy::Oracle { .. } = s {
            assert!(!plan.ded.is_empty(), "oracle records DED points");
            assert!(plan.ded.iter().all(|d| d.ded.is_finite() && d.entropy.is_finite()));
            // Each sample's joint search includes its layer-wise choice: DED ≥ 0, and it is the
            // normalised difference of the two recorded errors.
            for d in &plan.ded {
                assert!(d.ded >= 0.0 && d.joint_error <= d.layerwise_error, "{d:?}");
                assert!(d.energy > 0.0 && d.window == 4, "{d:?}");
                let again = (d.layerwise_error - d.joint_error) / d.energy;
                assert!((again - d.ded).abs() <= 1e-12 * again.abs().max(1.0), "{d:?}");
            }
            let samples: std::collections::BTreeSet<usize> =
                plan.ded.iter().map(|d| d.sample).collect();
            assert_eq!(samples.len(), calib.len(), "a point per calibration sample and window");
        }
    }
}

#[test]
fn cost_accounting_counts_what_each_strategy_does() {
    let (mut bundle, calib) = setup();
    let n_sites = bundle
        .model
        .sites()
        .iter()
        .filter(|s| s.id.tower != qvlm_core::layer_id::Tower::Projector)
        .count() as u64;
    let rtn = run(&mut bundle, &calib, &BaseStrategy::Rtn {}.into());
    assert_eq!(rtn.cost.candidate_evaluations, 0);
    let seq = run(
        &mut bundle,
        &calib,
        &BaseStrategy::Sequential { candidates: CandidateGrid::default() }.into(),
    );
    assert_eq!(
        seq.cost.candidate_evaluations,
        5 * n_sites,
        "one evaluation per site and candidate"
    );
    let blocks = SearchModel::blocks(&bundle.model).len() as u64;
    // Float and quantized pass per block, plus one capture per site.
    assert_eq!(seq.cost.block_forwards, 2 * blocks + n_sites);
    // One quantized-consumer product per evaluation, plus each float output once.
    assert!(seq.cost.layer_forwards > seq.cost.candidate_evaluations);
}

#[test]
fn searched_clipping_beats_min_max_on_the_planted_model() {
    let (mut bundle, calib) = setup();
    let rtn = run(&mut bundle, &calib, &BaseStrategy::Rtn {}.into());
    let seq = run(
        &mut bundle,
        &calib,
        &BaseStrategy::Sequential { candidates: CandidateGrid::default() }.into(),
    );
    // Output error of the final hidden states on the calibration data.
    let _guard = tch::no_grad_guard();
    let float = {
        let f = bundle.model.image_features(&calib.pixels, &mut NoHook);
        let imgs: Vec<Tensor> = (0..f.size()[0]).map(|b| f.narrow(0, b, 1)).collect();
        let batch = bundle.model.prepare(&calib.prompts, &imgs).expect("prepare");
        bundle.model.decode_hidden(&batch, None, &mut NoHook)
    };
    let err = |plan: &QuantPlan| -> f64 {
        let mut b = LlavaBundle::load(&root().join("models/tiny-llava"), &LoadOptions::default())
            .expect("load");
        plant_outliers(&mut b.model, &OutlierSpec::default());
        let mut hook = apply(&mut b.model, plan).expect("apply");
        let f = b.model.image_features(&calib.pixels, &mut hook);
        let imgs: Vec<Tensor> = (0..f.size()[0]).map(|i| f.narrow(0, i, 1)).collect();
        let batch = b.model.prepare(&calib.prompts, &imgs).expect("prepare");
        let h = b.model.decode_hidden(&batch, None, &mut hook);
        (h - &float).pow_tensor_scalar(2).mean(Kind::Double).double_value(&[])
    };
    let (e_rtn, e_seq) = (err(&rtn), err(&seq));
    assert!(e_seq < e_rtn, "sequential {e_seq} vs min-max {e_rtn}");
}

#[test]
fn constant_zero_nan_and_inf_calibration_data_give_finite_plans() {
    let (mut bundle, calib) = setup();
    // Blank (constant) images, then NaN and ±inf pixels in two samples.
    let pixels = calib.pixels.zeros_like();
    let _ = pixels.get(1).get(0).fill_(f64::NAN);
    let _ = pixels.get(2).get(1).narrow(0, 0, 4).fill_(f64::INFINITY);
    let _ = pixels.get(2).get(2).narrow(0, 0, 4).fill_(f64::NEG_INFINITY);
    let broken = CalibrationSet {
        pixels,
        grids: vec![],
        prompts: calib.prompts.clone(),
        answers: calib.answers.clone(),
    };
    assert!(broken.nonfinite_pixels() > 0);
    for s in [
        StrategyConfig::from(BaseStrategy::Rtn {}),
        BaseStrategy::Sequential { candidates: CandidateGrid::default() }.into(),
    ] {
        let plan = run(&mut bundle, &broken, &s);
        for sp in &plan.sites {
            if let Some((lo, hi)) = sp.act.as_ref().and_then(|a| a.range.as_ref()) {
                assert!(
                    lo.values.iter().chain(&hi.values).all(|v| v.is_finite()),
                    "{}: {} has a non-finite range",
                    s.name(),
                    sp.site.id
                );
            }
        }
        // The quantized model's outputs on the broken data are finite too.
        let mut b = LlavaBundle::load(&root().join("models/tiny-llava"), &LoadOptions::default())
            .expect("load");
        plant_outliers(&mut b.model, &OutlierSpec::default());
        let mut hook = apply(&mut b.model, &plan).expect("apply");
        let _guard = tch::no_grad_guard();
        let clean = broken.sanitized();
        let f = b.model.image_features(&clean.pixels, &mut hook);
        let imgs: Vec<Tensor> = (0..f.size()[0]).map(|i| f.narrow(0, i, 1)).collect();
        let batch = b.model.prepare(&clean.prompts, &imgs).expect("prepare");
        let logits = b.model.logits(&batch, &mut hook);
        assert!(
            bool::try_from(logits.isfinite().all()).unwrap_or(false),
            "{}: non-finite logits",
            s.name()
        );
    }
}

/// VEO as Eq. 8–10 say, on the planted model: real Jacobian weights (not all equal; the old guard
/// left them all at 1), L_ent over both towers' pairs, a loss that decreases, and trained vision
/// ranges that moved away from the QLoRA initialization.
#[test]
fn veo_weights_its_entropy_term_by_real_jacobians_and_learns_the_vision_ranges() {
    let (mut bundle, calib) = setup();
    let veo = VeoConfig { epochs: 4, batch_size: 6, lr: 0.05, ..VeoConfig::default() };
    let plan =
        run(&mut bundle, &calib, &StrategyConfig::Disentangled { veo, then: BaseStrategy::Rtn {} });
    let record = plan.veo.as_ref().expect("a VEO record in the plan");
    assert_eq!(record.entropy_pairs, "all");
    let round = &record.rounds[0];
    // Both towers' sites have a Jacobian norm, and they differ.
    let towers: std::collections::BTreeSet<_> =
        round.jacobian_norms.keys().map(|id| id.tower).collect();
    assert!(towers.contains(&qvlm_core::layer_id::Tower::Vision), "{towers:?}");
    assert!(towers.contains(&qvlm_core::layer_id::Tower::Language), "{towers:?}");
    let w: Vec<f64> = round.jacobian_weights.values().copied().collect();
    assert!(w.iter().all(|v| v.is_finite() && *v > 0.0), "{w:?}");
    let (lo, hi) = w.iter().fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    assert!(hi > 1.5 * lo, "Jacobian weights are (nearly) all equal: {w:?}");
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    assert!((mean - 1.0).abs() < 1e-9, "normalised to mean 1: {mean}");
    // The loss decreases over training.
    let curve = &round.loss_per_epoch;
    assert!(curve.last() < curve.first(), "VEO loss did not decrease: {curve:?}");
    assert!(round.last_epoch_terms.ent > 0.0 && round.objective.is_finite());
    // The trained vision ranges are not the QLoRA initialization's.
    let init = run(
        &mut bundle,
        &calib,
        &BaseStrategy::LpInit {
            p: 2.4,
            ratios: (0..10).map(|i| 1.0 - 0.05 * f64::from(i)).collect(),
        }
        .into(),
    );
    let ranges = |p: &QuantPlan| -> Vec<f32> {
        p.sites
            .iter()
            .filter(|s| s.site.tower() == qvlm_core::layer_id::Tower::Vision)
            .filter_map(|s| s.act.as_ref()?.range.as_ref())
            .flat_map(|(lo, hi)| lo.values.iter().chain(&hi.values).copied().collect::<Vec<_>>())
            .collect()
    };
    let (a, b) = (ranges(&init), ranges(&plan));
    assert_eq!(a.len(), b.len());
    let moved = a.iter().zip(&b).filter(|(x, y)| (*x - *y).abs() > 1e-6).count();
    assert!(moved * 2 > a.len(), "only {moved} of {} range values moved", a.len());
    // The vision-only variant keeps the vision tower's pairs only.
    let vision_only = VeoConfig {
        epochs: 1,
        batch_size: 6,
        entropy_pairs: EntropyPairs::Vision,
        ..VeoConfig::default()
    };
    let plan = run(
        &mut bundle,
        &calib,
        &StrategyConfig::Disentangled { veo: vision_only, then: BaseStrategy::Rtn {} },
    );
    let round = &plan.veo.as_ref().expect("record").rounds[0];
    assert!(round.jacobian_norms.keys().all(|id| id.tower == qvlm_core::layer_id::Tower::Vision));
}

/// Q-VLM joint: rounds alternate VEO (with the previous round's whole plan in the loop) and the
/// base strategy; the chosen round has the lowest objective, and rounds stop once it stops falling.
#[test]
fn qvlm_rounds_alternate_and_keep_the_best_objective() {
    let (mut bundle, calib) = setup();
    let veo = VeoConfig { epochs: 2, batch_size: 6, rounds: 3, ..VeoConfig::default() };
    let plan = run(
        &mut bundle,
        &calib,
        &StrategyConfig::Disentangled { veo, then: blocked(Proxy::Entropy, RuleKind::Eq7) },
    );
    let record = plan.veo.as_ref().expect("record");
    let objectives: Vec<f64> = record.rounds.iter().map(|r| r.objective).collect();
    assert!(!objectives.is_empty() && objectives.len() <= 3, "{objectives:?}");
    let best = objectives.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(objectives[record.chosen_round], best);
    // Rounds continue only while the objective falls.
    for k in 1..objectives.len().saturating_sub(1) {
        assert!(objectives[k] < objectives[k - 1], "{objectives:?}");
    }
    assert!(plan.cost.wall_seconds > 0.0 && plan.cost.model_passes > 0);
}

/// The block search with blocks of one site is Eq. 2's sequential search: the same ranges and,
/// with each distinct candidate evaluation counted once, the same number of evaluations (a group
/// of one used to cost 11 for 5 candidates). The proxy's own work is counted beside them.
#[test]
fn depth_one_blocks_cost_and_choose_what_the_sequential_search_does() {
    let (mut bundle, calib) = setup();
    let seq = run(
        &mut bundle,
        &calib,
        &BaseStrategy::Sequential { candidates: CandidateGrid::default() }.into(),
    );
    let depth_one = run(
        &mut bundle,
        &calib,
        &BaseStrategy::EntropyBlocked(BlockedConfig { max_depth: 1, ..BlockedConfig::default() })
            .into(),
    );
    assert_eq!(depth_one.cost.candidate_evaluations, seq.cost.candidate_evaluations);
    assert!(depth_one.groups.iter().all(|g| g.sites.len() == 1));
    for (a, b) in seq.sites.iter().zip(&depth_one.sites) {
        assert_eq!(a.act, b.act, "{}", a.site.id);
    }
    assert_eq!(seq.cost.dependency_evaluations, 0);
    assert!(depth_one.cost.dependency_evaluations > 0 && depth_one.cost.dependency_elements > 0);
    assert!(depth_one.cost.dependency_seconds > 0.0);
}
