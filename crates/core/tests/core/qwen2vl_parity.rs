//! Qwen2-VL against HF transformers on a tiny random checkpoint (python/gen_qwen2vl_fixtures.py):
//! the image processor, vision tower and patch merger for two images of different sizes (16 and 60
//! patches), alone and together; M-RoPE positions; the whole model's logits with both images and
//! with text only, and greedy generation; both key layouts.

use std::path::PathBuf;

use qvlm_core::hook::NoHook;
use qvlm_core::io::config::{Qwen2VisionConfig, Qwen2VlConfig};
use qvlm_core::io::image::Rgb8;
use qvlm_core::io::naming::Naming;
use qvlm_core::io::qwen2_image::{Qwen2ImageConfig, Qwen2ImageProcessor};
use qvlm_core::io::safetensors::SafetensorsFile;
use qvlm_core::io::shards::ShardSet;
use qvlm_core::io::weights::VarBuilder;
use qvlm_core::model::llava::{DecodePath, GenerateOptions, LoadOptions};
use qvlm_core::model::qwen2_vl::{
    mrope_positions, GridThw, Qwen2VisionTower, Qwen2Vl, Qwen2VlBundle, Qwen2VlPrompt,
};
use tch::{Device, Kind, Tensor};

use super::common::{max_abs_diff, TempDir};

/// f32: the tower's last hidden states and the merger's outputs (the LLaVA fixtures' bound for
/// vision features).
const VISION_ATOL_F32: f64 = 1e-5;

/// f32 pixel values: Pillow's resize is reproduced bit for bit on 8-bit RGB; only the float
/// rescale/normalize can round differently.
const PIXEL_ATOL: f64 = 1e-6;

/// f32 logits of the whole model (LLaVA's bound).
const LOGITS_ATOL_F32: f64 = 1e-4;

const GENERATOR_VERSION: &str = "generator 3";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2vl")
}

/// The tower of checkpoint `name` (`tiny`: Qwen's layout, as transformers 5.x writes it;
/// `tiny_model_prefixed`: the same weights in transformers 4.52–4.57's layout).
fn tower_of(name: &str, layout: Naming) -> Qwen2VisionTower {
    let dir = fixture().join(name);
    let cfg = Qwen2VisionConfig::from_json(&dir.join("config.json")).expect("vision_config");
    let set = ShardSet::open_dir(&dir).expect("checkpoint");
    let naming = Naming::detect_qwen2_vl(&set, &dir).expect("layout");
    assert_eq!(naming, layout, "{name}");
    let vb = VarBuilder::from_checkpoint(vec![set], naming, Device::Cpu, Kind::Float);
    Qwen2VisionTower::load(&vb.pp("visual"), &cfg).expect("vision tower")
}

fn tower() -> Qwen2VisionTower {
    tower_of("tiny", Naming::Qwen2Vl)
}

fn grids(t: &tch::Tensor) -> Vec<GridThw> {
    let v = Vec::<i64>::try_from(&t.reshape([-1])).expect("grid");
    v.chunks_exact(3).map(|g| [g[0], g[1], g[2]]).collect()
}

#[test]
fn the_fixtures_come_from_the_recorded_generator() {
    let version = std::fs::read_to_string(fixture().join("VERSION")).expect("VERSION");
    assert!(version.starts_with(GENERATOR_VERSION), "{version}");
}

