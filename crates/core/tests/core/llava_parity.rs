//! Parity with HF transformers (the reference implementation of LLaVA, CLIP and LLaMA) on tiny
//! random checkpoints in every supported key layout; see python/gen_llava_fixtures.py.

use std::path::Path;

use qvlm_core::device::DType;
use qvlm_core::hook::{LinearHook, NoHook};
use qvlm_core::io::image::{AspectMode, ImageProcessor, ImageProcessorConfig, Rgb8};
use qvlm_core::io::prompt::Piece;
use qvlm_core::io::safetensors::SafetensorsFile;
use qvlm_core::layer_id::LayerId;
use qvlm_core::model::llava::{
    DecodePath, GenerateOptions, LlavaBundle, LoadOptions, PreparedBatch,
};
use serde_json::Value;

use super::common::{fixture_pixels, llava_fixtures, max_abs_diff};

/// f32: pixel values after PIL-exact resizing differ only by float rounding of rescale/normalize.
const PIXEL_ATOL: f64 = 1e-6;
/// JPEG: the `image` crate's decoder (zune-jpeg) is not bit-identical to PIL's libjpeg-turbo; after
/// the bicubic resize the worst pixel differs by a few 8-bit levels (≈ 0.07 after normalization).
const JPEG_PIXEL_ATOL: f64 = 0.1;
/// f32: vision hidden states and projector outputs.
const HIDDEN_ATOL_F32: f64 = 1e-5;
/// f32: logits (the bound).
const LOGITS_ATOL_F32: f64 = 1e-4;
/// f16: our f16 logits against transformers' f32 logits (11 mantissa bits).
const LOGITS_ATOL_F16_VS_F32: f64 = 0.05;
/// bf16: logits of our bf16 run against transformers' bf16 run. bf16 keeps 8 mantissa bits; on this
/// fixture transformers' own bf16 logits differ from its f32 logits by 0.22 (max |logit| 5.4), so two
/// bf16 implementations agree to about that much.
const LOGITS_ATOL_BF16: f64 = 0.3;

const GENERATOR_VERSION: &str = "generator 1";

fn expected(dir: &Path) -> (SafetensorsFile, Value) {
    let tensors =
        SafetensorsFile::open(&dir.join("expected.safetensors")).expect("expected.safetensors");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    (tensors, meta)
}

fn ids(meta: &Value, key: &str) -> Vec<i64> {
    meta[key].as_array().expect("array").iter().map(|v| v.as_i64().expect("int")).collect()
}

fn flatten(pieces: &[Piece], image_token: i64) -> Vec<i64> {
    pieces
        .iter()
        .flat_map(|p| match p {
            Piece::Tokens(t) => t.clone(),
            Piece::Image(_) => vec![image_token],
        })
        .collect()
}

fn check_fixture(name: &str, dtype: DType) {
    let dir = llava_fixtures().join(name);
    let opts = LoadOptions { dtype, ..LoadOptions::default() };
    let bundle = LlavaBundle::load(&dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (exp, meta) = expected(&dir);
    let model = &bundle.model;

    // Tokenization: transformers' tokenizer (llava-hf) or LLaVA's tokenizer_image_token (original,
    // where the image is -200).
    let prompt = meta["prompt"].as_str().expect("prompt");
    let pieces = bundle.tokenizer.tokenize_prompt(prompt, 1).expect("tokenize");
    let image_marker = model.cfg.image_token_id.unwrap_or(-200);
    assert_eq!(flatten(&pieces, image_marker), ids(&meta, "input_ids"), "{name}: input ids");

    // Preprocessing → vision tower → projector → logits.
    let image = llava_fixtures().join(meta["image"].as_str().expect("image"));
    let pixels = bundle.images.preprocess_file(&image).expect("image").unsqueeze(0);
    let _guard = tch::no_grad_guard();
    let feats = model.vision_tower.forward(&pixels.to_kind(model.kind()), &mut NoHook);
    let projected = model.projector.forward(&feats, &mut NoHook);
    let batch = model.prepare(&[pieces], &[projected.shallow_clone()]).expect("prepare");
    let logits = model.logits(&batch, &mut NoHook).squeeze_dim(0);
    if dtype == DType::F32 {
        let d = max_abs_diff(&feats.squeeze_dim(0), &exp.read("vision_hidden").expect("t"));
        assert!(d <= HIDDEN_ATOL_F32, "{name}: vision hidden differs by {d}");
        let d = max_abs_diff(&projected.squeeze_dim(0), &exp.read("projected").expect("t"));
        assert!(d <= HIDDEN_ATOL_F32, "{name}: projector output differs by {d}");
        let d = max_abs_diff(&logits, &exp.read("logits").expect("t"));
        assert!(d <= LOGITS_ATOL_F32, "{name}: logits differ by {d}");
    } else {
        let d = max_abs_diff(&logits, &exp.read("logits_bf16").expect("t"));
        assert!(d <= LOGITS_ATOL_BF16, "{name}: bf16 logits differ by {d}");
    }

    // Greedy generation: the same tokens as transformers' generate(do_sample=False).
    let gen = GenerateOptions {
        max_new_tokens: meta["max_new_tokens"].as_u64().expect("n") as usize,
        eos_token_ids: bundle.eos_ids(),
        ..GenerateOptions::default()
    };
    let tokens = model.generate(&batch, &gen, &mut NoHook).expect("generate").tokens;
    let want: Vec<i64> = ids(&meta, "generated")
        .into_iter()
        .take_while(|t| !gen.eos_token_ids.contains(t))
        .collect();
    // The fused decode path continues the same prefill; in bf16 it runs (its numerics against
    // the libtorch layers are `fused_decode.rs`'s), in f32 it gives transformers' tokens too.
    let fused = GenerateOptions { decode: DecodePath::Fused, ..gen.clone() };
    let fused_tokens =
        model.generate(&batch, &fused, &mut NoHook).expect("generate, fused path").tokens;
    if dtype == DType::F32 {
        assert_eq!(tokens[0], want, "{name}: greedy tokens");
        assert_eq!(fused_tokens[0], want, "{name}: greedy tokens on the fused decode path");
    }
}

#[test]
fn fixtures_carry_the_expected_generator_version() {
    let version = std::fs::read_to_string(llava_fixtures().join("VERSION")).expect("VERSION");
    assert!(version.starts_with(GENERATOR_VERSION), "regenerate fixtures: {version}");
    let pinned = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python/requirements.txt"),
    )
    .expect("requirements");
    let transformers =
        version.lines().find_map(|l| l.strip_prefix("transformers ")).expect("transformers line");
    assert!(
        pinned.contains(&format!("transformers=={transformers}")),
        "fixtures from transformers {transformers}"
    );
}

