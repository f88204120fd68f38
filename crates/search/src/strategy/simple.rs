//! Strategies that decide each site on its own: min–max (`rtn`), lp-distance clipping
//! (`lp_init`, QLoRA's initialization) and the greedy layer-wise search of Eq. 2 (`sequential`).

use std::collections::BTreeMap;

use qvlm_core::quant::spec::Clip;
use tch::Kind;

use crate::engine::{quantizes_activations, BlockState, Engine};
use crate::error::Result;

/// Every site of the block with one clip setting.
pub fn decide_fixed(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
    clip: Clip,
) -> Result<()> {
    for &i in sites {
        let site = eng.sites[i].clone();
        if !quantizes_activations(&eng.scheme, &site) {
            eng.decide(&site, None)?;
            continue;
        }
        let xq = eng.capture_quantized(state, &BTreeMap::new(), &[site.id])?;
        let q = eng.quantizer(&site, &xq[&site.id], clip)?;
        eng.decide(&site, q.as_ref())?;
    }
    Ok(())
}

/// QLoRA-style initialization: per site, the clip ratio minimising ‖Q(x) − x‖_p^p on the site's
/// (quantized-prefix) input.
pub fn decide_lp(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
    p: f64,
    ratios: &[f64],
) -> Result<()> {
    for &i in sites {
        let site = eng.sites[i].clone();
        if !quantizes_activations(&eng.scheme, &site) {
            eng.decide(&site, None)?;
            continue;
        }
        let xq = eng.capture_quantized(state, &BTreeMap::new(), &[site.id])?;
        let x = &xq[&site.id];
        let scaled = match eng.input_scale(&site) {
            Some(s) => x * s.reciprocal().to_device(x.device()),
            None => x.shallow_clone(),
        };
        let mut best = (f64::INFINITY, None);
        let clips: Vec<Clip> = ratios.iter().map(|&r| Clip::Ratio(r)).collect();
        for q in eng.quantizers(&site, x, &clips)? {
            let Some(q) = q else { continue };
            let rows = eng.real_rows(&site, &scaled);
            let qrows = eng.real_rows(&site, &q.apply(&scaled));
            let err = (qrows - rows).abs().pow_tensor_scalar(p).sum(Kind::Double).double_value(&[]);
            eng.meter.report.candidate_evaluations += 1;
            if err < best.0 {
                best = (err, Some(q));
            }
        }
        eng.decide(&site, best.1.as_ref())?;
    }
    Ok(())
}

/// Eq. 2: sites in execution order, each picking the candidate that minimises its own
/// layer-output error with the prefix already quantized.
pub fn decide_sequential(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
    clips: &[Clip],
) -> Result<()> {
    for &i in sites {
        let site = eng.sites[i].clone();
        if !quantizes_activations(&eng.scheme, &site) {
            eng.decide(&site, None)?;
            continue;
        }
        let xq = eng.capture_quantized(state, &BTreeMap::new(), &[site.id])?;
        let xq = &xq[&site.id];
        let xr = state.float_inputs[&site.id].shallow_clone();
        let mut best = (f64::INFINITY, None);
        for q in eng.quantizers(&site, xq, clips)? {
            let err = eng.site_error(&site, q.as_ref(), xq, &xr)?;
            if err < best.0 {
                best = (err, q);
            }
        }
        eng.decide(&site, best.1.as_ref())?;
    }
    Ok(())
}