#[test]
fn vision_tower_and_merger_match_transformers_for_two_image_sizes() {
    let _guard = tch::no_grad_guard();
    let tower = tower();
    let expected =
        SafetensorsFile::open(&fixture().join("tiny/expected.safetensors")).expect("ref");
    for i in 0..2 {
        let pixels = expected.read(&format!("pixel_values_{i}")).expect("pixels");
        let grid = grids(&expected.read(&format!("grid_thw_{i}")).expect("grid"));
        let out = tower.forward(&pixels, &grid, &mut NoHook).expect("forward");
        let hidden = expected.read(&format!("vision_hidden_{i}")).expect("hidden");
        let merged = expected.read(&format!("merged_{i}")).expect("merged");
        let m = tower.cfg.spatial_merge_size;
        assert_eq!(out.merged.size()[0], grid[0].iter().product::<i64>() / (m * m));
        let (dh, dm) = (max_abs_diff(&out.hidden, &hidden), max_abs_diff(&out.merged, &merged));
        assert!(dh <= VISION_ATOL_F32, "image {i} {grid:?}: hidden states differ by {dh}");
        assert!(dm <= VISION_ATOL_F32, "image {i} {grid:?}: merged tokens differ by {dm}");
    }
    // Both images in one call: attention must stay within each image.
    let pixels = expected.read("pixel_values_both").expect("pixels");
    let grid = grids(&expected.read("grid_thw_both").expect("grid"));
    assert_eq!(grid.len(), 2);
    let out = tower.forward(&pixels, &grid, &mut NoHook).expect("forward");
    let d = max_abs_diff(&out.merged, &expected.read("merged_both").expect("merged"));
    assert!(d <= VISION_ATOL_F32, "two images at once: merged tokens differ by {d}");
}

#[test]
fn the_image_processor_matches_transformers_patches_and_grids() {
    let dir = fixture().join("tiny");
    let cfg = Qwen2ImageConfig::from_json(&dir.join("preprocessor_config.json")).expect("config");
    assert_eq!((cfg.min_pixels, cfg.max_pixels), (56 * 56, 28 * 28 * 64));
    let processor = Qwen2ImageProcessor::new(cfg);
    let expected = SafetensorsFile::open(&dir.join("expected.safetensors")).expect("ref");
    let images: Vec<Rgb8> =
        (0..2).map(|i| Rgb8::open(&dir.join(format!("image_{i}.png"))).expect("png")).collect();
    for (i, image) in images.iter().enumerate() {
        let (patches, grid) = processor.preprocess(image).expect("preprocess");
        let want = grids(&expected.read(&format!("grid_thw_{i}")).expect("grid"));
        assert_eq!(vec![grid], want, "image {i}");
        let d = max_abs_diff(&patches, &expected.read(&format!("pixel_values_{i}")).expect("px"));
        assert!(d <= PIXEL_ATOL, "image {i}: pixel values differ by {d}");
    }
    let (patches, grid) = processor.preprocess_all(&images).expect("both");
    assert_eq!(grid, grids(&expected.read("grid_thw_both").expect("grid")));
    let d = max_abs_diff(&patches, &expected.read("pixel_values_both").expect("pixels"));
    assert!(d <= PIXEL_ATOL, "both images: pixel values differ by {d}");
}

#[test]
fn the_transformers_4_52_layout_loads_the_same_tower() {
    let _guard = tch::no_grad_guard();
    let expected =
        SafetensorsFile::open(&fixture().join("tiny/expected.safetensors")).expect("ref");
    let pixels = expected.read("pixel_values_both").expect("pixels");
    let grid = grids(&expected.read("grid_thw_both").expect("grid"));
    let prefixed = tower_of("tiny_model_prefixed", Naming::Qwen2VlModelPrefixed);
    let a = prefixed.forward(&pixels, &grid, &mut NoHook).expect("forward");
    let b = tower().forward(&pixels, &grid, &mut NoHook).expect("forward");
    assert_eq!(max_abs_diff(&a.merged, &b.merged), 0.0);
}

