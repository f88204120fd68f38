//! From a search to a served model (#18): a grid's plans (rtn at W4A16 and W8A8 with dynamic
//! per-token activations, symmetric per-channel grids) applied again by `experiments quantize` without a
//! search, exported as compressed-tensors, loaded by transformers + compressed-tensors
//! (python/ct_reference.py) and by this crate's loader, with equal logits; the packed model equals
//! the plan's fake-quant model (weight-only); the qvlm and llava-hf formats; a plan on another
//! model refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qvlm_core::hook::NoHook;
use qvlm_core::io::prompt::Piece;
use qvlm_core::io::safetensors::{write_safetensors, SafetensorsFile};
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::model::llava::{Llava, LoadOptions};
use qvlm_core::quant::packed::ActMode;
use qvlm_search::plan::{apply, QuantPlan};
use tch::{Kind, Tensor};

/// f32, weight-only: transformers dequantizes q·scale exactly as we do; float forward parity.
const LOGITS_ATOL_WEIGHT_ONLY: f64 = 1e-4;
/// W8A8 with dynamic per-token activations, whole forward: two implementations differ by
/// per-token rounding flips that compound through the model (crates/core/tests/core/compressed.rs
/// `LOGITS_ATOL_W8A8`); measured 0.135 here on this machine. A wrong scale layout or code offset
/// moves logits by several units. The W8A8 weights themselves are compared exactly (weights-only).
const LOGITS_ATOL_W8A8: f64 = 0.5;
/// Exports with folded input scales (AWQ, SmoothQuant), weights only, against transformers: the
/// same float forward, with the consumers' columns multiplied by `s` and the norm gains divided
/// by it, so f32 sums round at other magnitudes than the plain model's: measured 2.2e-5 to
/// 1.03e-4 over the five exports of the test (the plain exports: 7.7e-5); bound twice the
/// largest. Dropping the scales moves these logits by 1.8 to 13.
const LOGITS_ATOL_FOLDED: f64 = 2e-4;
/// The packed static-W8A8 import against the plan's fake-quant model: the same f32 scales on
/// both sides and integer products that are exact either way; only f32 summation order and the
/// rare rounding flip it causes remain.
const LOGITS_ATOL_W8A8_STATIC: f64 = 1e-3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("qvlm-deploy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("scratch");
    p
}

fn experiments(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run experiments")
}

/// `experiments quantize --cell CELL --out OUT` with `extra` arguments (`--model`, `--format`).
fn quantize(cell: &Path, out: &Path, extra: &[&str]) -> Output {
    let (cell, out) = (cell.to_str().expect("utf8"), out.to_str().expect("utf8"));
    let mut args = vec!["quantize", "--cell", cell, "--out", out];
    args.extend_from_slice(extra);
    experiments(&args)
}

