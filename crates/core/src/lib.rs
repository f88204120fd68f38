//! qvlm-core: a LLaVA (CLIP vision tower, projector, LLaMA decoder) over libtorch, strict
//! checkpoint loading, preprocessing, and the quantizers Q-VLM and its baselines use.
//!
//! Layers are named by [`model::layer_id::LayerId`]; quantization plugs into the one model
//! definition through a [`model::hook::LinearHook`] passed explicitly to `forward`.

pub mod device;
pub mod error;
pub mod io;
pub mod model;
pub mod optim;
pub mod quant;
pub mod rng;

pub use error::{Error, Result};
