//! The strategies and the weight baselines on Qwen2-VL and Qwen2.5-VL: the tiny random
//! checkpoints of the core parity fixtures (python/gen_qwen2vl_fixtures.py,
//! python/gen_qwen2_5_vl_fixtures.py), calibrated on chat turns about images of different sizes
//! (so every sample has its own number of image tokens). Random weights: what is checked is that
//! every strategy plans every site of both towers, the merger and the decoder, leaves the float
//! weights alone and gives a plan whose fake-quantized model runs to finite logits (also searched
//! on the rotated model); not accuracy.

use std::path::{Path, PathBuf};

use qvlm_core::io::image::Rgb8;
use qvlm_core::layer_id::{Slot, Tower};
use qvlm_core::model::llava::LoadOptions;
use qvlm_core::model::qwen2_vl::Qwen2VlBundle;
use qvlm_core::model::rotation::{RotationKind, RotationSpec};
use qvlm_core::quant::spec::{Granularity, RangeMode, WeightSpec};
use qvlm_core::quant::uniform::Grid;
use qvlm_search::calib::CalibrationSet;
use qvlm_search::engine::WeightMethod;
use qvlm_search::gptq::GptqSettings;
use qvlm_search::model::{with_answers, SearchModel};
use qvlm_search::partition::Threshold;
use qvlm_search::plan::{apply, ActScheme, QuantPlan, Scheme, TowerScheme};
use qvlm_search::smoothquant::SmoothSettings;
use qvlm_search::strategy::config::{
    BaseStrategy, BlockedConfig, CandidateGrid, Proxy, RuleKind, StrategyConfig, VeoConfig,
};
use tch::Tensor;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures")
}

fn easy_vqa_train_image(id: usize) -> PathBuf {
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/lib");
    let py = std::fs::read_dir(&lib).expect(".venv/lib").flatten().next().expect("python").path();
    py.join("site-packages/easy_vqa/data/train/images").join(format!("{id}.png"))
}

/// The checkpoint at `dir` and eight calibration chats: the two fixture images (70 × 60 and
/// 130 × 90 px) and six easy-VQA images (64 × 64), each with a question and its answer.
fn setup(dir: &Path) -> (Qwen2VlBundle, CalibrationSet) {
    let bundle = Qwen2VlBundle::load(dir, &LoadOptions::default()).expect("checkpoint");
    let shared = fixtures().join("qwen2vl/tiny");
    let mut paths = vec![shared.join("image_0.png"), shared.join("image_1.png")];
    paths.extend((0..6).map(easy_vqa_train_image));
    let questions = ["what color is the shape?", "is there a circle in the image?"];
    let answers = ["blue", "no"];
    let (mut pixels, mut grids, mut prompts, mut ans) = (vec![], vec![], vec![], vec![]);
    for (i, path) in paths.iter().enumerate() {
        let image = Rgb8::open(path).expect("image");
        let (p, grid) = bundle.images.preprocess(&image).expect("preprocess");
        pixels.push(p);
        grids.push(grid);
        prompts.push(bundle.chat_pieces(questions[i % 2]).expect("chat"));
        let mut a = bundle.tokenizer.encode_text(answers[i % 2], false).expect("answer");
        a.push(bundle.eos_token_ids[0]);
        ans.push(a);
    }
    let calib = CalibrationSet { pixels: Tensor::cat(&pixels, 0), grids, prompts, answers: ans };
    (bundle, calib)
}

/// W4A4 with 4-bit groups of 16 (the tiny towers are 32 and 48 wide), static per-channel
/// activations in both towers. (The paper's static per-token vision ranges need a fixed token
/// count; Qwen2-VL's images differ in patches: an error, tested below.)
fn w4a4() -> Scheme {
    let weight = Some(WeightSpec::Rtn {
        grid: Grid::new(4, false).expect("grid"),
        granularity: Granularity::PerGroup { size: 16 },
    });
    let act = |granularity| {
        Some(ActScheme { bits: 4, symmetric: false, granularity, range: RangeMode::Static })
    };
    Scheme {
        vision: TowerScheme { weight, act: act(Granularity::PerChannel) },
        projector: TowerScheme::default(),
        language: TowerScheme { weight, act: act(Granularity::PerChannel) },
    }
}

