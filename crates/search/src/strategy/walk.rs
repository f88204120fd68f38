//! The block-by-block walk of a base strategy: every site decided in execution order, each block
//! by the strategy's rule (or at a range fixed beforehand, e.g. by VEO).

use std::collections::BTreeMap;

use qvlm_core::layer_id::LayerId;
use qvlm_core::quant::activation::ActQuantizer;
use qvlm_core::quant::spec::Clip;

use super::config::{BaseStrategy, Progress};
use super::{blocked, simple};
use crate::calib::CalibrationSet;
use crate::engine::{Engine, WeightMethod};
use crate::error::{setting, Result};
use crate::model::SearchModel;
use crate::partition::Threshold;
use crate::plan::{GroupRecord, QuantPlan, Scheme};

/// The plan of a base strategy on a float model (left as it was).
pub(crate) fn plan(
    model: &mut dyn SearchModel,
    calib: &CalibrationSet,
    scheme: Scheme,
    weights: WeightMethod,
    base: &BaseStrategy,
    progress: Progress<'_>,
) -> Result<QuantPlan> {
    let mut engine = Engine::new(model, calib, scheme)?;
    let (groups, deps) = walk_with(&mut engine, weights, base, &BTreeMap::new(), progress)?;
    let mut plan = engine.into_plan(&base.name());
    plan.groups = groups;
    plan.dependencies = deps;
    Ok(plan)
}

/// Walks the engine with a base strategy; sites in `fixed` are decided with the given
/// quantizers instead of being searched.
pub(crate) fn walk_with(
    engine: &mut Engine<'_>,
    weights: WeightMethod,
    strategy: &BaseStrategy,
    fixed: &BTreeMap<LayerId, Option<ActQuantizer>>,
    progress: Progress<'_>,
) -> Result<(Vec<GroupRecord>, BTreeMap<LayerId, f64>)> {
    let mut groups = Vec::new();
    let mut deps = BTreeMap::new();
    let mut running = Vec::new();
    // Resolve a quantile h0 against the model's dependencies needs them all first: a first walk
    // measures them (its cost is part of the strategy's cost).
    let resolved_h0 = match strategy {
        BaseStrategy::EntropyBlocked(cfg) => match cfg.h0 {
            Threshold::Absolute(v) => Some(v),
            Threshold::Quantile(_) => {
                let all = blocked::measure_dependencies(engine, weights, cfg, progress)?;
                let h0 = cfg.h0.resolve(&all.values().copied().collect::<Vec<_>>());
                Some(h0.ok_or_else(|| {
                    setting("h0", "no finite dependency in the model to take a quantile of")
                })?)
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
                BaseStrategy::Rtn {} => simple::decide_fixed(eng, state, &free, Clip::MinMax),
                BaseStrategy::LpInit { p, ratios } => {
                    simple::decide_lp(eng, state, &free, *p, ratios)
                }
                BaseStrategy::Sequential { candidates } => {
                    simple::decide_sequential(eng, state, &free, &candidates.clips()?)
                }
                BaseStrategy::EntropyBlocked(cfg) => {
                    let h0 = resolved_h0.ok_or_else(|| setting("h0", "not resolved"))?;
                    let (g, d) = blocked::decide_blocked(eng, state, &free, cfg, h0, &mut running)?;
                    groups.extend(g);
                    deps.extend(d);
                    Ok(())
                }
                BaseStrategy::Oracle { candidates, window } => {
                    let g =
                        blocked::decide_windows(eng, state, &free, &candidates.clips()?, *window)?;
                    groups.extend(g);
                    Ok(())
                }
            }
        },
        |i, n, b| progress(i, n, &format!("search {b}")),
    )?;
    Ok((groups, deps))
}
