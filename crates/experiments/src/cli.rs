//! Direct use of a checkpoint from the command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use qvlm_core::device::{DType, DeviceSpec};
use qvlm_core::hook::NoHook;
use qvlm_core::io::config::{detect_family, ModelFamily};
use qvlm_core::io::image::Rgb8;
use qvlm_core::io::prompt::Template;
use qvlm_core::model::llava::{DecodePath, GenerateOptions, LlavaBundle, LoadOptions, StopStrings};
use qvlm_core::model::qwen2_vl::Qwen2VlBundle;
use tch::Tensor;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (llava-hf, original LLaVA, or Qwen2-VL).
    #[arg(long)]
    pub model: PathBuf,
    /// CLIP directory for original-LLaVA checkpoints (default: the config's mm_vision_tower).
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// Image file (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,
    /// The question. LLaVA: `<image>` is prepended unless the prompt already contains it.
    /// Qwen2-VL: one user turn, the image before the text, rendered with the checkpoint's chat
    /// template.
    #[arg(long)]
    pub prompt: String,
    /// LLaVA's conversation template: none | llava_v1 | vicuna_v1 (default llava_v1). Qwen2-VL
    /// uses its checkpoint's own chat template; this flag is an error there.
    #[arg(long)]
    pub template: Option<Template>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Stop once the answer contains this text (repeatable); the answer is cut before it.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Write the prompt's logits ([sequence, vocab] f32, image placeholder expanded) here.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Replace an existing `--dump-logits` file.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// The code that runs each decode step after the prefill: libtorch (the decoder's libtorch
    /// operators) | fused (the same layers as loops on the own kernels: CPU, f32 or bf16; the
    /// efficiency bench measures both).
    #[arg(long, default_value = "libtorch")]
    pub decode: DecodePath,
}

/// The answer to the prompt (and the logits file, when asked for).
pub fn generate(args: &GenerateArgs) -> Result<String> {
    if let Some(out) = args.dump_logits.as_ref().filter(|p| p.exists() && !args.force) {
        anyhow::bail!("--dump-logits: {} exists; pass --force to replace it", out.display());
    }
    let family = detect_family(&args.model.join("config.json"))
        .with_context(|| format!("reading {}", args.model.display()))?;
    let device = args.device.resolve()?;
    let opts = LoadOptions { device, dtype: args.dtype, clip_dir: args.clip.clone() };
    if family == ModelFamily::Qwen2Vl {
        return generate_qwen2_vl(args, &opts);
    }
    let bundle = LlavaBundle::load(&args.model, &opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let pixels = bundle.images.preprocess_file(&args.image)?;
    let message = if args.prompt.contains(qvlm_core::io::prompt::IMAGE_PLACEHOLDER) {
        args.prompt.clone()
    } else {
        Template::image_question(&args.prompt, bundle.model.cfg.use_im_start_end)
    };
    let prompt = args.template.unwrap_or_default().render(&message);
    let pieces = bundle.tokenizer.tokenize_prompt(&prompt, 1)?;
    let _guard = tch::no_grad_guard();
    let features = bundle.model.image_features(&pixels.unsqueeze(0), &mut NoHook);
    let batch = bundle.model.prepare(&[pieces], &[features])?;
    if let Some(out) = &args.dump_logits {
        let logits =
            bundle.model.logits(&batch, &mut NoHook).squeeze_dim(0).to_kind(tch::Kind::Float);
        write_logits(out, &logits)?;
        eprintln!("wrote logits {:?} to {}", logits.size(), out.display());
    }
    let stop = bundle.stop_strings(args.stop.clone());
    let gen = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: bundle.eos_ids(),
        stop: Some(&stop),
        decode: args.decode,
    };
    let tokens = bundle.model.generate(&batch, &gen, &mut NoHook)?.tokens;
    let answer = bundle.tokenizer.decode(&tokens[0], true)?;
    Ok(stop.trim(&answer))
}

/// `generate` on a Qwen2-VL checkpoint: the checkpoint's chat template, its tokenizer and image
/// processor, greedy decoding until `generation_config.json`'s EOS.
fn generate_qwen2_vl(args: &GenerateArgs, opts: &LoadOptions) -> Result<String> {
    if let Some(t) = args.template {
        anyhow::bail!(
            "--template {t:?}: Qwen2-VL renders prompts with its checkpoint's own chat template; drop the flag"
        );
    }
    if args.prompt.contains(qvlm_core::io::prompt::IMAGE_PLACEHOLDER) {
        anyhow::bail!("--prompt: `<image>` is LLaVA's placeholder; Qwen2-VL's chat template places the image itself");
    }
    let bundle = Qwen2VlBundle::load(&args.model, opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let image = Rgb8::open(&args.image)?;
    let _guard = tch::no_grad_guard();
    let batch = bundle.prepare_chat(&args.prompt, &[image], &mut NoHook)?;
    if let Some(out) = &args.dump_logits {
        let logits = bundle.model.logits(&batch, &mut NoHook)?.squeeze_dim(0);
        let logits = logits.to_kind(tch::Kind::Float);
        write_logits(out, &logits)?;
        eprintln!("wrote logits {:?} to {}", logits.size(), out.display());
    }
    let stop = StopStrings::new(&bundle.tokenizer, args.stop.clone());
    let gen = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: bundle.eos_token_ids.clone(),
        stop: Some(&stop),
        decode: args.decode,
    };
    let tokens = bundle.model.generate(&batch, &gen, &mut NoHook)?.tokens;
    let answer = bundle.tokenizer.decode(&tokens[0], true)?;
    Ok(stop.trim(&answer))
}

/// Written beside `path` and renamed into place.
fn write_logits(path: &std::path::Path, logits: &Tensor) -> Result<()> {
    let tensors = vec![("logits".to_string(), logits.shallow_clone())];
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    qvlm_core::io::safetensors::write_safetensors(&tmp, &tensors, &Default::default())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}
