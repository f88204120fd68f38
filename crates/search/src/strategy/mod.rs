//! Strategies, each chosen by config, all returning a [`QuantPlan`]:
//! `rtn` (min–max), `lp_init` (QLoRA-style lp-distance clipping, the baselines' activations),
//! `sequential` (Eq. 2), `entropy_blocked` (cross-layer dependency mining, Eq. 3–7; also the
//! quantization-error proxy and the released code's gate), `disentangled` (VEO, Eq. 8–10, then
//! blocked search) and `oracle` (joint search over whole windows).
//!
//! Files: [`config`] (the settings, types only) ← [`simple`], [`blocked`] (how a block's sites are
//! decided) ← [`walk`] (a base strategy over the whole model) ← [`veo`] (VEO, then a walk) ← this
//! module's [`run`].

pub mod blocked;
pub mod config;
pub mod simple;
pub mod veo;
pub mod walk;

use self::config::{Progress, StrategyConfig};
use crate::calib::CalibrationSet;
use crate::engine::WeightMethod;
use crate::error::Result;
use crate::model::SearchModel;
use crate::plan::{QuantPlan, Scheme};

/// Runs a strategy on a float model. The model's weights are left as they were; apply the
/// returned plan with [`crate::plan::apply`].
pub fn run(
    model: &mut dyn SearchModel,
    calib: &CalibrationSet,
    scheme: Scheme,
    weights: WeightMethod,
    strategy: &StrategyConfig,
    progress: Progress<'_>,
) -> Result<QuantPlan> {
    strategy.check()?;
    // Non-finite pixels are replaced up front (the runner records how many there were).
    let sanitized;
    let calib = if calib.nonfinite_pixels() > 0 {
        sanitized = calib.sanitized();
        &sanitized
    } else {
        calib
    };
    match strategy {
        StrategyConfig::Disentangled { veo, then } => {
            veo::run(model, calib, scheme, weights, veo, then, progress)
        }
        StrategyConfig::Base(base) => walk::plan(model, calib, scheme, weights, base, progress),
    }
}