fn ok(out: Output, what: &str) -> String {
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// A fixed prompt (one image token, expanded by the model) and pixels for the embedded model.
fn inputs(model: &Llava) -> (Vec<Piece>, Tensor) {
    let pieces =
        vec![Piece::Tokens(vec![1, 5, 9, 14]), Piece::Image(0), Piece::Tokens(vec![20, 3, 7])];
    tch::manual_seed(7);
    let size = model.cfg.vision.image_size;
    (pieces, Tensor::randn([1, 3, size, size], (Kind::Float, tch::Device::Cpu)))
}

fn logits(
    model: &Llava,
    pieces: &[Piece],
    pixels: &Tensor,
    hook: &mut dyn qvlm_core::hook::LinearHook,
) -> Tensor {
    let _guard = tch::no_grad_guard();
    let feats = model.vision_tower.forward(pixels, hook);
    let projected = model.projector.forward(&feats, hook);
    let batch = model.prepare(&[pieces.to_vec()], &[projected]).expect("prepare");
    model.logits(&batch, hook).squeeze_dim(0).to_kind(Kind::Float)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Transformers' logits for `dir` (python/ct_reference.py), with the same input ids.
fn reference_logits(
    dir: &Path,
    model: &Llava,
    pieces: &[Piece],
    pixels: &Tensor,
    tmp: &Path,
    extra: &[&str],
) -> Tensor {
    let image = model.cfg.image_token_id.expect("llava-hf image token");
    let mut ids = Vec::new();
    for p in pieces {
        match p {
            Piece::Tokens(t) => ids.extend(t),
            Piece::Image(_) => {
                ids.extend(std::iter::repeat_n(image, model.cfg.image_feature_len() as usize))
            }
        }
    }
    let inputs = tmp.join("inputs.safetensors");
    let n = ids.len() as i64;
    write_safetensors(
        &inputs,
        &[
            ("input_ids".into(), Tensor::from_slice(&ids).reshape([1, n])),
            ("pixel_values".into(), pixels.shallow_clone()),
        ],
        &Default::default(),
    )
    .expect("inputs");
    let out = tmp.join("reference.safetensors");
    let run = Command::new(root().join(".venv/bin/python"))
        .args([
            "python/ct_reference.py".as_ref(),
            dir.as_os_str(),
            inputs.as_os_str(),
            out.as_os_str(),
        ])
        .args(extra)
        .current_dir(root())
        .output()
        .expect("python");
    ok(run, "ct_reference.py");
    SafetensorsFile::open(&out).expect("reference").read("logits").expect("logits")
}

fn config(results: &Path) -> String {
    format!(
        r#"[experiment]
name = "deploy"
threads = 2
results_dir = "{results}"

[[models]]
name = "tiny"
path = "{model}"

[dataset]
kind = "easy_vqa"
limit = 20
batch_size = 20

[calibration]
samples = 8

[quant]
weight_group = 0
weight_symmetric = true
language_act = {{ granularity = {{ kind = "per_token" }}, range = "dynamic", symmetric = true }}
vision_act = {{ granularity = {{ kind = "per_token" }}, range = "dynamic", symmetric = true }}

[[methods]]
name = "rtn_dynamic"
weights = "rtn"
strategy = {{ kind = "rtn" }}
dynamic_activations = true

[[methods]]
name = "rtn_static"
weights = "rtn"
strategy = {{ kind = "rtn" }}
language_act = {{ granularity = {{ kind = "per_tensor" }}, range = "static", symmetric = true }}
vision_act = {{ granularity = {{ kind = "per_tensor" }}, range = "static", symmetric = true }}

[grid]
models = ["tiny"]
bits = ["W4A16", "W8A8"]
methods = ["rtn_dynamic", "rtn_static"]
"#,
        results = results.display(),
        model = root().join("models/tiny-llava").display(),
    )
}

#[test]
fn a_plan_is_exported_as_compressed_tensors_that_transformers_loads_with_our_logits() {
    let tmp = scratch("ct");
    let cfg = tmp.join("deploy.toml");
    std::fs::write(&cfg, config(&tmp.join("results"))).expect("config");
    ok(experiments(&[cfg.to_str().expect("utf8")]), "grid");
    let model_dir = root().join("models/tiny-llava");
    let mut cells: Vec<PathBuf> = std::fs::read_dir(tmp.join("results/cells"))
        .expect("cells")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("plan.json").is_file())
        .collect();
    cells.sort();
    assert_eq!(cells.len(), 4, "W4A16 and W8A8 of two methods: {cells:?}");
    let mut seen = std::collections::BTreeSet::new();
    for cell in &cells {
        let plan: QuantPlan =
            serde_json::from_str(&std::fs::read_to_string(cell.join("plan.json")).expect("plan"))
                .expect("plan json");
        let w8a8 = plan.sites.iter().any(|s| s.act.is_some());
        let static_acts =
            plan.sites.iter().any(|s| s.act.as_ref().is_some_and(|a| a.range.is_some()));
        let tag = match (w8a8, static_acts) {
            (true, true) => "w8a8-static",
            (true, false) => "w8a8",
            (false, _) => "w4a16",
        };
        // The two methods' W4A16 plans are the same weights: one is enough.
        if !seen.insert(tag) {
            continue;
        }
        let out = tmp.join(format!("ct-{tag}"));
        let said =
            ok(quantize(cell, &out, &["--model", model_dir.to_str().expect("utf8")]), "quantize");
        assert!(said.contains("the fp16 size"), "{said}");
        // Readable by other users and tools (safetensors writes through a 0600 temp file).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join("model.safetensors"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o044, 0o044, "model.safetensors mode {mode:o}");
        }

        if static_acts {
            // W8A8 with static per-tensor scales (`input_scale`): transformers runs it, and our
            // loader reads each scale into the packed layer (`_int_mm` with the static scale).
            let ours = Llava::load(&out, &LoadOptions::default()).expect("load the static export");
            let statics = ours
                .linears()
                .iter()
                .filter(|l| {
                    matches!(&l.weight, LinearWeight::Packed(p)
                        if matches!(p.spec().act, ActMode::Int8PerTensor { .. }))
                })
                .count();
            assert_eq!(statics, plan.weights.len(), "{tag}: every planned linear static W8A8");
            let mut float = Llava::load(&model_dir, &LoadOptions::default()).expect("float");
            let (pieces, pixels) = inputs(&float);
            let reference = reference_logits(&out, &float, &pieces, &pixels, &tmp, &[]);
            let weights_reference =
                reference_logits(&out, &float, &pieces, &pixels, &tmp, &["--weights-only"]);
            let packed_logits = logits(&ours, &pieces, &pixels, &mut NoHook);
            let mut hook = apply(&mut float, &plan).expect("apply");
            let fake = logits(&float, &pieces, &pixels, &mut hook);
            let weights_only = logits(&float, &pieces, &pixels, &mut NoHook);
            let d_weights = max_abs_diff(&weights_only, &weights_reference);
            let d_full = max_abs_diff(&fake, &reference);
            let d_packed = max_abs_diff(&packed_logits, &fake);
            let d_packed_ref = max_abs_diff(&packed_logits, &reference);
            eprintln!(
                "{tag}: plan weights vs compressed-tensors {d_weights:.2e}; plan (static \
                 activations) vs transformers {d_full:.2e}; packed import vs plan {d_packed:.2e}, \
                 vs transformers {d_packed_ref:.2e}"
            );
            assert!(d_weights <= LOGITS_ATOL_WEIGHT_ONLY, "{tag}: {d_weights}");
            assert!(d_full <= LOGITS_ATOL_W8A8, "{tag}: {d_full}");
            assert!(d_packed <= LOGITS_ATOL_W8A8_STATIC, "{tag}: packed vs plan {d_packed}");
            assert!(
                d_packed_ref <= LOGITS_ATOL_W8A8,
                "{tag}: packed vs transformers {d_packed_ref}"
            );
            // The qvlm format keeps the static scales too, and reads back the same layers.
            let q = tmp.join(format!("qvlm-{tag}"));
            ok(quantize(cell, &q, &["--format", "qvlm"]), "qvlm static");
            let (back, _) = qvlm_core::checkpoint::packed::load_quantized(
                &model_dir,
                &q,
                &LoadOptions::default(),
            )
            .expect("load the qvlm export");
            let d_qvlm =
                max_abs_diff(&logits(&back, &pieces, &pixels, &mut NoHook), &packed_logits);
            assert!(d_qvlm == 0.0, "{tag}: qvlm vs compressed-tensors import {d_qvlm}");
            continue;
        }

        // Our loader reads the export back as packed weights.
        let ours = Llava::load(&out, &LoadOptions::default()).expect("load the export");
        let packed =
            ours.linears().iter().filter(|l| matches!(l.weight, LinearWeight::Packed(_))).count();
        assert_eq!(packed, plan.weights.len(), "{tag}: every planned linear loads packed");
        let (pieces, pixels) = inputs(&ours);
        let reference = reference_logits(&out, &ours, &pieces, &pixels, &tmp, &[]);

        // The plan's fake-quant model (float weights Q(W), the plan's activation hook).
        let mut float = Llava::load(&model_dir, &LoadOptions::default()).expect("float");
        let mut hook = apply(&mut float, &plan).expect("apply");
        let fake = logits(&float, &pieces, &pixels, &mut hook);
        let packed_logits = logits(&ours, &pieces, &pixels, &mut NoHook);
        let vs_plan = max_abs_diff(&packed_logits, &fake);
        let vs_reference = max_abs_diff(&packed_logits, &reference);
        eprintln!("{tag}: packed vs plan {vs_plan:.2e}, packed (own kernels) vs transformers {vs_reference:.2e}");
        // Printed, not asserted: the own kernels' logits differ from the plan's fake-quant ones
        // (W4A16: 1.44, W8A8: 0.36 on the embedded model) although every layer matches alone
        // (int4 with bf16 activations within 0.5 % relative, `_int_mm` exactly): the trained
        // tiny LLaVA's language activations are large (down_proj inputs differ by 7 after three
        // layers of bf16 rounding) and per-token int8 codes flip at rounding boundaries once
        // inputs differ at all. The dequantized export is compared exactly below.
        if w8a8 {
            assert!(vs_reference <= LOGITS_ATOL_W8A8, "{tag}: {vs_reference}");
        }
        {
            // The exported format's exact weights in a float forward (W8A8: activations in float
            // on both sides, `--weights-only`).
            let mut exact = Llava::load(&out, &LoadOptions::default()).expect("load");
            for linear in exact.linears_mut() {
                if let LinearWeight::Packed(p) = &linear.weight {
                    linear.weight = LinearWeight::Float(p.dequantize().to_kind(p.kind()));
                }
            }
            let exact_logits = logits(&exact, &pieces, &pixels, &mut NoHook);
            let weights_reference = if w8a8 {
                reference_logits(&out, &ours, &pieces, &pixels, &tmp, &["--weights-only"])
            } else {
                reference.shallow_clone()
            };
            let d = max_abs_diff(&exact_logits, &weights_reference);
            eprintln!("{tag}: dequantized export vs transformers/compressed-tensors {d:.2e}");
            assert!(d <= LOGITS_ATOL_WEIGHT_ONLY, "{tag}: {d}");
            // The export's weights are the plan's (the fake-quant model, its activation hook
            // included, equals the dequantized export under the same hook).
            let mut hook =
                apply(&mut Llava::load(&model_dir, &LoadOptions::default()).expect("float"), &plan)
                    .expect("apply");
            let d_plan = max_abs_diff(&logits(&exact, &pieces, &pixels, &mut hook), &fake);
            assert!(d_plan <= LOGITS_ATOL_WEIGHT_ONLY, "{tag}: export vs plan {d_plan}");
        }
        // Bytes against fp16, recorded by quantize.
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("quantize.json")).expect("report"),
        )
        .expect("json");
        eprintln!("{tag}: {} bytes, fp16 {} bytes", report["bytes"], report["fp16_bytes"]);

        // The other formats (the model from the cell's own config: no --model).
        let q = tmp.join(format!("qvlm-{tag}"));
        ok(quantize(cell, &q, &["--format", "qvlm"]), "qvlm");
        assert!(q.join("quantized.safetensors").is_file());
        let h = tmp.join(format!("hf-{tag}"));
        ok(quantize(cell, &h, &["--format", "llava-hf"]), "llava-hf");
        let deq = Llava::load(&h, &LoadOptions::default()).expect("llava-hf export");
        let mut hook =
            apply(&mut Llava::load(&model_dir, &LoadOptions::default()).expect("float"), &plan)
                .expect("apply");
        let d = max_abs_diff(&logits(&deq, &pieces, &pixels, &mut hook), &fake);
        assert!(
            d <= LOGITS_ATOL_WEIGHT_ONLY,
            "{tag}: llava-hf export + the plan's activation hook vs plan: {d}"
        );
        assert!(h.join("activation_quant.json").is_file());

        // An existing output is never replaced.
        let again = quantize(cell, &out, &[]);
        assert!(
            !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists")
        );
    }
    // A plan applied to another model is refused, naming why.
    let other = root().join("crates/core/tests/fixtures/llava/hf_mha_mlp");
    let bad = quantize(&cells[0], &tmp.join("bad"), &["--model", other.to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("only to the model it was found on"), "{err}");
    assert!(!tmp.join("bad").exists());
    // A plan searched on a rotated model is refused: no format holds the online Hadamard.
    let mut plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cells[0].join("plan.json")).expect("plan"))
            .expect("plan json");
    plan["rotation"] = serde_json::json!({ "kind": "hadamard", "seed": 0 });
    let rotated = tmp.join("rotated-plan.json");
    std::fs::write(&rotated, plan.to_string()).expect("write");
    let bad = experiments(&[
        "quantize",
        "--plan",
        rotated.to_str().expect("utf8"),
        "--model",
        root().join("models/tiny-llava").to_str().expect("utf8"),
        "--out",
        tmp.join("rotated").to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("rotated model"), "{err}");
    assert!(!tmp.join("rotated").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A grid of input-scale methods with the language model alone quantized: AWQ on llm-awq's
/// foldable sites (the tiny model has grouped-query attention, so o_proj stays unscaled) and
/// SmoothQuant (after the norms), each at W4A16 and W8A8 (dynamic per token); or (`vision`) CLIP
/// quantized too, W4A16: AWQ on every site, SmoothQuant (its CLIP scales fold into LayerNorms).
fn scaled_config(results: &Path, vision: bool) -> String {
    // Without the vision tower: llm-awq's foldable sites; with it: every site (CLIP's fc2 too).
    let (towers, methods, bits, sites) = if vision {
        ("quantize_vision = true", r#"["awq", "smoothquant"]"#, r#"["W4A16"]"#, "all")
    } else {
        ("quantize_vision = false", r#"["awq", "smoothquant"]"#, r#"["W4A16", "W8A8"]"#, "foldable")
    };
    format!(
        r#"[experiment]
name = "deploy-scaled"
threads = 2
results_dir = "{results}"

[[models]]
name = "tiny"
path = "{model}"

[dataset]
kind = "easy_vqa"
limit = 20
batch_size = 20

[calibration]
samples = 8

[quant]
weight_group = 0
weight_symmetric = true
{towers}
language_act = {{ granularity = {{ kind = "per_token" }}, range = "dynamic", symmetric = true }}
vision_act = {{ granularity = {{ kind = "per_token" }}, range = "dynamic", symmetric = true }}

[[methods]]
name = "awq"
weights = {{ awq = {{ grid = 10, clip_steps = 5, sites = "{sites}" }} }}
strategy = {{ kind = "rtn" }}
dynamic_activations = true

[[methods]]
name = "smoothquant"
weights = {{ smoothquant = {{ alpha = 0.5 }} }}
strategy = {{ kind = "rtn" }}
dynamic_activations = true

[grid]
models = ["tiny"]
bits = {bits}
methods = {methods}
"#,
        results = results.display(),
        model = root().join("models/tiny-llava").display(),
    )
}

/// The plan's fake-quant model with its input scales but without activation quantization: what a
/// weights-only comparison holds the export to.
fn weights_only_hook(model: &mut Llava, plan: &QuantPlan) -> qvlm_search::plan::PlanHook {
    let mut hook = apply(model, plan).expect("apply");
    for sp in &plan.sites {
        let scale = sp.input_scale.as_ref().map(|s| s.to_tensor());
        hook.set_site(&sp.site, None, scale.as_ref());
    }
    hook
}

/// The cells of a finished grid, in id order, with their plans.
fn plans(results: &Path) -> Vec<(PathBuf, QuantPlan)> {
    let mut cells: Vec<PathBuf> = std::fs::read_dir(results.join("cells"))
        .expect("cells")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("plan.json").is_file())
        .collect();
    cells.sort();
    cells
        .into_iter()
        .map(|c| {
            let plan =
                serde_json::from_str(&std::fs::read_to_string(c.join("plan.json")).expect("plan"))
                    .expect("plan json");
            (c, plan)
        })
        .collect()
}

/// Exports `cell` as compressed-tensors and checks that the folded scales reproduce the plan:
/// the exported weights (dequantized, float forward, no hook) against the plan's fake-quant model
/// with its input scales and without activation quantization, and against transformers.
fn check_folded_export(cell: &Path, plan: &QuantPlan, tmp: &Path, tag: &str) {
    let model_dir = root().join("models/tiny-llava");
    let scaled = plan.sites.iter().filter(|s| s.input_scale.is_some()).count();
    assert!(scaled > 0, "{tag}: the plan has input scales");
    let out = tmp.join(format!("ct-{tag}"));
    ok(quantize(cell, &out, &["--model", model_dir.to_str().expect("utf8")]), "quantize");
    let mut exact = Llava::load(&out, &LoadOptions::default()).expect("load the export");
    for linear in exact.linears_mut() {
        if let LinearWeight::Packed(p) = &linear.weight {
            linear.weight = LinearWeight::Float(p.dequantize().to_kind(p.kind()));
        }
    }
    let (pieces, pixels) = inputs(&exact);
    let exact_logits = logits(&exact, &pieces, &pixels, &mut NoHook);
    let mut float = Llava::load(&model_dir, &LoadOptions::default()).expect("float");
    let mut hook = weights_only_hook(&mut float, plan);
    let plan_logits = logits(&float, &pieces, &pixels, &mut hook);
    // The same plan with its scales dropped: how far a missing fold would move the logits.
    let mut float = Llava::load(&model_dir, &LoadOptions::default()).expect("float");
    let mut unscaled = apply(&mut float, plan).expect("apply");
    for sp in &plan.sites {
        unscaled.set_site(&sp.site, None, None);
    }
    let unscaled_logits = logits(&float, &pieces, &pixels, &mut unscaled);
    let reference = reference_logits(&out, &exact, &pieces, &pixels, tmp, &["--weights-only"]);
    let d_plan = max_abs_diff(&exact_logits, &plan_logits);
    let d_ref = max_abs_diff(&exact_logits, &reference);
    let effect = max_abs_diff(&plan_logits, &unscaled_logits);
    eprintln!(
        "{tag}: {scaled} scaled sites; folded export vs plan {d_plan:.2e}, vs transformers \
         {d_ref:.2e}; without the scales the logits move by {effect:.2e}"
    );
    assert!(d_plan <= LOGITS_ATOL_WEIGHT_ONLY, "{tag}: folded export vs plan {d_plan}");
    assert!(d_ref <= LOGITS_ATOL_FOLDED, "{tag}: export vs transformers {d_ref}");
    assert!(effect > 100.0 * LOGITS_ATOL_WEIGHT_ONLY, "{tag}: the scales matter ({effect})");
}

#[test]
fn input_scales_are_folded_so_awq_and_smoothquant_plans_export_as_compressed_tensors() {
    let tmp = scratch("scaled");
    for vision in [false, true] {
        let results = tmp.join(format!("results-{vision}"));
        let cfg = tmp.join(format!("scaled-{vision}.toml"));
        std::fs::write(&cfg, scaled_config(&results, vision)).expect("config");
        ok(experiments(&[cfg.to_str().expect("utf8")]), "grid");
        let cells = plans(&results);
        assert_eq!(cells.len(), if vision { 2 } else { 4 }, "{cells:?}");
        for (i, (cell, plan)) in cells.iter().enumerate() {
            let tag = format!("{}-{}{}", plan.strategy, i, if vision { "-vision" } else { "" });
            let awq_everywhere = vision
                && plan
                    .sites
                    .iter()
                    .any(|s| s.site.fold_target().is_none() && s.input_scale.is_some());
            if !awq_everywhere {
                check_folded_export(cell, plan, &tmp, &tag);
                continue;
            }
            // AWQ on every site: CLIP's fc2 (after GELU) has a scale that no operation can
            // absorb; the export names the layer and the ways out.
            let out = tmp.join(format!("ct-{tag}"));
            let model = root().join("models/tiny-llava");
            let bad = quantize(cell, &out, &["--model", model.to_str().expect("utf8")]);
            let err = String::from_utf8_lossy(&bad.stderr);
            assert!(!bad.status.success(), "{tag}: exported");
            assert!(err.contains("fc2") && err.contains("llava-hf"), "{tag}: {err}");
            assert!(!out.exists());
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
