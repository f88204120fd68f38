pub mod easy_vqa;

pub use qvlm_core::rng::SplitMix64;
