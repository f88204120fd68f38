//! Cross-layer dependency mining (Q-VLM Eq. 3–7): dependencies between consecutive sites,
//! partition into blocks of jointly searched sites, and the joint search itself. Also the
//! fixed-window oracle and the DED measurement of Fig. 2.
//!
//! Groups never cross a pipeline block (transformer layer or projector): a group's joint search
//! re-runs one layer per evaluated prefix combination.

use std::collections::BTreeMap;

use qvlm_core::layer_id::LayerId;
use qvlm_core::quant::activation::ActQuantizer;
use qvlm_core::quant::spec::Clip;
use qvlm_core::quant::uniform::QParams;
use tch::{Kind, Tensor};

use super::config::{BlockedConfig, Progress, Proxy, RuleKind};
use crate::engine::{quantizes_activations, BlockState, Engine, WeightMethod};
use crate::entropy::{
    code_units, conditional_entropy, level_distribution_of_codes, subsample, EntropyConfig,
};
use crate::error::Result;
use crate::partition::{partition, PartitionRule};
use crate::plan::{DedPoint, GroupRecord};
use crate::site::Site;

/// Static parameters standing for a quantizer when measuring entropy (dynamic quantizers use
/// the input's own min–max per their granularity).
fn params_for(eng: &Engine<'_>, site: &Site, q: &ActQuantizer, x: &Tensor) -> Result<QParams> {
    if let Some(p) = &q.params {
        return Ok(p.clone());
    }
    let _ = (eng, site);
    let (lo, hi) = crate::ranges::static_range(
        x,
        None,
        match q.spec.granularity {
            g @ (qvlm_core::quant::spec::Granularity::PerTensor
            | qvlm_core::quant::spec::Granularity::PerChannel) => g,
            _ => qvlm_core::quant::spec::Granularity::PerChannel,
        },
        Clip::MinMax,
    )?;
    Ok(QParams::from_range(q.spec.grid, &lo, &hi))
}

/// Per-row level distributions `[N, M]` of a site's quantized input (real rows, subsampled).
fn distributions(
    eng: &Engine<'_>,
    site: &Site,
    q: &ActQuantizer,
    x: &Tensor,
    cfg: &EntropyConfig,
) -> Result<Tensor> {
    let params = params_for(eng, site, q, x)?;
    // Code units first (the parameters broadcast against `[B, T, C]`), then the real rows and the
    // estimator's subsample: two tensors of the site input's size, where expanding the parameters
    // to it first took five (not what put CDM over the memory formula on s3: see joint_search).
    let rows = eng.real_rows(site, &code_units(x, &params));
    Ok(level_distribution_of_codes(&subsample(&rows, cfg), params.grid, cfg))
}

/// Relative quantization error ‖Q(x) − x‖² / ‖x‖² on the real rows.
fn quant_error(eng: &Engine<'_>, site: &Site, q: &ActQuantizer, x: &Tensor) -> f64 {
    let rows = eng.real_rows(site, x);
    let qrows = eng.real_rows(site, &q.apply(x));
    let num = (qrows - &rows).pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]);
    let den = rows.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]).max(1e-30);
    num / den
}

/// Min–max quantized inputs of the block's sites in order (each under the decided prefix and the
/// earlier sites of the block at min–max): `(site index, input, quantizer)`.
fn minmax_chain(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
) -> Result<Vec<(usize, Tensor, ActQuantizer)>> {
    let mut overrides: BTreeMap<LayerId, Option<ActQuantizer>> = BTreeMap::new();
    let mut out = Vec::new();
    for &i in sites {
        let site = eng.sites[i].clone();
        let cap = eng.capture_quantized(state, &overrides, &[site.id])?;
        let x = cap[&site.id].shallow_clone();
        if let Some(q) = eng.quantizer(&site, &x, Clip::MinMax)? {
            overrides.insert(site.id, Some(q.clone()));
            out.push((i, x, q));
        }
    }
    Ok(out)
}

