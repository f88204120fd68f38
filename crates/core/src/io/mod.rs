pub mod compressed;
pub mod config;
pub mod image;
pub mod naming;
pub mod prompt;
pub mod safetensors;
pub mod shards;
pub mod weights;