#[test]
fn mrope_positions_match_transformers_get_rope_index() {
    let dir = fixture().join("tiny");
    let expected = SafetensorsFile::open(&dir.join("expected.safetensors")).expect("ref");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("json");
    let image_token = config["image_token_id"].as_i64().expect("image_token_id");
    let ids = Vec::<i64>::try_from(&expected.read("mrope_input_ids").expect("ids").reshape([-1]))
        .expect("ids");
    let is_image: Vec<bool> = ids.iter().map(|&t| t == image_token).collect();
    let grid = grids(&expected.read("grid_thw_both").expect("grid"));
    let (positions, delta) = mrope_positions(&is_image, &grid, 2).expect("positions");
    let want = expected.read("mrope_positions").expect("positions");
    let want = Vec::<i64>::try_from(&want.reshape([-1])).expect("positions");
    let n = ids.len();
    let got: Vec<i64> = (0..3).flat_map(|c| positions.iter().map(move |p| p[c])).collect();
    assert_eq!(got, want, "[3, {n}] positions");
    let want_delta =
        Vec::<i64>::try_from(&expected.read("mrope_delta").expect("delta")).expect("delta");
    assert_eq!(vec![delta], want_delta);
    // A run of image tokens that does not match its grid, and a grid without a run, are errors.
    let mut short = is_image.clone();
    short[3] = false;
    assert!(mrope_positions(&short, &grid, 2).is_err());
    assert!(mrope_positions(&is_image, &[grid[0], grid[1], grid[1]], 2).is_err());
}

#[test]
fn grids_that_do_not_fit_the_pixels_are_named_errors() {
    let _guard = tch::no_grad_guard();
    let tower = tower();
    let len = tower.cfg.patch_len();
    let pixels = tch::Tensor::zeros([16, len], (Kind::Float, Device::Cpu));
    let err = tower.forward(&pixels, &[[1, 4, 6]], &mut NoHook).expect_err("24 ≠ 16 patches");
    assert!(err.to_string().contains("do not match the grids"), "{err}");
    let err = tower.forward(&pixels, &[[1, 4, 3]], &mut NoHook).expect_err("odd width");
    assert!(err.to_string().contains("spatial_merge_size"), "{err}");
}