/// D(k, k+1) for consecutive quantizing sites of a block, by the configured proxy.
fn block_dependencies(
    eng: &mut Engine<'_>,
    chain: &[(usize, Tensor, ActQuantizer)],
    cfg: &BlockedConfig,
) -> Result<Vec<f64>> {
    let started = std::time::Instant::now();
    let mut deps = Vec::new();
    let mut elements = 0u64;
    for pair in chain.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let (sa, sb) = (eng.sites[a.0].clone(), eng.sites[b.0].clone());
        let d = match cfg.proxy {
            Proxy::Entropy => {
                let pa = distributions(eng, &sa, &a.2, &a.1, &cfg.entropy)?;
                let pb = distributions(eng, &sb, &b.2, &b.1, &cfg.entropy)?;
                elements += (pa.numel() + pb.numel()) as u64;
                let n = pa.size()[0].min(pb.size()[0]);
                conditional_entropy(&pa.narrow(0, 0, n), &pb.narrow(0, 0, n)).double_value(&[])
            }
            Proxy::QuantError => {
                elements += (a.1.numel() + b.1.numel()) as u64;
                0.5 * (quant_error(eng, &sa, &a.2, &a.1) + quant_error(eng, &sb, &b.2, &b.1))
            }
        };
        deps.push(d);
    }
    let report = &mut eng.meter.report;
    report.dependency_evaluations += deps.len() as u64;
    report.dependency_elements += elements;
    report.dependency_seconds += started.elapsed().as_secs_f64();
    Ok(deps)
}

/// A first walk measuring every dependency with min–max quantizers (to resolve a quantile h0);
/// decisions are discarded afterwards.
pub fn measure_dependencies(
    eng: &mut Engine<'_>,
    weights: WeightMethod,
    cfg: &BlockedConfig,
    progress: Progress<'_>,
) -> Result<BTreeMap<LayerId, f64>> {
    let mut all = BTreeMap::new();
    eng.walk(
        weights,
        |eng, state| {
            let quantizing: Vec<usize> = state
                .site_indices
                .iter()
                .copied()
                .filter(|&i| quantizes_activations(&eng.scheme, &eng.sites[i]))
                .collect();
            let chain = minmax_chain(eng, state, &quantizing)?;
            let deps = block_dependencies(eng, &chain, cfg)?;
            for (w, d) in chain.windows(2).zip(deps) {
                all.insert(eng.sites[w[0].0].id, d);
            }
            for (i, _, q) in &chain {
                let site = eng.sites[*i].clone();
                eng.decide(&site, Some(q))?;
            }
            for &i in &state.site_indices {
                let site = eng.sites[i].clone();
                if !eng.decided.contains_key(&site.id) {
                    eng.decide(&site, None)?;
                }
            }
            Ok(())
        },
        |i, n, b| progress(i, n, &format!("dependencies {b}")),
    )?;
    eng.reset_decisions();
    Ok(all)
}

/// Result of a joint search over one group.
struct Joint {
    choice: Vec<usize>,
    objective: f64,
    sequential: Vec<usize>,
    sequential_objective: f64,
    candidates: Vec<Vec<ActQuantizer>>,
}

