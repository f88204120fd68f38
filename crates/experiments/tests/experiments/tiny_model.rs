//! The committed tiny LLaVA: transformers loads it and agrees with our logits; the planted-outlier
//! variant computes the same function.

use std::path::PathBuf;

use experiments::prompt::easy_vqa::prompt;
use experiments::tiny::train::TEMPLATE;
use qvlm_core::hook::NoHook;
use qvlm_core::io::prompt::Piece;
use qvlm_core::io::safetensors::SafetensorsFile;
use qvlm_core::model::llava::{GenerateOptions, LlavaBundle, LoadOptions};
use qvlm_core::model::outliers::{plant_outliers, plant_shifted_outliers, OutlierSpec, ShiftSpec};
use tch::Tensor;

/// f32 logits against transformers (the bound).
const LOGITS_ATOL_F32: f64 = 1e-4;
/// Planting multiplies and divides by s = 30: float rounding only.
const PLANTED_LOGITS_ATOL: f64 = 1e-3;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llava")
}

fn easy_vqa_test_image(id: u64) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lib = root.join(".venv/lib");
    let py =
        std::fs::read_dir(&lib).expect(".venv/lib").flatten().next().expect("python dir").path();
    py.join("site-packages/easy_vqa/data/test/images").join(format!("{id}.png"))
}

fn last_logits(
    bundle: &LlavaBundle,
    question: &str,
    image: &std::path::Path,
) -> (Vec<i64>, Tensor, Vec<i64>) {
    let model = &bundle.model;
    let _guard = tch::no_grad_guard();
    let pixels = bundle.images.preprocess_file(image).expect("image").unsqueeze(0);
    let feats = model.image_features(&pixels, &mut NoHook);
    let pieces =
        bundle.tokenizer.tokenize_prompt(&prompt(TEMPLATE, question), 1).expect("tokenize");
    let ids: Vec<i64> = pieces
        .iter()
        .flat_map(|p| match p {
            Piece::Tokens(t) => t.clone(),
            Piece::Image(_) => vec![model.cfg.image_token_id.unwrap_or(-1)],
        })
        .collect();
    let batch = model.prepare(&[pieces], &[feats]).expect("prepare");
    let logits = model.logits(&batch, &mut NoHook).get(0).get(-1);
    let gen = GenerateOptions {
        max_new_tokens: 4,
        eos_token_ids: bundle.eos_ids(),
        ..GenerateOptions::default()
    };
    let tokens = model.generate(&batch, &gen, &mut NoHook).expect("generate").tokens.remove(0);
    (ids, logits, tokens)
}

#[test]
fn transformers_loads_the_tiny_model_and_agrees_with_our_logits() {
    let dir = model_dir();
    let bundle = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load tiny model");
    let reference =
        SafetensorsFile::open(&dir.join("transformers_reference.safetensors")).expect("reference");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("transformers_reference.json")).expect("json"),
    )
    .expect("json");
    let questions = meta["questions"].as_array().expect("questions");
    assert!(questions.len() >= 16);
    for (i, q) in questions.iter().enumerate() {
        let image = easy_vqa_test_image(q["image_id"].as_u64().expect("id"));
        let (ids, logits, tokens) =
            last_logits(&bundle, q["question"].as_str().expect("q"), &image);
        let want_ids =
            Vec::<i64>::try_from(&reference.read(&format!("input_ids_{i}")).expect("ids"))
                .expect("ids");
        assert_eq!(ids, want_ids, "question {i}: input ids");
        let d = (logits - reference.read(&format!("logits_{i}")).expect("logits"))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= LOGITS_ATOL_F32, "question {i}: logits differ by {d}");
        let ours = bundle.tokenizer.decode(&tokens, true).expect("decode");
        assert_eq!(
            ours.trim(),
            q["transformers_answer"].as_str().expect("a"),
            "question {i}: greedy answer"
        );
    }
}

/// A function-preserving variant answers two test questions with the plain model's last-position
/// logits, within [`PLANTED_LOGITS_ATOL`].
fn assert_same_float_logits(plain: &LlavaBundle, variant: &LlavaBundle, name: &str) {
    let image = easy_vqa_test_image(0);
    for q in ["what color is the shape?", "is there not a red circle in the image?"] {
        let (_, a, _) = last_logits(plain, q, &image);
        let (_, b, _) = last_logits(variant, q, &image);
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d <= PLANTED_LOGITS_ATOL, "{q}: {name} logits differ by {d}");
    }
}

#[test]
fn planted_outlier_variant_keeps_float_logits() {
    let dir = model_dir();
    let plain = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    let mut planted = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    let report = plant_outliers(&mut planted.model, &OutlierSpec::default());
    assert_eq!(
        report.norms.len(),
        2 * (3 + 4),
        "two norms per vision layer used and per decoder layer"
    );
    assert!(report.norms.iter().all(|(_, c)| c.len() == 4));
    assert_same_float_logits(&plain, &planted, "planted");
    // The planted channels really are outliers at the decoder's first q_proj input.
    let ln = &planted.model.language_model.layers[0].input_layernorm.weight;
    let orig = &plain.model.language_model.layers[0].input_layernorm.weight;
    let ratio = (ln / orig).abs().max().double_value(&[]);
    assert!((ratio - 30.0).abs() < 1e-3, "{ratio}");
}

