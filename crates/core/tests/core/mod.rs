mod common;
mod compressed;
mod llava_parity;
mod loading_errors;
mod quant_kernels;
mod qwen2_5_vl_parity;
mod qwen2vl_parity;
mod rotation;
