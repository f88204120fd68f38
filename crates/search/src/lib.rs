pub use qvlm_core;
