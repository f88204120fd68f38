//! qvlm-core: a LLaVA (CLIP vision tower, projector, LLaMA decoder) over libtorch, strict
//! checkpoint loading, preprocessing, and the quantizers Q-VLM and its baselines use.
//!
//! Layers are named by [`layer_id::LayerId`]; quantization plugs into the one model
//! definition through a [`hook::LinearHook`] passed explicitly to `forward`.
//!
//! Modules, bottom to top (each imports only from those above it in this list):
//! - [`error`], [`device`], [`rng`], [`optim`], [`memory`]: errors, devices and dtypes, the seeded
//!   generator, AdamW, handing freed heap pages back to the system;
//! - [`layer_id`], [`hook`]: how layers are named and how code plugs into their inputs;
//! - [`io`]: files — safetensors, shards, key layouts, strict weight loading, configs, images,
//!   prompts and tokenizers;
//! - [`quant`]: quantizers, packed weights and the low-bit kernels (no model types);
//! - [`model`]: the one LLaVA definition (float and quantized runs alike);
//! - [`checkpoint`]: whole-model files — quantized checkpoints and llava-hf export.

pub mod checkpoint;
pub mod device;
pub mod error;
pub mod hook;
pub mod io;
pub mod layer_id;
pub mod memory;
pub mod model;
pub mod optim;
pub mod quant;
pub mod rng;

pub use error::{Error, Result};
