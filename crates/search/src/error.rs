//! The search crate's error type.

/// What can go wrong while planning, searching or applying a quantization plan.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(transparent)]
    Core(#[from] qvlm_core::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("invalid search setting `{key}`: {reason}")]
    Setting { key: String, reason: String },
    #[error("calibration data: {0}")]
    Calibration(String),
    #[error("plan does not fit the model: {0}")]
    PlanMismatch(String),
    #[error("{layer}: {reason}")]
    Unsupported { layer: String, reason: String },
}

pub type Result<T, E = SearchError> = std::result::Result<T, E>;

pub(crate) fn setting(key: &str, reason: impl Into<String>) -> SearchError {
    SearchError::Setting { key: key.to_string(), reason: reason.into() }
}
