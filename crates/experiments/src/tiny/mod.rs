//! The embedded default model: a tiny LLaVA (CLIP-style ViT, mlp2x_gelu projector, LLaMA-style
//! decoder) trained by this project on easy-VQA, and its planted-outlier variant; and a tiny
//! Qwen2-VL-style model trained the same way ([`qwen2vl`]).

pub mod qwen2vl;
pub mod recipe;
pub mod tokenizer;
pub mod train;
pub mod trained_outliers;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Architecture of the tiny LLaVA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TinyArch {
    pub vision_hidden: i64,
    pub vision_intermediate: i64,
    pub vision_layers: i64,
    pub vision_heads: i64,
    pub patch_size: i64,
    pub text_hidden: i64,
    pub text_intermediate: i64,
    pub text_layers: i64,
    pub text_heads: i64,
    pub text_kv_heads: i64,
}

/// The staged recipe (see ../shared/notes/tiny-llava-prototype.md): ① the vision tower alone on
/// image-level shape/color labels read off the questions, ② projector + decoder on the questions
/// with the vision tower frozen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRecipe {
    pub seed: i64,
    /// libtorch intra-op threads (0 = libtorch's default).
    pub threads: u16,
    pub batch_size: usize,
    pub vision_epochs: usize,
    pub vision_lr: f64,
    pub lm_epochs: usize,
    pub lm_lr: f64,
    pub weight_decay: f64,
    pub warmup_fraction: f64,
    pub grad_clip: f64,
}

/// Which embedded model a train-tiny config trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TinyFamily {
    /// CLIP-style ViT, `mlp2x_gelu` projector, LLaMA decoder (`models/tiny-llava`).
    #[default]
    Llava,
    /// Qwen2-VL-style: ViT with 2-D rotary positions, 2 × 2 patch merger, Qwen2 decoder with
    /// q/k/v bias and M-RoPE (`models/tiny-qwen2-vl`, [`qwen2vl`]).
    Qwen2Vl,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTinyConfig {
    /// `llava` (default) or `qwen2_vl`.
    #[serde(default, skip_serializing_if = "is_llava")]
    pub family: TinyFamily,
    pub arch: TinyArch,
    pub train: TrainRecipe,
    /// Output directory (llava-hf layout).
    pub out: PathBuf,
    /// easy-VQA's `data` folder (default: inside the bootstrap's `.venv`).
    #[serde(default)]
    pub data: Option<PathBuf>,
    #[serde(skip)]
    pub file: PathBuf,
}

fn is_llava(f: &TinyFamily) -> bool {
    *f == TinyFamily::Llava
}

/// The tiny model's image size (easy-VQA's images are 64×64).
pub const IMAGE_SIZE: i64 = 64;

impl TrainTinyConfig {
    /// Every value in range and the architecture buildable, before anything is written; errors
    /// name the file and the key.
    pub fn check(&self) -> Result<()> {
        let f = self.file.display();
        let a = &self.arch;
        for (key, v) in [
            ("arch.vision_hidden", a.vision_hidden),
            ("arch.vision_intermediate", a.vision_intermediate),
            ("arch.vision_layers", a.vision_layers),
            ("arch.vision_heads", a.vision_heads),
            ("arch.patch_size", a.patch_size),
            ("arch.text_hidden", a.text_hidden),
            ("arch.text_intermediate", a.text_intermediate),
            ("arch.text_layers", a.text_layers),
            ("arch.text_heads", a.text_heads),
            ("arch.text_kv_heads", a.text_kv_heads),
        ] {
            if !(1..=1 << 20).contains(&v) {
                bail!("{f}: key `{key}`: {v} is not a count in 1..=2^20");
            }
        }
        let divides = |key: &str, part: i64, whole_key: &str, whole: i64| -> Result<()> {
            if whole % part != 0 {
                bail!("{f}: key `{key}`: {part} does not divide `{whole_key}` {whole}");
            }
            Ok(())
        };
        divides("arch.vision_heads", a.vision_heads, "arch.vision_hidden", a.vision_hidden)?;
        divides("arch.patch_size", a.patch_size, "the image size", IMAGE_SIZE)?;
        if self.family == TinyFamily::Qwen2Vl {
            // The 2 × 2 patch merger takes whole blocks of patches.
            divides("arch.patch_size", 2 * a.patch_size, "the image size", IMAGE_SIZE)?;
        }
        divides("arch.text_heads", a.text_heads, "arch.text_hidden", a.text_hidden)?;
        divides("arch.text_kv_heads", a.text_kv_heads, "arch.text_heads", a.text_heads)?;
        if (a.text_hidden / a.text_heads) % 2 != 0 {
            bail!("{f}: key `arch.text_heads`: RoPE needs an even head size (text_hidden / text_heads = {})", a.text_hidden / a.text_heads);
        }
        let t = &self.train;
        for (key, v) in [("train.batch_size", t.batch_size), ("train.lm_epochs", t.lm_epochs)] {
            if v == 0 {
                bail!("{f}: key `{key}`: must be at least 1");
            }
        }
        for (key, v, min_open) in [
            ("train.vision_lr", t.vision_lr, true),
            ("train.lm_lr", t.lm_lr, true),
            ("train.grad_clip", t.grad_clip, true),
            ("train.weight_decay", t.weight_decay, false),
        ] {
            let ok = v.is_finite() && if min_open { v > 0.0 } else { v >= 0.0 };
            if !ok {
                bail!(
                    "{f}: key `{key}`: {v} is not a finite number {} 0",
                    if min_open { ">" } else { "≥" }
                );
            }
        }
        if !(0.0..=1.0).contains(&t.warmup_fraction) {
            bail!("{f}: key `train.warmup_fraction`: {} is not in [0, 1]", t.warmup_fraction);
        }
        check_out(&self.out, &self.file)
    }
}

/// `out` must name a folder below an existing one (the model is staged beside it).
pub(crate) fn check_out(out: &Path, file: &Path) -> Result<()> {
    let f = file.display();
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        bail!("{f}: key `out`: `{}` does not end in a folder name", out.display());
    }
    if out.is_file() {
        bail!("{f}: key `out`: {} is a file", out.display());
    }
    Ok(())
}