/// Sequential warm start, then joint search (exhaustive or coordinate descent) of a group's
/// candidates minimising the error at the group's last site.
fn joint_search(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    group: &[usize],
    clips: &[Clip],
    limit: usize,
) -> Result<Joint> {
    let ids: Vec<LayerId> = group.iter().map(|&i| eng.sites[i].id).collect();
    let mut overrides: BTreeMap<LayerId, Option<ActQuantizer>> = BTreeMap::new();
    let mut candidates: Vec<Vec<ActQuantizer>> = Vec::new();
    let mut sequential = Vec::new();
    // Objective of each combination evaluated so far: every distinct combination is evaluated
    // (and counted) once. The warm start's last-site evaluations are combinations too (the
    // sequential prefix + each candidate), so a group of one costs one evaluation per candidate.
    let mut known: BTreeMap<Vec<usize>, f64> = BTreeMap::new();
    for (k, &i) in group.iter().enumerate() {
        let site = eng.sites[i].clone();
        let cap = eng.capture_quantized(state, &overrides, &[site.id])?;
        let xq = &cap[&site.id];
        let xr = state.float_inputs[&site.id].shallow_clone();
        let mut cands = Vec::new();
        let mut best = (f64::INFINITY, 0);
        for q in eng.quantizers(&site, xq, clips)?.into_iter().flatten() {
            let err = eng.site_error(&site, Some(&q), xq, &xr)?;
            if k == group.len() - 1 {
                let mut combo = sequential.clone();
                combo.push(cands.len());
                known.insert(combo, err);
            }
            if err < best.0 {
                best = (err, cands.len());
            }
            cands.push(q);
        }
        overrides.insert(ids[k], Some(cands[best.1].clone()));
        sequential.push(best.1);
        candidates.push(cands);
    }
    let last = group[group.len() - 1];
    let last_site = eng.sites[last].clone();
    let xr_last = state.float_inputs[&last_site.id].shallow_clone();
    let sizes: Vec<usize> = candidates.iter().map(Vec::len).collect();
    let combos: usize = sizes.iter().product();
    let exhaustive = combos <= limit;
    // The last site's input under each prefix of choices evaluated. The exhaustive search varies
    // the last choice fastest, so it needs only the current prefix's: it keeps one, where keeping
    // all would hold, for a group of depth 3 over 5 candidates, 25 captures of a site's
    // calibration inputs at once (issue #21: CDM on s3 peaked at 115 % of the memory formula with
    // them, 101 % without, same plan). Coordinate descent revisits prefixes across its
    // sweeps and keeps them all, as before (its forward-pass counts are unchanged).
    let mut prefix_cache: BTreeMap<Vec<usize>, Tensor> = BTreeMap::new();
    let mut evaluate = |eng: &mut Engine<'_>, combo: &[usize]| -> Result<f64> {
        if let Some(&v) = known.get(combo) {
            return Ok(v);
        }
        let prefix = combo[..combo.len() - 1].to_vec();
        if !prefix_cache.contains_key(&prefix) {
            if exhaustive {
                prefix_cache.clear();
            }
            let ov: BTreeMap<LayerId, Option<ActQuantizer>> = prefix
                .iter()
                .enumerate()
                .map(|(k, &c)| (ids[k], Some(candidates[k][c].clone())))
                .collect();
            let cap = eng.capture_quantized(state, &ov, &[last_site.id])?;
            prefix_cache.insert(prefix.clone(), cap[&last_site.id].shallow_clone());
        }
        let xq = prefix_cache[&prefix].shallow_clone();
        let v = eng.site_error(
            &last_site,
            Some(&candidates[combo.len() - 1][combo[combo.len() - 1]]),
            &xq,
            &xr_last,
        )?;
        known.insert(combo.to_vec(), v);
        Ok(v)
    };
    let sequential_objective = evaluate(eng, &sequential)?;
    let (mut choice, mut objective) = (sequential.clone(), sequential_objective);
    if exhaustive {
        let mut combo = vec![0usize; sizes.len()];
        loop {
            let v = evaluate(eng, &combo)?;
            if v < objective {
                objective = v;
                choice = combo.clone();
            }
            // Odometer increment.
            let mut k = sizes.len();
            loop {
                if k == 0 {
                    break;
                }
                k -= 1;
                combo[k] += 1;
                if combo[k] < sizes[k] {
                    break;
                }
                combo[k] = 0;
                if k == 0 {
                    k = usize::MAX;
                    break;
                }
            }
            if k == usize::MAX {
                break;
            }
        }
    } else {
        // Coordinate descent from the sequential solution.
        for _sweep in 0..3 {
            let mut improved = false;
            for k in 0..sizes.len() {
                for c in 0..sizes[k] {
                    let mut trial = choice.clone();
                    trial[k] = c;
                    let v = evaluate(eng, &trial)?;
                    if v < objective {
                        objective = v;
                        choice = trial;
                        improved = true;
                    }
                }
            }
            if !improved {
                break;
            }
        }
    }
    Ok(Joint { choice, objective, sequential, sequential_objective, candidates })
}

