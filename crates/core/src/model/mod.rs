pub mod clip;
pub mod hook;
pub mod layer_id;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod norm;
pub mod projector;
