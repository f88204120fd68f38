//! qvlm-search: Q-VLM's rounding-function search and the strategies it is measured against,
//! behind one interface (`strategy::run`), on the same calibration data. Plan → search → apply:
//! a strategy returns a serializable [`plan::QuantPlan`]; [`plan::apply`] puts it on a model.

pub mod awq;
pub mod calib;
pub mod cost;
pub mod engine;
pub mod entropy;
pub mod error;
pub mod gptq;
pub mod model;
pub mod pack;
pub mod partition;
pub mod plan;
pub mod ranges;
pub mod site;
pub mod smoothquant;
pub mod strategy;

pub use error::{Result, SearchError};
pub use qvlm_core;
