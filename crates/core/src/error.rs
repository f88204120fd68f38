//! The core crate's error type: structured variants that name the file, key or layer at fault.

use std::path::PathBuf;

/// Everything that can go wrong while loading, preparing or quantizing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },

    #[error("{path}: not valid JSON: {cause}")]
    Json { path: PathBuf, cause: serde_json::Error },

    #[error("{file}: invalid config: key `{key}`: {reason}")]
    Config { file: PathBuf, key: String, reason: String },

    #[error("{file}: not a readable safetensors file: {reason}")]
    Safetensors { file: PathBuf, reason: String },

    #[error("{file}: tensor `{name}` is missing (expected shape {expected:?})")]
    MissingTensor { name: String, file: PathBuf, expected: Vec<i64> },

    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { name: String, file: PathBuf, expected: Vec<i64>, found: Vec<i64> },

    #[error("{file}: {count} tensor(s) not used by the model: {names}")]
    UnusedTensors { file: PathBuf, count: usize, names: String },

    #[error("{file}: tensor `{name}` has dtype {dtype}, which this loader does not read")]
    UnsupportedDtype { name: String, file: PathBuf, dtype: String },

    #[error("{file}: tokenizer: {reason}")]
    Tokenizer { file: PathBuf, reason: String },

    #[error("{file}: image: {reason}")]
    Image { file: PathBuf, reason: String },

    #[error("{file}: dataset: {reason}")]
    Dataset { file: PathBuf, reason: String },

    #[error("prompt: {0}")]
    Prompt(String),

    #[error("quantization of {layer}: {reason}")]
    Quant { layer: String, reason: String },

    #[error("invalid argument: {0}")]
    Invalid(String),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause }
    }

    pub(crate) fn config(file: impl Into<PathBuf>, key: &str, reason: impl Into<String>) -> Self {
        Error::Config { file: file.into(), key: key.to_string(), reason: reason.into() }
    }
}