/// The shifted variant (issue #17): the vision LayerNorms' shifted channels are absorbed by the
/// consumers' biases, so the float logits stay those of the plain model, while every token's
/// input to the first q_proj now carries the offset.
#[test]
fn shifted_outlier_variant_keeps_float_logits() {
    let dir = model_dir();
    let plain = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    let mut shifted = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    let spec = ShiftSpec { channels: 2, shift: 300.0, seed: 0 };
    let report = plant_shifted_outliers(&mut shifted.model, &spec).expect("plant");
    assert_eq!(report.norms.len(), 2 * 3, "two norms per vision layer used");
    assert!(report.norms.iter().all(|(_, c)| c.len() == 2));
    assert_same_float_logits(&plain, &shifted, "shifted");
    // The shift is in the first norm's bias, by `shift` RMS gains, at the reported channels.
    let norm = &shifted.model.vision_tower.used_layers()[0].layer_norm1;
    let orig = &plain.model.vision_tower.used_layers()[0].layer_norm1;
    let rms_gain = orig.weight.square().mean(tch::Kind::Double).sqrt().double_value(&[]);
    let channels = &report.norms[0].1;
    for c in 0..orig.bias.size()[0] {
        let moved = norm.bias.double_value(&[c]) - orig.bias.double_value(&[c]);
        let expected = if channels.contains(&c) { 300.0 * rms_gain } else { 0.0 };
        assert!((moved - expected).abs() <= 1e-4 * 300.0 * rms_gain, "channel {c}: {moved}");
    }
    // A linear without a bias cannot absorb a shift: an error naming it.
    let mut no_bias = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    no_bias.model.vision_tower.used_layers_mut()[0].fc1.bias = None;
    let err = plant_shifted_outliers(&mut no_bias.model, &spec).expect_err("no bias");
    assert!(err.to_string().contains("fc1"), "{err}");
    // ... and leaves the model as it was.
    let untouched = &no_bias.model.vision_tower.used_layers()[0].layer_norm1.bias;
    assert!(untouched.equal(&orig.bias), "a failed plant changed a norm");
    for channels in [0, 65] {
        let bad = ShiftSpec { channels, ..spec };
        assert!(plant_shifted_outliers(&mut no_bias.model, &bad).is_err(), "{channels} channels");
    }
}

/// The committed tiny Qwen2-VL (issue #22, `configs/train-tiny-qwen2vl.toml`): transformers'
/// Qwen2VLForConditionalGeneration loads it (python/gen_tiny_qwen2vl_reference.py) and asks the
/// first test questions in its chat template; our prompt ids, last-position logits and greedy
/// answers agree, and its training record says it learned the task.
#[test]
fn transformers_loads_the_tiny_qwen2_vl_and_agrees_with_our_logits() {
    use qvlm_core::io::image::Rgb8;
    use qvlm_core::model::qwen2_vl::{Qwen2VlBundle, Qwen2VlPrompt};
    let _guard = tch::no_grad_guard();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-qwen2-vl");
    let bundle = Qwen2VlBundle::load(&dir, &LoadOptions::default()).expect("tiny Qwen2-VL");
    let reference =
        SafetensorsFile::open(&dir.join("transformers_reference.safetensors")).expect("reference");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("transformers_reference.json")).expect("json"),
    )
    .expect("json");
    let questions = meta["questions"].as_array().expect("questions");
    assert!(questions.len() >= 16);
    for (i, q) in questions.iter().enumerate() {
        let question = q["question"].as_str().expect("q");
        let image =
            Rgb8::open(&easy_vqa_test_image(q["image_id"].as_u64().expect("id"))).expect("image");
        let (pixels, grid) = bundle.images.preprocess(&image).expect("preprocess");
        let ids = bundle.chat_ids(question, &[grid]).expect("ids");
        let want_ids =
            Vec::<i64>::try_from(&reference.read(&format!("input_ids_{i}")).expect("ids"))
                .expect("ids");
        assert_eq!(ids, want_ids, "question {i}: input ids");
        let tokens = bundle.model.image_tokens(&pixels, &[grid], &mut NoHook).expect("tokens");
        let prompt = Qwen2VlPrompt { ids: &ids, grids: &[grid], image_tokens: Some(&tokens) };
        let batch = bundle.model.prepare(&[prompt]).expect("prepare");
        let logits = bundle.model.logits(&batch, &mut NoHook).expect("logits").get(0).get(-1);
        let d = (logits - reference.read(&format!("logits_{i}")).expect("logits"))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= LOGITS_ATOL_F32, "question {i}: logits differ by {d}");
        let (_, answer) = bundle.answer(question, &[image], 4, &mut NoHook).expect("answer");
        let want = q["transformers_answer"].as_str().expect("a");
        assert_eq!(answer.trim(), want, "question {i}: greedy answer");
    }
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("training.json")).expect("training.json"),
    )
    .expect("json");
    let accuracy = record["test_accuracy"]["overall"].as_f64().expect("accuracy");
    assert!(accuracy > 90.0, "the tiny Qwen2-VL's test accuracy is {accuracy}");
}
