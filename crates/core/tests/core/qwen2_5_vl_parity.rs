//! Qwen2.5-VL against HF transformers on a tiny random checkpoint
//! (python/gen_qwen2_5_vl_fixtures.py): the vision tower (RMSNorm, SwiGLU, window attention in
//! block 0 over ragged windows, full attention in block 1) and merger on two images of different
//! sizes at once, the whole model's logits with both images, greedy generation, a chat turn with
//! the checkpoint's tokenizer and chat template; both key layouts.

use std::path::PathBuf;

use qvlm_core::hook::NoHook;
use qvlm_core::io::chat_template::ChatTemplate;
use qvlm_core::io::config::{Qwen2VisionKind, Qwen2VlConfig};
use qvlm_core::io::image::Rgb8;
use qvlm_core::io::safetensors::SafetensorsFile;
use qvlm_core::model::llava::{GenerateOptions, LoadOptions};
use qvlm_core::model::qwen2_vl::{window_order, GridThw, Qwen2Vl, Qwen2VlBundle, Qwen2VlPrompt};
use tch::Tensor;

use super::common::max_abs_diff;

/// f32, as for Qwen2-VL and LLaVA.
const VISION_ATOL_F32: f64 = 1e-5;
const LOGITS_ATOL_F32: f64 = 1e-4;

const GENERATOR_VERSION: &str = "generator 3";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl")
}

fn expected() -> SafetensorsFile {
    SafetensorsFile::open(&fixture().join("tiny/expected.safetensors")).expect("expected")
}

