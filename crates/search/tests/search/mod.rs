mod baselines;
mod qwen2_vl;
mod strategies;
