pub mod easy_vqa;
pub mod scienceqa;
pub mod vqa;

pub use qvlm_core::rng::SplitMix64;
