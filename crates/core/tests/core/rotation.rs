//! QuaRot-style rotation of the language model: function-preserving in float on the embedded
//! tiny LLaVA (plain and with planted outliers), and it flattens the planted outlier channels.

use qvlm_core::hook::{LinearHook, NoHook};
use qvlm_core::layer_id::{LayerId, Slot, Tower};
use qvlm_core::model::llava::{LlavaBundle, LoadOptions};
use qvlm_core::model::outliers::{plant_outliers, OutlierSpec};
use qvlm_core::model::rotation::{rotate, RotationKind, RotationSpec};
use tch::Tensor;

use super::common::max_abs_diff;
use super::quant_kernels::logits;

/// Logits of the rotated model against the unrotated one, f32 (the bound).
const ROTATED_LOGITS_ATOL: f64 = 1e-4;

fn tiny(planted: bool) -> LlavaBundle {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llava");
    let mut b = LlavaBundle::load(&dir, &LoadOptions::default()).expect("tiny model");
    if planted {
        plant_outliers(&mut b.model, &OutlierSpec::default());
    }
    b
}

/// max|x| / mean|x| over the rows of each language q_proj input: how much one channel dominates.
#[derive(Default)]
struct Peakiness(Vec<f64>);

impl LinearHook for Peakiness {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        if id.tower == Tower::Language && id.slot == Slot::QProj {
            let a = x.abs();
            self.0.push(a.max().double_value(&[]) / a.mean(tch::Kind::Double).double_value(&[]));
        }
        x
    }
}

#[test]
fn rotation_preserves_the_float_function_and_flattens_outliers() {
    let _guard = tch::no_grad_guard();
    for planted in [false, true] {
        let reference = tiny(planted);
        let want = logits(&reference, &mut NoHook);
        let mut before = Peakiness::default();
        let _ = logits(&reference, &mut before);
        for kind in [RotationKind::Hadamard, RotationKind::RandomOrthogonal] {
            let spec = RotationSpec { kind, seed: 1 };
            let mut rotated = tiny(planted);
            rotate(&mut rotated.model, &spec).expect("rotate");
            assert_eq!(rotated.model.rotation, Some(spec));
            let got = logits(&rotated, &mut NoHook);
            let d = max_abs_diff(&got, &want);
            eprintln!("planted {planted}, {kind:?}: max |Δlogit| {d:e}");
            assert!(
                d <= ROTATED_LOGITS_ATOL,
                "planted {planted}, {kind:?}: logits differ by {d:e}"
            );
            let mut after = Peakiness::default();
            let _ = logits(&rotated, &mut after);
            if planted {
                let (b, a) = (before.0.iter().sum::<f64>(), after.0.iter().sum::<f64>());
                eprintln!("{kind:?}: Σ max/mean of q_proj inputs {b:.1} → {a:.1}");
                assert!(a < 0.5 * b, "{kind:?}: max/mean of q_proj inputs {b:.1} → {a:.1}");
            }
            // No checkpoint format holds the online Hadamard: writers refuse a rotated model.
            let dir = std::env::temp_dir().join(format!("qvlm-rot-{}", std::process::id()));
            let err = qvlm_core::checkpoint::llava_hf::save_llava_hf(
                &rotated.model,
                &rotated.images.cfg,
                &dir,
            )
            .expect_err("a rotated model is not written");
            assert!(err.to_string().contains("rotated"), "{err}");
            assert!(!dir.join("model.safetensors").exists());
            let _ = std::fs::remove_dir_all(&dir);
            // A second rotation is refused and leaves the model as it was.
            assert!(rotate(&mut rotated.model, &spec).is_err());
            assert_eq!(max_abs_diff(&logits(&rotated, &mut NoHook), &got), 0.0);
        }
    }
}

/// The same rotation on the Qwen2-VL and Qwen2.5-VL parity checkpoints (q/k/v biases, M-RoPE,
/// image tokens written by the patch merger): logits of a prompt with both fixture images.
#[test]
fn rotation_preserves_qwen2_vl_and_qwen2_5_vl_logits() {
    use qvlm_core::io::safetensors::SafetensorsFile;
    use qvlm_core::model::qwen2_vl::{GridThw, Qwen2Vl, Qwen2VlPrompt};
    use qvlm_core::model::rotation::rotate_qwen2_vl;
    let _guard = tch::no_grad_guard();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for family in ["qwen2vl", "qwen2_5_vl"] {
        let dir = fixtures.join(family).join("tiny");
        let e = SafetensorsFile::open(&dir.join("expected.safetensors")).expect("references");
        let ints = |k: &str| Vec::<i64>::try_from(&e.read(k).expect(k).reshape([-1])).expect(k);
        let pixels = e.read("pixel_values_both").expect("pixels");
        let grids: Vec<GridThw> =
            ints("grid_thw_both").chunks_exact(3).map(|g| [g[0], g[1], g[2]]).collect();
        let ids = ints("lm_input_ids_both");
        let logits = |m: &Qwen2Vl| {
            let tokens = m.image_tokens(&pixels, &grids, &mut NoHook).expect("images");
            let p = Qwen2VlPrompt { ids: &ids, grids: &grids, image_tokens: Some(&tokens) };
            m.logits(&m.prepare(&[p]).expect("prepare"), &mut NoHook).expect("logits")
        };
        let load = || Qwen2Vl::load(&dir, &LoadOptions::default()).expect("checkpoint");
        let want = logits(&load());
        for kind in [RotationKind::Hadamard, RotationKind::RandomOrthogonal] {
            let spec = RotationSpec { kind, seed: 1 };
            let mut rotated = load();
            let embed_before = rotated.language_model.embed_tokens.copy();
            rotate_qwen2_vl(&mut rotated, &spec).expect("rotate");
            assert_eq!(rotated.rotation, Some(spec));
            let moved = max_abs_diff(&rotated.language_model.embed_tokens, &embed_before);
            assert!(moved > 1e-2, "{family} {kind:?}: the embeddings did not change ({moved})");
            let d = max_abs_diff(&logits(&rotated), &want);
            eprintln!("{family}, {kind:?}: max |Δlogit| {d:e}");
            assert!(d <= ROTATED_LOGITS_ATOL, "{family} {kind:?}: logits differ by {d:e}");
            let again = rotate_qwen2_vl(&mut rotated, &spec).expect_err("rotated twice");
            assert!(again.to_string().contains("already rotated"), "{again}");
        }
    }
}