/// Fig. 2 for one window (see [`DedPoint`]): per calibration sample, the layer-wise and the joint
/// search among the window's candidates, and the sample's dependency over the window.
///
/// Every site's per-sample error is tabulated for every prefix of choices before it (Σ_k n^k
/// captures), so both searches are exact for each sample: the layer-wise one follows the
/// sample's own greedy path through the table, the joint one takes the table's minimum over
/// whole combinations.
fn ded_points(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    group: &[usize],
    joint: &Joint,
    cfg: &EntropyConfig,
) -> Result<Vec<DedPoint>> {
    let ids: Vec<LayerId> = group.iter().map(|&i| eng.sites[i].id).collect();
    let sites: Vec<Site> = group.iter().map(|&i| eng.sites[i].clone()).collect();
    let w = group.len();
    let sizes: Vec<usize> = joint.candidates.iter().map(Vec::len).collect();
    let overrides = |prefix: &[usize]| -> BTreeMap<LayerId, Option<ActQuantizer>> {
        prefix
            .iter()
            .enumerate()
            .map(|(k, &c)| (ids[k], Some(joint.candidates[k][c].clone())))
            .collect()
    };
    // Per-sample sums of per-row values.
    let per_sample = |values: &Tensor, samples: &Tensor, count: i64| -> Result<Vec<f64>> {
        let sums = Tensor::zeros([count], (Kind::Double, values.device()))
            .index_add(0, &samples.to_device(values.device()), &values.to_kind(Kind::Double))
            .to_device(tch::Device::Cpu);
        Ok(Vec::<f64>::try_from(&sums)?)
    };
    let count = {
        let xr = &state.float_inputs[&ids[0]];
        eng.row_samples(&sites[0], xr).max().int64_value(&[]) + 1
    };
    // errors[k][prefix][c][sample]: site k's error with `prefix` before it and candidate c.
    let mut errors: Vec<BTreeMap<Vec<usize>, Vec<Vec<f64>>>> = vec![BTreeMap::new(); w];
    for k in 0..w {
        let xr = state.float_inputs[&ids[k]].shallow_clone();
        let mut prefix = vec![0usize; k];
        loop {
            let cap = eng.capture_quantized(state, &overrides(&prefix), &[ids[k]])?;
            let xq = cap[&ids[k]].shallow_clone();
            let samples = eng.row_samples(&sites[k], &xq);
            let mut by_candidate = Vec::with_capacity(sizes[k]);
            for c in 0..sizes[k] {
                let rows =
                    eng.site_error_rows(&sites[k], Some(&joint.candidates[k][c]), &xq, &xr)?;
                by_candidate.push(per_sample(&rows, &samples, count)?);
            }
            errors[k].insert(prefix.clone(), by_candidate);
            // Next prefix (odometer over the earlier sites' candidates).
            let mut j = k;
            let done = loop {
                if j == 0 {
                    break true;
                }
                j -= 1;
                prefix[j] += 1;
                if prefix[j] < sizes[j] {
                    break false;
                }
                prefix[j] = 0;
            };
            if done {
                break;
            }
        }
    }
    let last = w - 1;
    let xr_last = state.float_inputs[&ids[last]].shallow_clone();
    let energy = {
        let rows = eng.float_output_energy_rows(&sites[last], &xr_last)?;
        per_sample(&rows, &eng.row_samples(&sites[last], &xr_last), count)?
    };
    // The sample's dependency over the window under the batch-level sequential quantizers.
    let cap = eng.capture_quantized(state, &overrides(&joint.sequential[..last]), &ids)?;
    let full = EntropyConfig { max_rows: i64::MAX, ..*cfg };
    let mut dists = Vec::with_capacity(w);
    for k in 0..w {
        let x = &cap[&ids[k]];
        let q = &joint.candidates[k][joint.sequential[k]];
        dists.push((distributions(eng, &sites[k], q, x, &full)?, eng.row_samples(&sites[k], x)));
    }
    let mut points = Vec::new();
    for s in 0..count {
        let su = s as usize;
        // Layer-wise for this sample: each site picks its best candidate after the sample's own
        // earlier picks.
        let mut path: Vec<usize> = Vec::with_capacity(w);
        for k in 0..w {
            let by_c = &errors[k][&path];
            // (The window's candidate lists are never empty: `CandidateGrid::clips` refuses it.)
            let best = (1..sizes[k]).fold(0, |b, c| if by_c[c][su] < by_c[b][su] { c } else { b });
            path.push(best);
        }
        let layerwise = errors[last][&path[..last]][path[last]][su];
        let joint_best = errors[last]
            .values()
            .flat_map(|by_c| by_c.iter().map(|v| v[su]))
            .fold(f64::INFINITY, f64::min);
        let mut entropy = 0.0;
        for k in 0..last {
            let (pa, sa) = &dists[k];
            let (pb, sb) = &dists[k + 1];
            let ia = sa.eq(s).nonzero().squeeze_dim(1);
            let ib = sb.eq(s).nonzero().squeeze_dim(1);
            let n = ia.size()[0].min(ib.size()[0]);
            if n > 0 {
                entropy += conditional_entropy(
                    &pa.index_select(0, &ia.narrow(0, 0, n)),
                    &pb.index_select(0, &ib.narrow(0, 0, n)),
                )
                .double_value(&[]);
            }
        }
        let e = energy[su];
        if !(e > 0.0 && layerwise.is_finite() && joint_best.is_finite()) {
            return Err(crate::error::SearchError::Calibration(format!(
                "window at {}: sample {su} has no finite DED (errors {layerwise}, {joint_best}, float energy {e})",
                ids[0]
            )));
        }
        points.push(DedPoint {
            site: ids[0],
            sample: su,
            ded: (layerwise - joint_best) / e,
            entropy,
            window: w,
            layerwise_error: layerwise,
            joint_error: joint_best,
            energy: e,
        });
    }
    Ok(points)
}