fn blocked() -> BaseStrategy {
    BaseStrategy::EntropyBlocked(BlockedConfig {
        proxy: Proxy::Entropy,
        rule: RuleKind::Eq7,
        h0: Threshold::Quantile(0.3),
        ..BlockedConfig::default()
    })
}

fn run(
    bundle: &mut Qwen2VlBundle,
    calib: &CalibrationSet,
    weights: WeightMethod,
    strategy: &StrategyConfig,
) -> QuantPlan {
    let mut progress = |_: usize, _: usize, _: &str| {};
    qvlm_search::strategy::run(&mut bundle.model, calib, w4a4(), weights, strategy, &mut progress)
        .unwrap_or_else(|e| panic!("{}: {e}", strategy.name()))
}

/// The fake-quantized model's logits on the calibration chats (answers appended).
fn quantized_logits(dir: &Path, calib: &CalibrationSet, plan: &QuantPlan) -> Tensor {
    let mut fresh = Qwen2VlBundle::load(dir, &LoadOptions::default()).expect("reload");
    let mut hook = apply(&mut fresh.model, plan).expect("apply");
    let _guard = tch::no_grad_guard();
    let pass = fresh.model.forward_hidden(calib, &with_answers(calib), &mut hook, false);
    SearchModel::head(&fresh.model, &pass.expect("forward").hidden)
}

fn every_strategy_runs(family: &str) {
    let dir = fixtures().join(family).join("tiny");
    let (mut bundle, calib) = setup(&dir);
    let tokens: std::collections::BTreeSet<i64> =
        calib.grids.iter().map(|g| g.iter().product::<i64>() / 4).collect();
    assert!(tokens.len() >= 2, "{family}: image-token counts should vary: {tokens:?}");
    let sites = bundle.model.sites();
    let vision_slots: Vec<Slot> = sites
        .iter()
        .filter(|s| s.block == qvlm_search::site::Block::Vision(0))
        .flat_map(|s| s.consumers.iter().map(|c| c.slot))
        .collect();
    let qwen25 = family == "qwen2_5_vl";
    let mlp = if qwen25 {
        vec![Slot::GateProj, Slot::UpProj, Slot::DownProj]
    } else {
        vec![Slot::Fc1, Slot::Fc2]
    };
    assert_eq!(vision_slots, [vec![Slot::Qkv, Slot::Proj], mlp].concat(), "{family}");
    // Every linear is some site's consumer, once.
    let consumers: usize = sites.iter().map(|s| s.consumers.len()).sum();
    assert_eq!(consumers, bundle.model.linears().len(), "{family}");
    let before: Vec<Tensor> =
        bundle.model.linears().iter().map(|l| l.float_weight().copy()).collect();
    let veo = VeoConfig { epochs: 1, batch_size: 4, ..VeoConfig::default() };
    let runs: Vec<(WeightMethod, StrategyConfig)> = vec![
        (WeightMethod::Plain, BaseStrategy::Rtn {}.into()),
        (
            WeightMethod::Plain,
            BaseStrategy::Sequential { candidates: CandidateGrid::default() }.into(),
        ),
        (WeightMethod::Plain, blocked().into()),
        (WeightMethod::Plain, StrategyConfig::Disentangled { veo, then: blocked() }),
        (
            WeightMethod::Awq { grid: 5, clip_steps: 3, sites: Default::default() },
            BaseStrategy::Rtn {}.into(),
        ),
        (WeightMethod::Gptq(GptqSettings::default()), BaseStrategy::Rtn {}.into()),
        (WeightMethod::SmoothQuant(SmoothSettings::default()), BaseStrategy::Rtn {}.into()),
    ];
    for (weights, strategy) in &runs {
        let name = format!("{family} {} with {weights:?}", strategy.name());
        let plan = run(&mut bundle, &calib, *weights, strategy);
        assert_eq!(plan.sites.len(), sites.len(), "{name}: every site planned");
        assert!(
            plan.sites.iter().all(|sp| sp.act.is_some() == (sp.site.tower() != Tower::Projector)),
            "{name}: vision and language sites quantized, the merger in float"
        );
        let merger = 2;
        assert_eq!(plan.weights.len(), bundle.model.linears().len() - merger, "{name}");
        for (l, w) in bundle.model.linears().iter().zip(&before) {
            let moved = (l.float_weight() - w).abs().max().double_value(&[]);
            assert_eq!(moved, 0.0, "{name}: the search changed {}", l.id);
        }
        // Candidates are counted where something is searched (AWQ searches its scales).
        let searched = !matches!(strategy, StrategyConfig::Base(BaseStrategy::Rtn {}))
            || matches!(weights, WeightMethod::Awq { .. });
        assert_eq!(plan.cost.candidate_evaluations > 0, searched, "{name}: candidates counted");
        if let StrategyConfig::Disentangled { .. } = strategy {
            let veo = plan.veo.as_ref().expect("VEO's record");
            assert!(!veo.rounds.is_empty(), "{name}: VEO rounds recorded");
        }
        if matches!(weights, WeightMethod::Awq { .. } | WeightMethod::SmoothQuant(_)) {
            let scaled = plan.sites.iter().filter(|sp| sp.input_scale.is_some()).count();
            assert!(scaled > 0, "{name}: input scales searched");
        }
        let json = serde_json::to_string(&plan).expect("serialize");
        assert_eq!(serde_json::from_str::<QuantPlan>(&json).expect("parse"), plan, "{name}");
        let logits = quantized_logits(&dir, &calib, &plan);
        let finite = logits.isfinite().all().int64_value(&[]) == 1;
        assert!(finite, "{name}: the quantized model's logits are not finite");
    }
    // Rotation + Q-VLM (#17's `rotation_qvlm`): searched on the rotated model, the plan records
    // the rotation and rotates an unrotated model it is applied to.
    let spec = RotationSpec { kind: RotationKind::Hadamard, seed: 0 };
    let mut rotated = Qwen2VlBundle::load(&dir, &LoadOptions::default()).expect("checkpoint");
    SearchModel::rotate(&mut rotated.model, &spec).expect("rotate");
    let plan = run(&mut rotated, &calib, WeightMethod::Plain, &runs[3].1);
    assert_eq!(plan.rotation, Some(spec), "{family}: the plan records the rotation");
    let logits = quantized_logits(&dir, &calib, &plan);
    assert!(logits.isfinite().all().int64_value(&[]) == 1, "{family}: rotated plan");
}

