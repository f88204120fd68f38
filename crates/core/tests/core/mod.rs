mod common;
mod compressed;
mod llava_parity;
mod loading_errors;
mod quant_kernels;
mod qwen2vl_parity;
mod rotation;
