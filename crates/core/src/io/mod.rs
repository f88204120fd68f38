pub mod config;
pub mod export;
pub mod image;
pub mod naming;
pub mod prompt;
pub mod safetensors;
pub mod weights;