fn model(name: &str) -> Qwen2Vl {
    Qwen2Vl::load(&fixture().join(name), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn ids_of(expected: &SafetensorsFile, key: &str) -> Vec<i64> {
    Vec::<i64>::try_from(&expected.read(key).expect(key).reshape([-1])).expect(key)
}

/// The whole model's logits `[T, vocab]` for `ids` with the images of `pixels`/`grid_key`.
fn logits(model: &Qwen2Vl, ids: &[i64], images: Option<(Tensor, Vec<GridThw>)>) -> Tensor {
    let tokens = images
        .as_ref()
        .map(|(pixels, grid)| model.image_tokens(pixels, grid, &mut NoHook).expect("images"));
    let grid = images.map(|(_, g)| g).unwrap_or_default();
    let prompt = Qwen2VlPrompt { ids, grids: &grid, image_tokens: tokens.as_ref() };
    let batch = model.prepare(&[prompt]).expect("prepare");
    model.logits(&batch, &mut NoHook).expect("logits").squeeze_dim(0)
}

#[test]
fn whole_model_logits_match_transformers_with_two_images_and_with_text_only() {
    let _guard = tch::no_grad_guard();
    let expected =
        SafetensorsFile::open(&fixture().join("tiny/expected.safetensors")).expect("ref");
    let pixels = expected.read("pixel_values_both").expect("pixels");
    let grid = grids(&expected.read("grid_thw_both").expect("grid"));
    for name in ["tiny", "tiny_model_prefixed"] {
        let model = model(name);
        let ids = ids_of(&expected, "lm_input_ids_both");
        let got = logits(&model, &ids, Some((pixels.shallow_clone(), grid.clone())));
        let d = max_abs_diff(&got, &expected.read("lm_logits_both").expect("logits"));
        assert!(d <= LOGITS_ATOL_F32, "{name}, two images: logits differ by {d}");
        let ids = ids_of(&expected, "lm_input_ids_text");
        let got = logits(&model, &ids, None);
        let d = max_abs_diff(&got, &expected.read("lm_logits_text").expect("logits"));
        assert!(d <= LOGITS_ATOL_F32, "{name}, text only: logits differ by {d}");
    }
}

/// bf16: our bf16 run against transformers' bf16 run of the same weights may differ by this
/// multiple of transformers' own bf16-vs-f32 gap on the same prompt (two bf16 implementations
/// round at different places; measured: see the test's output).
pub(super) const BF16_GAP_FACTOR: f64 = 2.0;

/// Our bf16 logits against transformers' bf16 logits (both images), within
/// [`BF16_GAP_FACTOR`] × transformers' own bf16-vs-f32 gap.
pub(super) fn check_bf16_logits(dir: &std::path::Path) {
    let _guard = tch::no_grad_guard();
    let expected = SafetensorsFile::open(&dir.join("expected.safetensors")).expect("ref");
    let opts = LoadOptions { dtype: qvlm_core::device::DType::Bf16, ..LoadOptions::default() };
    let model = Qwen2Vl::load(dir, &opts).expect("bf16 checkpoint");
    assert_eq!(model.kind(), Kind::BFloat16);
    let pixels = expected.read("pixel_values_both").expect("pixels");
    let grid = grids(&expected.read("grid_thw_both").expect("grid"));
    let ids = ids_of(&expected, "lm_input_ids_both");
    let got = logits(&model, &ids, Some((pixels, grid))).to_kind(Kind::Float);
    let theirs = expected.read("lm_logits_both_bf16").expect("bf16 logits");
    let gap = max_abs_diff(&theirs, &expected.read("lm_logits_both").expect("f32 logits"));
    let d = max_abs_diff(&got, &theirs);
    eprintln!(
        "{}: bf16 vs transformers' bf16 {d:.4} (its own bf16-vs-f32 gap {gap:.4})",
        dir.display()
    );
    assert!(d <= BF16_GAP_FACTOR * gap, "bf16 logits differ by {d} (transformers' gap {gap})");
}

#[test]
fn bf16_logits_match_transformers_bf16() {
    check_bf16_logits(&fixture().join("tiny"));
}

#[test]
fn greedy_generation_matches_transformers_generate() {
    let _guard = tch::no_grad_guard();
    let expected =
        SafetensorsFile::open(&fixture().join("tiny/expected.safetensors")).expect("ref");
    let model = model("tiny");
    let pixels = expected.read("pixel_values_1").expect("pixels");
    let grid = grids(&expected.read("grid_thw_1").expect("grid"));
    let tokens = model.image_tokens(&pixels, &grid, &mut NoHook).expect("images");
    let ids = ids_of(&expected, "gen_input_ids");
    let prompt = Qwen2VlPrompt { ids: &ids, grids: &grid, image_tokens: Some(&tokens) };
    let batch = model.prepare(&[prompt]).expect("prepare");
    let want = ids_of(&expected, "gen_tokens");
    let eos = model.cfg.text.eos_token_ids.clone();
    let opts = GenerateOptions {
        max_new_tokens: want.len(),
        eos_token_ids: eos.clone(),
        ..GenerateOptions::default()
    };
    let out = model.generate(&batch, &opts, &mut NoHook).expect("generate");
    let want: Vec<i64> = want.into_iter().take_while(|t| !eos.contains(t)).collect();
    assert!(want.len() >= 4, "the fixture's greedy run is too short to test: {want:?}");
    assert_eq!(out.tokens, vec![want.clone()]);
    // The fused decode path (M-RoPE's three equal text components as one position): the same
    // tokens.
    let fused = GenerateOptions { decode: DecodePath::Fused, ..opts.clone() };
    let out = model.generate(&batch, &fused, &mut NoHook).expect("generate on the fused path");
    assert_eq!(out.tokens, vec![want], "fused decode path");
}

#[test]
fn a_left_padded_batch_gives_each_prompt_its_own_logits() {
    let _guard = tch::no_grad_guard();
    let expected =
        SafetensorsFile::open(&fixture().join("tiny/expected.safetensors")).expect("ref");
    let model = model("tiny");
    let pixels = expected.read("pixel_values_1").expect("pixels");
    let grid = grids(&expected.read("grid_thw_1").expect("grid"));
    let tokens = model.image_tokens(&pixels, &grid, &mut NoHook).expect("images");
    let with_image = ids_of(&expected, "gen_input_ids");
    let text = ids_of(&expected, "lm_input_ids_text");
    let prompts = [
        Qwen2VlPrompt { ids: &with_image, grids: &grid, image_tokens: Some(&tokens) },
        Qwen2VlPrompt { ids: &text, grids: &[], image_tokens: None },
    ];
    let batch = model.prepare(&prompts).expect("prepare");
    let both = model.logits(&batch, &mut NoHook).expect("logits");
    let t = both.size()[1];
    for (row, prompt) in prompts.iter().enumerate() {
        let alone = model.prepare(std::slice::from_ref(prompt)).expect("prepare");
        let alone = model.logits(&alone, &mut NoHook).expect("logits").squeeze_dim(0);
        let len = prompt.ids.len() as i64;
        let padded = both.get(row as i64).narrow(0, t - len, len);
        let d = max_abs_diff(&padded, &alone);
        assert!(d <= LOGITS_ATOL_F32, "row {row}: padded batch differs by {d}");
    }
    // Placeholders without image tokens (and the reverse) are errors, not silent text.
    let err = model
        .prepare(&[Qwen2VlPrompt { ids: &with_image, grids: &grid, image_tokens: None }])
        .expect_err("placeholders without images");
    assert!(err.to_string().contains("image placeholder tokens"), "{err}");
}

#[test]
fn the_flat_config_qwen_released_parses_like_transformers_5() {
    let dir = fixture().join("tiny");
    let nested = Qwen2VlConfig::from_json(&dir.join("config.json")).expect("config");
    assert!(nested.text.qkv_bias && !nested.text.attention_bias);
    assert_eq!(nested.text.mrope_section, Some([2, 1, 3]));
    assert_eq!(nested.text.head_dim, 12);
    // Qwen's own config.json (and transformers 4.x's): the text keys at the root, M-RoPE in
    // rope_scaling with type "mrope".
    let root: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("read"))
            .expect("json");
    let mut flat = root.as_object().expect("object").clone();
    let text = flat.remove("text_config").expect("text_config");
    for (k, v) in text.as_object().expect("object") {
        // The root keeps its own model_type (`qwen2_vl`, not the text part's `qwen2_vl_text`).
        if k != "model_type" {
            flat.insert(k.clone(), v.clone());
        }
    }
    flat.remove("rope_parameters");
    flat.insert("rope_theta".into(), serde_json::json!(1000000.0));
    flat.insert(
        "rope_scaling".into(),
        serde_json::json!({"type": "mrope", "mrope_section": [2, 1, 3]}),
    );
    let tmp = TempDir::new("qwen2vl-flat");
    let path = tmp.0.join("config.json");
    std::fs::write(&path, serde_json::Value::Object(flat.clone()).to_string()).expect("write");
    assert_eq!(Qwen2VlConfig::from_json(&path).expect("flat config"), nested);
    // A section that does not fill half a head is an error naming the key.
    flat.insert(
        "rope_scaling".into(),
        serde_json::json!({"type": "mrope", "mrope_section": [2, 2, 3]}),
    );
    std::fs::write(&path, serde_json::Value::Object(flat.clone()).to_string()).expect("write");
    let err = Qwen2VlConfig::from_json(&path).expect_err("7 ≠ 6");
    assert!(err.to_string().contains("rope_scaling.mrope_section"), "{err}");
    flat.insert("use_sliding_window".into(), serde_json::json!(true));
    std::fs::write(&path, serde_json::Value::Object(flat).to_string()).expect("write");
    let err = Qwen2VlConfig::from_json(&path).expect_err("sliding window");
    assert!(err.to_string().contains("use_sliding_window"), "{err}");
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture().join("tiny/expected.json")).expect("meta");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn a_chat_turn_renders_tokenizes_and_answers_like_transformers() {
    let _guard = tch::no_grad_guard();
    let dir = fixture().join("tiny");
    let bundle = Qwen2VlBundle::load(&dir, &LoadOptions::default()).expect("bundle");
    let meta = meta();
    let expected = SafetensorsFile::open(&dir.join("expected.safetensors")).expect("ref");
    let question = meta["chat_prompt"].as_str().expect("prompt");
    // The checkpoint's chat template (chat_template.jinja), rendered as apply_chat_template does.
    let text = bundle
        .template
        .render(&qvlm_core::io::chat_template::ChatTemplate::user_turn(1, question), true)
        .expect("render");
    assert_eq!(text, meta["chat_text"].as_str().expect("text"));
    // Tokenized, the image placeholder expanded to the image's 15 merged tokens.
    let image = Rgb8::open(&dir.join(meta["chat_image"].as_str().expect("image"))).expect("png");
    let (_, grid) = bundle.images.preprocess(&image).expect("preprocess");
    let ids = bundle.chat_ids(question, &[grid]).expect("ids");
    assert_eq!(ids, ids_of(&expected, "chat_input_ids"));
    // Greedy answer: generation_config.json's eos (305) stops it.
    let (tokens, answer) = bundle.answer(question, &[image], 8, &mut NoHook).expect("answer");
    let want: Vec<i64> = ids_of(&expected, "chat_tokens")
        .into_iter()
        .take_while(|t| !bundle.eos_token_ids.contains(t))
        .collect();
    assert_eq!(tokens, want);
    assert_eq!(answer, meta["chat_answer"].as_str().expect("answer"));
    // Placeholders and images must agree in number.
    let one_pad = bundle.tokenizer.encode_text(&text, true).expect("encode");
    let err = bundle.expand_image_pads(&one_pad, &[grid, grid]).expect_err("two grids, one pad");
    assert!(err.to_string().contains("1 `<|image_pad|>` placeholder(s) but 2 image(s)"), "{err}");
}

#[test]
fn the_chat_template_is_found_where_transformers_looks() {
    use qvlm_core::io::chat_template::ChatTemplate;
    let source = std::fs::read_to_string(fixture().join("tiny/chat_template.jinja")).expect("t");
    let turn = ChatTemplate::user_turn(1, "hi");
    let want = ChatTemplate::from_dir(&fixture().join("tiny")).expect("jinja").render(&turn, true);
    let want = want.expect("render");
    // Qwen's releases: chat_template.json for the processor …
    let tmp = TempDir::new("qwen2vl-chat");
    std::fs::write(
        tmp.0.join("chat_template.json"),
        serde_json::json!({"chat_template": source}).to_string(),
    )
    .expect("write");
    let t = ChatTemplate::from_dir(&tmp.0).expect("json");
    assert_eq!(t.render(&turn, true).expect("render"), want);
    // … and tokenizer_config.json's chat_template, a string or a list of named templates.
    std::fs::remove_file(tmp.0.join("chat_template.json")).expect("rm");
    let named = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}]});
    std::fs::write(tmp.0.join("tokenizer_config.json"), named.to_string()).expect("write");
    let t = ChatTemplate::from_dir(&tmp.0).expect("tokenizer_config");
    assert_eq!(t.render(&turn, true).expect("render"), want);
    std::fs::write(tmp.0.join("tokenizer_config.json"), "{}").expect("write");
    let err = ChatTemplate::from_dir(&tmp.0).expect_err("none");
    assert!(err.to_string().contains("no chat template"), "{err}");
}

#[test]
fn named_tensors_cover_every_stored_weight() {
    // Loading is strict (every stored key read); naming gives each weight back once, with the
    // stored element count (the patch embedding as the matrix it is held as).
    let model = model("tiny");
    let stored = SafetensorsFile::open(&fixture().join("tiny/model.safetensors")).expect("open");
    let named = model.named_tensors();
    assert_eq!(named.len(), stored.names().count());
    let numel = |t: &Tensor| t.numel();
    let total: usize = named.iter().map(|(_, t)| numel(t)).sum();
    let want: usize = stored.names().map(|n| numel(&stored.read(n).expect("read"))).sum();
    assert_eq!(total, want);
}
