//! `experiments quantize`: a stored plan (`plan.json` of a cell) applied to the model it was
//! searched on, without searching again, and written as a checkpoint:
//! - `compressed-tensors`: packed weights in the format vLLM, SGLang and transformers load
//!   (core `checkpoint::compressed`), input scales folded into the operations before them
//!   (`qvlm_search::pack`);
//! - `qvlm`: this crate's packed format (`qvlm-packed` v2, core `checkpoint::packed`), read back
//!   over the float checkpoint;
//! - `llava-hf`: the fake-quantized weights as plain floats (AWQ's input scales folded back into
//!   the weights' columns), loadable anywhere, with the plan's activation quantizers beside them
//!   in `activation_quant.json` so fake-quant evaluation can be reproduced.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qvlm_core::checkpoint::compressed::save_compressed;
use qvlm_core::checkpoint::llava_hf::save_llava_hf;
use qvlm_core::checkpoint::packed::save_quantized;
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::model::llava::{LlavaBundle, LoadOptions};
use qvlm_search::pack::pack;
use qvlm_search::plan::{apply, input_scales, ModelIdentity, QuantPlan};
use serde::Serialize;

use crate::config::ModelEntry;

/// The checkpoint format `quantize` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    CompressedTensors,
    Qvlm,
    LlavaHf,
}

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// The float checkpoint the plan was searched on (llava-hf directory). With `--cell` it
    /// defaults to the cell's model (path, dtype and planted outliers from its config.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A plan (`results/<experiment>/cells/<id>/plan.json`).
    #[arg(long, conflicts_with = "cell")]
    pub plan: Option<PathBuf>,
    /// A finished cell folder: its `plan.json`.
    #[arg(long)]
    pub cell: Option<PathBuf>,
    /// Output directory (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "compressed-tensors")]
    pub format: ExportFormat,
}

/// What `quantize` wrote (also saved as `quantize.json` in the output).
#[derive(Debug, Serialize)]
pub struct QuantizeReport {
    pub format: ExportFormat,
    pub plan: PathBuf,
    pub strategy: String,
    pub packed_layers: usize,
    /// Bytes of every file written.
    pub bytes: u64,
    /// The model's parameters at 2 bytes each.
    pub fp16_bytes: u64,
    /// compressed-tensors: layers outside vLLM's fast-kernel shape rules (see core
    /// `checkpoint::compressed::CompressedExport`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vllm_marlin_misfits: Vec<String>,
}

/// Tokenizer and generation files copied next to the exported weights when the model has them.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
];

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

pub fn quantize(args: &QuantizeArgs) -> Result<QuantizeReport> {
    let plan_path = match (&args.plan, &args.cell) {
        (Some(p), None) => p.clone(),
        (None, Some(cell)) => cell.join("plan.json"),
        _ => bail!("pass --plan PLAN.json or --cell results/<experiment>/cells/<id>"),
    };
    let text = std::fs::read_to_string(&plan_path)
        .with_context(|| format!("reading the plan {}", plan_path.display()))?;
    let plan: QuantPlan = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a plan", plan_path.display()))?;
    if let Some(r) = &plan.rotation {
        bail!(
            "{}: the plan was searched on a rotated model ({r:?}): its online Hadamard before \
             down_proj has no place in a compressed-tensors, qvlm or llava-hf checkpoint, and \
             exporting rotated plans is not implemented",
            plan_path.display()
        );
    }
    if args.out.exists() {
        bail!(
            "{} exists: quantize writes a new directory and replaces nothing",
            args.out.display()
        );
    }
    let (model_dir, mut bundle) = load_model(args)?;
    let fp16_bytes: u64 =
        bundle.model.named_tensors().iter().map(|(_, t)| 2 * t.numel() as u64).sum();
    // Written into a temporary sibling and renamed at the end: no half-written output.
    let tmp = args.out.with_extension(format!("tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let mut misfits = Vec::new();
    let written = (|| -> Result<usize> {
        let images = bundle.images.cfg.clone();
        match args.format {
            ExportFormat::CompressedTensors => {
                let packed = pack(&mut bundle.model, &plan)?;
                let export = save_compressed(&bundle.model, &images, &tmp)?;
                misfits = export.vllm_marlin_misfits;
                Ok(packed.layers.len())
            }
            ExportFormat::Qvlm => {
                let packed = pack(&mut bundle.model, &plan)?;
                save_quantized(&bundle.model, &tmp)?;
                Ok(packed.layers.len())
            }
            ExportFormat::LlavaHf => {
                ModelIdentity::check(&plan, &bundle.model)?;
                apply(&mut bundle.model, &plan)?;
                fold_input_scales(&mut bundle, &plan)?;
                save_llava_hf(&bundle.model, &images, &tmp)?;
                let acts = serde_json::json!({
                    "note": "The plan's activation quantizers, by site (consumers = the linears whose input it is). \
                             Weights in model.safetensors are the fake-quantized Q(W·s)/s; where a site has an AWQ \
                             input_scale s, its ranges apply to x/s.",
                    "strategy": plan.strategy,
                    "sites": plan.sites,
                });
                std::fs::write(
                    tmp.join("activation_quant.json"),
                    serde_json::to_string_pretty(&acts)?,
                )?;
                Ok(plan.weights.len())
            }
        }
    })();
    let packed_layers = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    for name in SIDE_FILES {
        let from = model_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, tmp.join(name))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    let mut report = QuantizeReport {
        format: args.format,
        plan: plan_path,
        strategy: plan.strategy.clone(),
        packed_layers,
        bytes: 0,
        fp16_bytes,
        vllm_marlin_misfits: misfits,
    };
    report.bytes = dir_bytes(&tmp)?;
    std::fs::write(tmp.join("quantize.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), args.out.display()))?;
    Ok(report)
}

/// The model a plan is applied to: `--model` (f32), or the `--cell`'s model as its run loaded it
/// (dtype, CLIP directory, planted outliers).
fn load_model(args: &QuantizeArgs) -> Result<(PathBuf, LlavaBundle)> {
    if let Some(dir) = &args.model {
        let bundle = LlavaBundle::load(dir, &LoadOptions::default())
            .with_context(|| format!("loading {}", dir.display()))?;
        return Ok((dir.clone(), bundle));
    }
    let Some(cell) = &args.cell else { bail!("pass --model DIR with --plan") };
    let path = cell.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let entry: ModelEntry = serde_json::from_value(value["model"].clone())
        .with_context(|| format!("{}: key `model`", path.display()))?;
    let opts =
        LoadOptions { dtype: entry.dtype, clip_dir: entry.clip.clone(), ..LoadOptions::default() };
    let mut bundle = LlavaBundle::load(&entry.path, &opts)
        .with_context(|| format!("loading the cell's model {}", entry.path.display()))?;
    entry.plant(&mut bundle.model)?;
    Ok((entry.path, bundle))
}

/// `apply` leaves Q(W·s) in the weights and divides the input by s in its hook; a plain float
/// checkpoint has no hook, so the columns are divided by s instead (the same product in float).
fn fold_input_scales(bundle: &mut LlavaBundle, plan: &QuantPlan) -> Result<()> {
    let scales = input_scales(plan);
    let _guard = tch::no_grad_guard();
    for linear in bundle.model.linears_mut() {
        if let Some(s) = scales.get(&linear.id) {
            let w = linear.float_weight();
            let folded = &w / s.to_device(w.device()).to_kind(w.kind()).unsqueeze(0);
            linear.weight = LinearWeight::Float(folded);
        }
    }
    Ok(())
}