fn model(name: &str) -> Qwen2Vl {
    Qwen2Vl::load(&fixture().join(name), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn ints(e: &SafetensorsFile, key: &str) -> Vec<i64> {
    Vec::<i64>::try_from(&e.read(key).expect(key).reshape([-1])).expect(key)
}

fn grids(e: &SafetensorsFile) -> Vec<GridThw> {
    ints(e, "grid_thw_both").chunks_exact(3).map(|g| [g[0], g[1], g[2]]).collect()
}

#[test]
fn the_fixtures_come_from_the_recorded_generator_and_parse_as_qwen2_5_vl() {
    let version = std::fs::read_to_string(fixture().join("VERSION")).expect("VERSION");
    assert!(version.starts_with(GENERATOR_VERSION), "{version}");
    let cfg = Qwen2VlConfig::from_json(&fixture().join("tiny/config.json")).expect("config");
    assert_eq!(
        cfg.vision.kind,
        Qwen2VisionKind::Qwen25Vl { window_size: 56, fullatt_block_indexes: vec![1] }
    );
    assert_eq!((cfg.vision.embed_dim, cfg.vision.hidden_size), (32, 48));
}

#[test]
fn window_order_cuts_ragged_windows_like_transformers() {
    // 6×10 patches merged 2×2: a 3×5 grid of merge blocks in windows of 2×2 blocks: two window
    // rows (2 and 1 blocks high) by three columns (2, 2 and 1 blocks wide).
    let (order, windows) = window_order(&[[1, 6, 10]], 2, 2);
    assert_eq!(order, [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
    assert_eq!(windows, [16, 16, 8, 8, 8, 4]);
    // A second image continues the numbering.
    let (order, windows) = window_order(&[[1, 4, 4], [1, 2, 2]], 2, 2);
    assert_eq!(order, [0, 1, 2, 3, 4]);
    assert_eq!(windows, [16, 4]);
}

#[test]
fn vision_tower_and_merger_match_transformers_with_window_attention() {
    let _guard = tch::no_grad_guard();
    let e = expected();
    let pixels = e.read("pixel_values_both").expect("pixels");
    let grid = grids(&e);
    for name in ["tiny", "tiny_model_prefixed"] {
        let out = model(name).visual.forward(&pixels, &grid, &mut NoHook).expect("forward");
        let dh = max_abs_diff(&out.hidden, &e.read("vision_hidden_both").expect("hidden"));
        let dm = max_abs_diff(&out.merged, &e.read("merged_both").expect("merged"));
        eprintln!("{name}: hidden {dh:.2e}, merged {dm:.2e}");
        assert!(dh <= VISION_ATOL_F32, "{name}: hidden states differ by {dh}");
        assert!(dm <= VISION_ATOL_F32, "{name}: merged tokens differ by {dm}");
    }
}

#[test]
fn whole_model_logits_and_greedy_tokens_match_transformers() {
    let _guard = tch::no_grad_guard();
    let e = expected();
    let pixels = e.read("pixel_values_both").expect("pixels");
    let grid = grids(&e);
    let model = model("tiny");
    let tokens = model.image_tokens(&pixels, &grid, &mut NoHook).expect("images");
    let ids = ints(&e, "lm_input_ids_both");
    let prompt = Qwen2VlPrompt { ids: &ids, grids: &grid, image_tokens: Some(&tokens) };
    let batch = model.prepare(&[prompt]).expect("prepare");
    let logits = model.logits(&batch, &mut NoHook).expect("logits").squeeze_dim(0);
    let d = max_abs_diff(&logits, &e.read("lm_logits_both").expect("logits"));
    eprintln!("logits {d:.2e}");
    assert!(d <= LOGITS_ATOL_F32, "logits differ by {d}");

    // Greedy generation with the second image alone.
    let one: Vec<GridThw> = vec![grid[1]];
    let patches = grid[0].iter().product::<i64>();
    let pixels_1: Tensor = pixels.narrow(0, patches, pixels.size()[0] - patches);
    let tokens = model.image_tokens(&pixels_1, &one, &mut NoHook).expect("image 1");
    let ids = ints(&e, "gen_input_ids");
    let prompt = Qwen2VlPrompt { ids: &ids, grids: &one, image_tokens: Some(&tokens) };
    let batch = model.prepare(&[prompt]).expect("prepare");
    let want = ints(&e, "gen_tokens");
    let eos = model.cfg.text.eos_token_ids.clone();
    let opts = GenerateOptions {
        max_new_tokens: want.len(),
        eos_token_ids: eos.clone(),
        ..GenerateOptions::default()
    };
    let out = model.generate(&batch, &opts, &mut NoHook).expect("generate");
    let want: Vec<i64> = want.into_iter().take_while(|t| !eos.contains(t)).collect();
    assert!(want.len() >= 4, "the fixture's greedy run is too short to test: {want:?}");
    assert_eq!(out.tokens, vec![want]);
}

#[test]
fn a_chat_turn_renders_tokenizes_and_answers_like_transformers() {
    let _guard = tch::no_grad_guard();
    let dir = fixture().join("tiny");
    let bundle = Qwen2VlBundle::load(&dir, &LoadOptions::default()).expect("bundle");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let e = expected();
    let question = meta["chat_prompt"].as_str().expect("prompt");
    let text = bundle.template.render(&ChatTemplate::user_turn(1, question), true).expect("render");
    assert_eq!(text, meta["chat_text"].as_str().expect("text"));
    // The image is the Qwen2-VL fixtures' (gen_qwen2_5_vl_fixtures.py reads it from there).
    let image_path =
        fixture().join("../qwen2vl/tiny").join(meta["chat_image"].as_str().expect("i"));
    let image = Rgb8::open(&image_path).expect("png");
    let (_, grid) = bundle.images.preprocess(&image).expect("preprocess");
    assert_eq!(bundle.chat_ids(question, &[grid]).expect("ids"), ints(&e, "chat_input_ids"));
    let (tokens, answer) = bundle.answer(question, &[image], 8, &mut NoHook).expect("answer");
    let want: Vec<i64> = ints(&e, "chat_tokens")
        .into_iter()
        .take_while(|t| !bundle.eos_token_ids.contains(t))
        .collect();
    assert!(want.len() >= 4, "the fixture's chat answer is too short to test: {want:?}");
    assert_eq!(tokens, want);
    assert_eq!(answer, meta["chat_answer"].as_str().expect("answer"));
}

#[test]
fn bf16_logits_match_transformers_bf16() {
    super::qwen2vl_parity::check_bf16_logits(&fixture().join("tiny"));
}