fn record(
    eng: &mut Engine<'_>,
    group: &[usize],
    joint: &Joint,
    deps: Vec<f64>,
    reason: String,
) -> Result<GroupRecord> {
    for (k, &i) in group.iter().enumerate() {
        let site = eng.sites[i].clone();
        eng.decide(&site, Some(&joint.candidates[k][joint.choice[k]]))?;
    }
    Ok(GroupRecord {
        sites: group.iter().map(|&i| eng.sites[i].id).collect(),
        dependencies: deps,
        reason,
        choice: joint.choice.clone(),
        objective: joint.objective,
        sequential_objective: joint.sequential_objective,
    })
}

/// Decides the sites whose activations stay in float (no quantizer) and returns the others, in
/// order: what a joint search works on.
fn decide_float_sites(eng: &mut Engine<'_>, sites: &[usize]) -> Result<Vec<usize>> {
    let quantizing: Vec<usize> = sites
        .iter()
        .copied()
        .filter(|&i| quantizes_activations(&eng.scheme, &eng.sites[i]))
        .collect();
    for &i in sites.iter().filter(|i| !quantizing.contains(i)) {
        let site = eng.sites[i].clone();
        eng.decide(&site, None)?;
    }
    Ok(quantizing)
}

/// Eq. 3–7 on one block: dependencies, partition, joint search per group.
pub fn decide_blocked(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
    cfg: &BlockedConfig,
    h0: f64,
    running: &mut Vec<f64>,
) -> Result<(Vec<GroupRecord>, BTreeMap<LayerId, f64>)> {
    let clips = cfg.candidates.clips()?;
    let quantizing = decide_float_sites(eng, sites)?;
    let chain = minmax_chain(eng, state, &quantizing)?;
    let deps = block_dependencies(eng, &chain, cfg)?;
    let mut dep_map = BTreeMap::new();
    for (w, d) in chain.windows(2).zip(&deps) {
        dep_map.insert(eng.sites[w[0].0].id, *d);
    }
    let rule = match cfg.rule {
        RuleKind::Eq7 => PartitionRule::Eq7 { h0, max_depth: cfg.max_depth },
        RuleKind::ReleasedGate => PartitionRule::ReleasedGate { max_depth: cfg.max_depth },
    };
    let groups = partition(&deps, quantizing.len(), rule, running);
    let mut records = Vec::new();
    for g in groups {
        let members: Vec<usize> = quantizing[g.start..g.end].to_vec();
        let joint = joint_search(eng, state, &members, &clips, cfg.exhaustive_limit)?;
        let gdeps = deps
            .get(g.start..g.end.saturating_sub(1).max(g.start))
            .map(<[f64]>::to_vec)
            .unwrap_or_default();
        records.push(record(eng, &members, &joint, gdeps, g.reason)?);
    }
    Ok((records, dep_map))
}

/// The oracle: fixed windows of `window` consecutive sites searched jointly (exhaustively when
/// small), with DED points recorded for every window of two or more sites.
pub fn decide_windows(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
    clips: &[Clip],
    window: usize,
) -> Result<Vec<GroupRecord>> {
    let quantizing = decide_float_sites(eng, sites)?;
    let mut records = Vec::new();
    for members in quantizing.chunks(window.max(1)) {
        let joint = joint_search(eng, state, members, clips, usize::MAX)?;
        if members.len() >= 2 {
            let points = ded_points(eng, state, members, &joint, &EntropyConfig::default())?;
            eng.ded.extend(points);
        }
        records.push(record(eng, members, &joint, vec![], format!("window of {}", members.len()))?);
    }
    Ok(records)
}
