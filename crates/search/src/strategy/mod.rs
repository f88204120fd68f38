//! Strategies, each chosen by config, all returning a [`QuantPlan`]:
//! `rtn` (min–max), `lp_init` (QLoRA-style lp-distance clipping, the baselines' activations),
//! `sequential` (Eq. 2), `entropy_blocked` (cross-layer dependency mining, Eq. 3–7; also the
//! quantization-error proxy and the released code's gate), `disentangled` (VEO, Eq. 8–10, then
//! blocked search) and `oracle` (joint search over whole windows).

pub mod blocked;
pub mod simple;
pub mod veo;

use qvlm_core::model::llava::Llava;
use qvlm_core::quant::spec::Clip;
use serde::{Deserialize, Serialize};

use crate::calib::CalibrationSet;
use crate::engine::{Engine, WeightMethod};
use crate::entropy::EntropyConfig;
use crate::error::{setting, Result};
use crate::partition::Threshold;
use crate::plan::{QuantPlan, Scheme};

/// The paper's percentile grid p ∈ {1.0, 0.995, 0.99, 0.985, 0.98}.
pub fn paper_percentiles() -> Vec<f64> {
    vec![1.0, 0.995, 0.99, 0.985, 0.98]
}

/// Candidate rounding functions of a site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "values")]
pub enum CandidateGrid {
    /// Percentiles p of the site's distribution (the paper).
    Percentile(Vec<f64>),
    /// Shrink factors of min/max (the released code: 1.0, 0.9, …, 0.4).
    Ratio(Vec<f64>),
}

impl Default for CandidateGrid {
    fn default() -> Self {
        CandidateGrid::Percentile(paper_percentiles())
    }
}

impl CandidateGrid {
    pub fn clips(&self) -> Result<Vec<Clip>> {
        let clips: Vec<Clip> = match self {
            CandidateGrid::Percentile(v) => v.iter().map(|&p| Clip::Percentile(p)).collect(),
            CandidateGrid::Ratio(v) => v.iter().map(|&r| Clip::Ratio(r)).collect(),
        };
        if clips.is_empty() {
            return Err(setting("candidates", "the candidate grid is empty"));
        }
        for c in &clips {
            c.validate().map_err(|e| setting("candidates", e.to_string()))?;
        }
        Ok(clips)
    }
}

/// What drives the partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Proxy {
    /// Conditional entropy of consecutive quantized activations (Eq. 4–6).
    #[default]
    Entropy,
    /// Relative quantization error of consecutive sites (the paper's Table 5 alternative).
    QuantError,
}

/// Which partition rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Eq. 7 (primary).
    #[default]
    Eq7,
    /// The released code's running-mean gate (variant).
    ReleasedGate,
}

/// Settings of the cross-layer-dependency-mining search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockedConfig {
    #[serde(default)]
    pub candidates: CandidateGrid,
    #[serde(default = "default_h0")]
    pub h0: Threshold,
    #[serde(default = "default_depth")]
    pub max_depth: usize,
    #[serde(default)]
    pub proxy: Proxy,
    #[serde(default)]
    pub rule: RuleKind,
    /// Joint search is exhaustive while the number of combinations is at most this, coordinate
    /// descent (from the sequential solution) otherwise.
    #[serde(default = "default_exhaustive")]
    pub exhaustive_limit: usize,
    #[serde(default)]
    pub entropy: EntropyConfig,
}

fn default_h0() -> Threshold {
    Threshold::Quantile(0.5)
}
fn default_depth() -> usize {
    3
}
fn default_exhaustive() -> usize {
    125
}

impl Default for BlockedConfig {
    fn default() -> Self {
        Self {
            candidates: CandidateGrid::default(),
            h0: default_h0(),
            max_depth: default_depth(),
            proxy: Proxy::Entropy,
            rule: RuleKind::Eq7,
            exhaustive_limit: default_exhaustive(),
            entropy: EntropyConfig::default(),
        }
    }
}

/// A strategy, as configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum StrategyConfig {
    /// Min–max ranges, no search.
    Rtn,
    /// Clip ratio per site minimising the lp distance ‖Q(x) − x‖_p^p (QLoRA-style initialization).
    LpInit {
        #[serde(default = "default_lp")]
        p: f64,
        #[serde(default = "default_lp_ratios")]
        ratios: Vec<f64>,
    },
    /// Eq. 2: each site minimises its own layer-output error, prefix quantized.
    Sequential {
        #[serde(default)]
        candidates: CandidateGrid,
    },
    /// Eq. 3–7.
    EntropyBlocked(BlockedConfig),
    /// Joint search over fixed windows of `window` sites (an upper reference for tiny models).
    Oracle {
        #[serde(default)]
        candidates: CandidateGrid,
        #[serde(default = "default_window")]
        window: usize,
    },
    /// VEO (Eq. 8–10) on the vision tower, then `then` on the remaining sites.
    Disentangled {
        #[serde(default)]
        veo: veo::VeoConfig,
        then: Box<StrategyConfig>,
    },
}