#[test]
fn hf_mha_mlp_flat_vision_layout_matches_transformers() {
    check_fixture("hf_mha_mlp", DType::F32);
}

#[test]
fn hf_gqa_full_legacy_layout_tied_embeddings_matches_transformers() {
    check_fixture("hf_gqa_full", DType::F32);
}

#[test]
fn hf_gqa_full_bf16_matches_transformers_bf16() {
    check_fixture("hf_gqa_full", DType::Bf16);
}

#[test]
fn hf_prefixed_sharded_layout_matches_transformers() {
    check_fixture("hf_prefixed_sharded", DType::F32);
}

#[test]
fn original_llava_linear_projector_matches_reference() {
    check_fixture("original_linear", DType::F32);
}

#[test]
fn preprocessing_matches_pil_clip_image_processor() {
    let root = llava_fixtures();
    let expected = SafetensorsFile::open(&root.join("pixels.safetensors")).expect("pixels");
    let crop = ImageProcessor::new(
        ImageProcessorConfig::from_json(&root.join("preprocessor_config.json")).expect("cfg"),
    );
    let mut pad_cfg = crop.cfg.clone();
    pad_cfg.aspect = AspectMode::Pad;
    let pad = ImageProcessor::new(pad_cfg);
    for file in ["image_rgb.png", "image_gray.png", "image_rgba.png", "image_rgb.jpg"] {
        let img = Rgb8::open(&root.join(file)).expect("open");
        let key = file.replace('.', "_");
        let atol = if file.ends_with(".jpg") { JPEG_PIXEL_ATOL } else { PIXEL_ATOL };
        let d = max_abs_diff(
            &crop.preprocess(&img),
            &expected.read(&format!("pixels_{key}")).expect("t"),
        );
        assert!(d <= atol, "{file}: pixels differ by {d}");
        let d = max_abs_diff(
            &pad.preprocess(&img),
            &expected.read(&format!("pixels_pad_{key}")).expect("t"),
        );
        assert!(d <= atol, "{file} (pad): pixels differ by {d}");
    }
}

