//! The embedded default model: a tiny LLaVA (CLIP-style ViT, mlp2x_gelu projector, LLaMA-style
//! decoder) trained by this project on easy-VQA, and its planted-outlier variant.

pub mod tokenizer;
pub mod train;

use std::path::PathBuf;

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
    pub threads: i32,
    pub batch_size: usize,
    pub vision_epochs: usize,
    pub vision_lr: f64,
    pub lm_epochs: usize,
    pub lm_lr: f64,
    pub weight_decay: f64,
    pub warmup_fraction: f64,
    pub grad_clip: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTinyConfig {
    pub arch: TinyArch,
    pub train: TrainRecipe,
    /// Output directory (llava-hf layout).
    pub out: PathBuf,
    /// easy-VQA's `data` folder (default: inside the bootstrap's `.venv`).
    #[serde(default)]
    pub data: Option<PathBuf>,
}