fn default_lp() -> f64 {
    2.4
}
fn default_lp_ratios() -> Vec<f64> {
    (0..10).map(|i| 1.0 - 0.05 * i as f64).collect()
}
fn default_window() -> usize {
    4
}

impl StrategyConfig {
    pub fn name(&self) -> String {
        match self {
            StrategyConfig::Rtn => "rtn".into(),
            StrategyConfig::LpInit { .. } => "lp_init".into(),
            StrategyConfig::Sequential { .. } => "sequential".into(),
            StrategyConfig::EntropyBlocked(c) => match (c.proxy, c.rule) {
                (Proxy::Entropy, RuleKind::Eq7) => "entropy_blocked".into(),
                (Proxy::QuantError, RuleKind::Eq7) => "entropy_blocked[quant_error]".into(),
                (Proxy::Entropy, RuleKind::ReleasedGate) => "entropy_blocked[released_gate]".into(),
                (Proxy::QuantError, RuleKind::ReleasedGate) => {
                    "entropy_blocked[quant_error,released_gate]".into()
                }
            },
            StrategyConfig::Oracle { window, .. } => format!("oracle[{window}]"),
            StrategyConfig::Disentangled { then, .. } => format!("disentangled+{}", then.name()),
        }
    }
}

/// Progress callback: (done, total, what).
pub type Progress<'p> = &'p mut dyn FnMut(usize, usize, &str);

/// Runs a strategy on a float model. The model's weights are left as they were; apply the
/// returned plan with [`crate::plan::apply`].
pub fn run(
    model: &mut Llava,
    calib: &CalibrationSet,
    scheme: Scheme,
    weights: WeightMethod,
    strategy: &StrategyConfig,
    progress: Progress<'_>,
) -> Result<QuantPlan> {
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
        other => {
            let mut engine = Engine::new(model, calib, scheme)?;
            let groups = walk_with(&mut engine, weights, other, &Default::default(), progress)?;
            let deps = groups.1;
            let mut plan = engine.into_plan(&other.name());
            plan.groups = groups.0;
            plan.dependencies = deps;
            Ok(plan)
        }
    }
}

/// Walks the engine with a non-VEO strategy; sites in `fixed` are decided with the given
/// quantizers instead of being searched.
pub(crate) fn walk_with(
    engine: &mut Engine<'_>,
    weights: WeightMethod,
    strategy: &StrategyConfig,
    fixed: &std::collections::BTreeMap<
        qvlm_core::layer_id::LayerId,
        Option<qvlm_core::quant::activation::ActQuantizer>,
    >,
    progress: Progress<'_>,
) -> Result<(
    Vec<crate::plan::GroupRecord>,
    std::collections::BTreeMap<qvlm_core::layer_id::LayerId, f64>,
)> {
    let mut groups = Vec::new();
    let mut deps = std::collections::BTreeMap::new();
    let mut running = Vec::new();
    // Resolve a quantile h0 against the model's dependencies needs them all first: a first walk
    // measures them (its cost is part of the strategy's cost).
    let resolved_h0 = match strategy {
        StrategyConfig::EntropyBlocked(cfg) => match cfg.h0 {
            Threshold::Absolute(v) => Some(v),
            Threshold::Quantile(_) => {
                let all = blocked::measure_dependencies(engine, weights, cfg, progress)?;
                Some(cfg.h0.resolve(&all.values().copied().collect::<Vec<_>>()))
            }
        },
        _ => None,
    };
    engine.walk(
        weights,
        |eng, state| {
            let fixed_here: Vec<usize> = state
                .site_indices
                .iter()
                .copied()
                .filter(|&i| fixed.contains_key(&eng.sites[i].id))
                .collect();
            for &i in &fixed_here {
                let site = eng.sites[i].clone();
                eng.decide(&site, fixed[&site.id].as_ref())?;
            }
            let free: Vec<usize> =
                state.site_indices.iter().copied().filter(|i| !fixed_here.contains(i)).collect();
            match strategy {
                StrategyConfig::Rtn => simple::decide_fixed(eng, state, &free, Clip::MinMax),
                StrategyConfig::LpInit { p, ratios } => {
                    simple::decide_lp(eng, state, &free, *p, ratios)
                }
                StrategyConfig::Sequential { candidates } => {
                    simple::decide_sequential(eng, state, &free, &candidates.clips()?)
                }
                StrategyConfig::EntropyBlocked(cfg) => {
                    let h0 = resolved_h0.unwrap_or(f64::INFINITY);
                    let (g, d) = blocked::decide_blocked(eng, state, &free, cfg, h0, &mut running)?;
                    groups.extend(g);
                    deps.extend(d);
                    Ok(())
                }
                StrategyConfig::Oracle { candidates, window } => {
                    let g =
                        blocked::decide_windows(eng, state, &free, &candidates.clips()?, *window)?;
                    groups.extend(g);
                    Ok(())
                }
                StrategyConfig::Disentangled { .. } => {
                    Err(setting("strategy", "disentangled cannot be nested"))
                }
            }
        },
        |i, n, b| progress(i, n, &format!("search {b}")),
    )?;
    Ok((groups, deps))
}