#[test]
fn batched_prefill_with_padding_equals_single_runs() {
    let dir = llava_fixtures().join("hf_gqa_full");
    let bundle = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    let model = &bundle.model;
    let _guard = tch::no_grad_guard();
    let pixels = fixture_pixels(&bundle);
    let feats = model.image_features(&pixels, &mut NoHook);
    let long = bundle
        .tokenizer
        .tokenize_prompt("USER: <image>\nWhat color is the shape? ASSISTANT:", 1)
        .expect("t");
    let short = bundle.tokenizer.tokenize_prompt("<image>\nshape?", 1).expect("t");
    let both = model
        .prepare(&[long.clone(), short.clone()], &[feats.shallow_clone(), feats.shallow_clone()])
        .expect("p");
    let batched = model.logits(&both, &mut NoHook);
    let t = batched.size()[1];
    for (row, pieces) in [long.clone(), short.clone()].into_iter().enumerate() {
        let single = model.prepare(&[pieces], &[feats.shallow_clone()]).expect("p");
        let alone = model.logits(&single, &mut NoHook).squeeze_dim(0);
        let n = alone.size()[0];
        let from_batch = batched.get(row as i64).narrow(0, t - n, n);
        let d = max_abs_diff(&from_batch, &alone);
        assert!(d <= LOGITS_ATOL_F32, "row {row}: padded batch differs by {d}");
    }
    // Greedy decoding of the padded batch yields each row's single-run tokens.
    let gen = GenerateOptions { max_new_tokens: 5, ..GenerateOptions::default() };
    let batched_tokens = model.generate(&both, &gen, &mut NoHook).expect("generate").tokens;
    for (row, pieces) in [long, short].into_iter().enumerate() {
        let single = model.prepare(&[pieces], &[feats.shallow_clone()]).expect("p");
        let alone = model.generate(&single, &gen, &mut NoHook).expect("generate").tokens;
        assert_eq!(batched_tokens[row], alone[0], "row {row}: batched greedy tokens");
        assert_eq!(alone[0].len(), 5);
    }
    // The fused decode path decodes one sequence: a batch of two is an error, not a fallback.
    let fused = GenerateOptions { decode: DecodePath::Fused, ..gen };
    let err = model.generate(&both, &fused, &mut NoHook).expect_err("two rows on the fused path");
    assert!(err.to_string().contains("one sequence"), "{err}");
}

/// The fixture's prompt about `image_rgb.png`, prepared for `bundle`'s model (one row).
fn prompt_batch(bundle: &LlavaBundle, dir: &Path) -> PreparedBatch {
    let (_, meta) = expected(dir);
    let model = &bundle.model;
    let pixels = fixture_pixels(bundle);
    let feats = model.image_features(&pixels, &mut NoHook);
    let pieces =
        bundle.tokenizer.tokenize_prompt(meta["prompt"].as_str().expect("p"), 1).expect("t");
    model.prepare(&[pieces], &[feats]).expect("prepare")
}

/// A hook that changes nothing but is not [`NoHook`]: the fused path cannot call it.
struct Observer(usize);

impl LinearHook for Observer {
    fn input(&mut self, _id: LayerId, x: tch::Tensor) -> tch::Tensor {
        self.0 += 1;
        x
    }
}

#[test]
fn the_fused_decode_path_refuses_a_hook_it_cannot_call() {
    let dir = llava_fixtures().join("hf_mha_mlp");
    let bundle = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    let model = &bundle.model;
    let _guard = tch::no_grad_guard();
    let batch = prompt_batch(&bundle, &dir);
    let fused = GenerateOptions {
        max_new_tokens: 3,
        decode: DecodePath::Fused,
        ..GenerateOptions::default()
    };
    let mut observer = Observer(0);
    let err = model.generate(&batch, &fused, &mut observer).expect_err("a hook on the fused path");
    assert!(err.to_string().contains("without hooks"), "{err}");
    assert_eq!(observer.0, 0, "refused before any linear ran");
    // The libtorch path calls it.
    let libtorch = GenerateOptions { decode: DecodePath::Libtorch, ..fused };
    model.generate(&batch, &libtorch, &mut observer).expect("libtorch path");
    assert!(observer.0 > 0);
    assert_eq!("fused".parse::<DecodePath>().expect("parse"), DecodePath::Fused);
    assert!("fast".parse::<DecodePath>().is_err());
}

#[test]
fn f16_runs_and_stays_close_to_f32() {
    let dir = llava_fixtures().join("hf_mha_mlp");
    let (exp, _) = expected(&dir);
    let bundle =
        LlavaBundle::load(&dir, &LoadOptions { dtype: DType::F16, ..LoadOptions::default() })
            .expect("load");
    let model = &bundle.model;
    let _guard = tch::no_grad_guard();
    let batch = prompt_batch(&bundle, &dir);
    let logits = model.logits(&batch, &mut NoHook).squeeze_dim(0);
    assert_eq!(logits.kind(), tch::Kind::Half);
    let d = max_abs_diff(&logits, &exp.read("logits").expect("t"));
    assert!(d <= LOGITS_ATOL_F16_VS_F32, "f16 logits differ from transformers' f32 by {d}");
}

