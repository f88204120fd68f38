//! Strategies that decide each site on its own: min–max (`rtn`), lp-distance clipping
//! (`lp_init`, QLoRA's initialization) and the greedy layer-wise search of Eq. 2 (`sequential`).

use std::collections::BTreeMap;

use qvlm_core::quant::activation::ActQuantizer;
use qvlm_core::quant::spec::Clip;
use tch::{Kind, Tensor};

use crate::engine::{quantizes_activations, BlockState, Engine};
use crate::error::{Result, SearchError};
use crate::site::Site;

/// Every site of the block with one clip setting.
pub fn decide_fixed(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
    clip: Clip,
) -> Result<()> {
    decide_each(eng, state, sites, |eng, site, xq| eng.quantizer(site, xq, clip))
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
    let clips: Vec<Clip> = ratios.iter().map(|&r| Clip::Ratio(r)).collect();
    decide_each(eng, state, sites, |eng, site, x| {
        let scaled = match eng.input_scale(site) {
            Some(s) => x * s.reciprocal().to_device(x.device()),
            None => x.shallow_clone(),
        };
        let candidates = eng.quantizers(site, x, &clips)?.into_iter().flatten();
        lowest_error(candidates, |q| {
            let rows = eng.real_rows(site, &scaled);
            let qrows = eng.real_rows(site, &q.apply(&scaled));
            let err = (qrows - rows).abs().pow_tensor_scalar(p).sum(Kind::Double).double_value(&[]);
            eng.meter.report.candidate_evaluations += 1;
            Ok(err)
        })
    })
}

/// Eq. 2: sites in execution order, each picking the candidate that minimises its own
/// layer-output error with the prefix already quantized.
pub fn decide_sequential(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
    clips: &[Clip],
) -> Result<()> {
    decide_each(eng, state, sites, |eng, site, xq| {
        let xr = state.float_inputs[&site.id].shallow_clone();
        let candidates = eng.quantizers(site, xq, clips)?;
        let best = lowest_error(candidates, |q| eng.site_error(site, q.as_ref(), xq, &xr))?;
        Ok(best.flatten())
    })
}

/// Decides `sites` in order: a site whose activations stay in float gets no quantizer, any other
/// the one `choose` picks from its input under the already-quantized prefix.
fn decide_each(
    eng: &mut Engine<'_>,
    state: &BlockState<'_>,
    sites: &[usize],
    mut choose: impl FnMut(&mut Engine<'_>, &Site, &Tensor) -> Result<Option<ActQuantizer>>,
) -> Result<()> {
    for &i in sites {
        let site = eng.sites[i].clone();
        if !quantizes_activations(&eng.scheme, &site) {
            eng.decide(&site, None)?;
            continue;
        }
        let xq = eng.capture_quantized(state, &BTreeMap::new(), &[site.id])?;
        let q = choose(eng, &site, &xq[&site.id])?;
        if q.is_none() {
            // Leaving a quantized site in float would be a silent fallback.
            return Err(SearchError::Calibration(format!(
                "{}: no candidate quantizer has a finite error on the calibration data",
                site.id
            )));
        }
        eng.decide(&site, q.as_ref())?;
    }
    Ok(())
}

/// The candidate with the strictly lowest error (the first on ties); `None` when none has a
/// finite error.
fn lowest_error<T>(
    candidates: impl IntoIterator<Item = T>,
    mut error: impl FnMut(&T) -> Result<f64>,
) -> Result<Option<T>> {
    let mut best = (f64::INFINITY, None);
    for c in candidates {
        let err = error(&c)?;
        if err < best.0 {
            best = (err, Some(c));
        }
    }
    Ok(best.1)
}