#[test]
fn every_strategy_and_weight_method_runs_on_qwen2_vl() {
    every_strategy_runs("qwen2vl");
}

#[test]
fn every_strategy_and_weight_method_runs_on_qwen2_5_vl() {
    every_strategy_runs("qwen2_5_vl");
}

#[test]
fn a_calibration_set_of_the_other_family_is_an_error_naming_it() {
    let dir = fixtures().join("qwen2vl/tiny");
    let (mut bundle, calib) = setup(&dir);
    // LLaVA-shaped pixels for a Qwen2-VL model.
    let square = CalibrationSet {
        pixels: Tensor::zeros(
            [calib.len() as i64, 3, 28, 28],
            (tch::Kind::Float, tch::Device::Cpu),
        ),
        grids: vec![],
        prompts: calib.prompts.clone(),
        answers: calib.answers.clone(),
    };
    let mut progress = |_: usize, _: usize, _: &str| {};
    let err = qvlm_search::strategy::run(
        &mut bundle.model,
        &square,
        w4a4(),
        WeightMethod::Plain,
        &BaseStrategy::Rtn {}.into(),
        &mut progress,
    )
    .expect_err("square images for Qwen2-VL");
    assert!(err.to_string().contains("Qwen2-VL takes each sample's patches"), "{err}");
    // Grids that do not account for the patches.
    let mut short = calib.slice(0, calib.len());
    short.grids[0][1] += 2;
    let err = qvlm_search::strategy::run(
        &mut bundle.model,
        &short,
        w4a4(),
        WeightMethod::Plain,
        &BaseStrategy::Rtn {}.into(),
        &mut progress,
    )
    .expect_err("grids and patches disagree");
    assert!(err.to_string().contains("patches"), "{err}");
    // Static per-token vision ranges: one range per token position, which differs per image.
    let mut per_token = w4a4();
    per_token.vision.act = Some(ActScheme {
        bits: 4,
        symmetric: false,
        granularity: Granularity::PerToken,
        range: RangeMode::Static,
    });
    let err = qvlm_search::strategy::run(
        &mut bundle.model,
        &calib,
        per_token,
        WeightMethod::Plain,
        &BaseStrategy::Rtn {}.into(),
        &mut progress,
    )
    .expect_err("static per-token vision ranges");
    assert!(err.to_string().contains("different number of patches per image"), "{err}");
}