#[test]
fn stop_strings_end_generation_and_cut_the_answer() {
    let dir = llava_fixtures().join("hf_mha_mlp");
    let bundle = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    let model = &bundle.model;
    let _guard = tch::no_grad_guard();
    let batch = prompt_batch(&bundle, &dir);
    let free = model
        .generate(
            &batch,
            &GenerateOptions { max_new_tokens: 8, ..GenerateOptions::default() },
            &mut NoHook,
        )
        .expect("generate")
        .tokens;
    // Stop at the text of the second generated token: generation ends right after it.
    let second = bundle.tokenizer.decode(&free[0][1..2], false).expect("decode");
    let stop = bundle.stop_strings(vec![second.clone()]);
    let opts =
        GenerateOptions { max_new_tokens: 8, stop: Some(&stop), ..GenerateOptions::default() };
    let stopped = model.generate(&batch, &opts, &mut NoHook).expect("generate").tokens;
    assert!(stopped[0].len() < free[0].len() && stopped[0].len() >= 2, "{stopped:?} vs {free:?}");
    assert_eq!(stopped[0][..], free[0][..stopped[0].len()]);
    let text = bundle.tokenizer.decode(&stopped[0], false).expect("decode");
    assert!(!stop.trim(&text).contains(second.as_str()) || second.trim().is_empty());
}

#[test]
fn saved_llava_hf_directory_reloads_strictly_with_identical_logits() {
    use qvlm_core::checkpoint::llava_hf::save_llava_hf;
    let dir = llava_fixtures().join("hf_prefixed_sharded");
    let bundle = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
    let tmp = super::common::TempDir::new("export");
    save_llava_hf(&bundle.model, &bundle.images.cfg, &tmp.0).expect("save");
    std::fs::copy(dir.join("tokenizer.json"), tmp.0.join("tokenizer.json")).expect("copy");
    let again = LlavaBundle::load(&tmp.0, &LoadOptions::default()).expect("reload");
    assert_eq!(again.model.cfg, bundle.model.cfg);
    let _guard = tch::no_grad_guard();
    let pixels = fixture_pixels(&bundle);
    let run = |b: &LlavaBundle| {
        let f = b.model.image_features(&pixels, &mut NoHook);
        let p = b.tokenizer.tokenize_prompt("USER: <image>\nshape? ASSISTANT:", 1).expect("t");
        b.model.logits(&b.model.prepare(&[p], &[f]).expect("p"), &mut NoHook)
    };
    assert_eq!(max_abs_diff(&run(&bundle), &run(&again)), 0.0);
}

/// Loading, naming and saving share one set of names: every module keeps the canonical name it
/// was loaded under, and the model's walk (`named_tensors`) gives each stored tensor exactly once,
/// under the key the layout stores (the derived buffers transformers writes aside).
#[test]
fn the_walk_names_every_stored_tensor_once_under_its_loaded_name() {
    use qvlm_core::io::naming::Naming;
    use qvlm_core::io::shards::ShardSet;
    use qvlm_core::layer_id::{LayerId, Slot, Tower};
    for fixture in ["hf_mha_mlp", "hf_gqa_full", "hf_prefixed_sharded"] {
        let dir = llava_fixtures().join(fixture);
        let bundle = LlavaBundle::load(&dir, &LoadOptions::default()).expect("load");
        let shards = ShardSet::open_dir(&dir).expect("shards");
        let naming = Naming::detect_hf(&shards, &dir).expect("naming");
        let mut named: Vec<String> = bundle
            .model
            .named_tensors()
            .into_iter()
            .map(|(name, _)| naming.stored_key(&name).1)
            .collect();
        let count = named.len();
        named.sort();
        named.dedup();
        assert_eq!(named.len(), count, "{fixture}: a tensor is named twice");
        let stored: Vec<String> =
            shards.keys().filter(|k| !naming.ignorable(0, k)).map(String::from).collect();
        assert_eq!(named, stored, "{fixture}");
    }
    let bundle = LlavaBundle::load(&llava_fixtures().join("hf_mha_mlp"), &LoadOptions::default())
        .expect("load");
    let model = &bundle.model;
    let layers = model.cfg.text.num_hidden_layers as u32;
    for (id, path) in [
        (
            LayerId::new(Tower::Vision, 0, Slot::OutProj),
            "vision_tower.encoder.layers.0.self_attn.out_proj",
        ),
        (LayerId::new(Tower::Vision, 0, Slot::Fc2), "vision_tower.encoder.layers.0.mlp.fc2"),
        (LayerId::new(Tower::Projector, 0, Slot::Linear1), "multi_modal_projector.linear_1"),
        (LayerId::new(Tower::Language, 1, Slot::UpProj), "language_model.layers.1.mlp.up_proj"),
        (LayerId::new(Tower::Language, 1, Slot::OProj), "language_model.layers.1.self_attn.o_proj"),
        (LayerId::new(Tower::Language, layers, Slot::LmHead), "lm_head"),
    ] {
        let linear = model.linears_and_head().into_iter().find(|l| l.id == id);
        assert_eq!(linear.map(|l| l.path.as_str()), Some(path), "{id}");
    }
    assert!(model.linears().iter().all(|l| l.id.slot != Slot::LmHead));
}
