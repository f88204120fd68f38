pub mod clip;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod norm;
pub mod outliers;
pub mod projector;
pub mod rotation;
