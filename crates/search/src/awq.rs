//! AWQ-style activation-aware weight quantization (Lin et al., 2024): a per-input-channel scale
//! `s = mean|x|^α`, α searched on a grid to minimise the output error of the quantized weights,
//! then a per-output-row clipping search.
//! <https://github.com/mit-han-lab/llm-awq/blob/3665e1abb0c6f8b4e0d6b5a1d7a3f8c5d1ad8e1b/awq/quantize/auto_scale.py#L98-L140>

use qvlm_core::quant::spec::{Granularity, WeightSpec};
use qvlm_core::quant::uniform::{Grid, QParams};
use qvlm_core::quant::weight::{group_len, QuantizedWeight};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Result, SearchError};
use crate::site::{FoldTarget, Site};

/// Which sites AWQ scales.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AwqSites {
    /// Every site with quantized weights (this project's first choice, kept as the default so
    /// earlier results stand): the scale lives in the fake-quant hook, so a site after a GELU
    /// or under grouped-query attention is scaled too, and such plans export as llava-hf only.
    #[default]
    All,
    /// Only the sites whose scale folds into the operation before them ([`foldable`]): llm-awq's
    /// choice (`auto_scale_block`: q/k/v after the norm, o_proj only where v_proj and o_proj
    /// have the same shape, gate/up, down_proj), which deployable checkpoints need. The other
    /// sites get the clip search alone.
    Foldable,
}

impl AwqSites {
    pub fn is_all(&self) -> bool {
        *self == AwqSites::All
    }
}

/// Whether `site`'s scale folds into the operation producing its input
/// ([`Site::fold_target`]), with llm-awq's rule for the attention output: v_proj and o_proj of
/// the same shape (no grouped-query attention)
/// <https://github.com/mit-han-lab/llm-awq/blob/3665e1abb0c6f8b4e0d6b5a1d7a3f8c5d1ad8e1b/awq/quantize/auto_scale.py#L183-L193>.
pub fn foldable(
    site: &Site,
    weights: &std::collections::BTreeMap<qvlm_core::layer_id::LayerId, Tensor>,
) -> bool {
    match site.fold_target() {
        None => false,
        Some(FoldTarget::Rows(slot @ qvlm_core::layer_id::Slot::VProj)) => {
            let v = qvlm_core::layer_id::LayerId::new(site.id.tower, site.id.block, slot);
            weights.get(&v).zip(weights.get(&site.id)).is_some_and(|(v, o)| v.size() == o.size())
        }
        Some(_) => true,
    }
}

/// RTN with per-output-row clipping ratios `ratio` `[out, 1]` applied to each group's range.
pub fn clipped_rtn(
    w: &Tensor,
    grid: Grid,
    granularity: Granularity,
    ratio: &Tensor,
    layer: &str,
) -> Result<Tensor> {
    let (out, inp) = (w.size()[0], w.size()[1]);
    let group = match granularity {
        Granularity::PerTensor => inp,
        g => group_len(g, inp, layer)?,
    };
    let g = w.reshape([out, inp / group, group]);
    let r = ratio.reshape([out, 1, 1]);
    let qp = QParams::from_range(grid, &(g.amin(-1, true) * &r), &(g.amax(-1, true) * &r));
    Ok(qp.fake_quant(&g).reshape([out, inp]))
}

fn fake_weight(w: &Tensor, spec: &WeightSpec, layer: &str) -> Result<Tensor> {
    Ok(QuantizedWeight::quantize(w, spec, layer)?.dequantize().to_device(w.device()))
}

/// Output error `Σ ||x Wᵀ − x Ŵᵀ||²` of several consumers.
fn output_error(x: &Tensor, pairs: &[(Tensor, Tensor)]) -> f64 {
    pairs
        .iter()
        .map(|(w, wq)| {
            (x.matmul(&(wq - w).tr())).pow_tensor_scalar(2).sum(Kind::Double).double_value(&[])
        })
        .sum()
}

/// AWQ's scale search for one site: `x` `[N, in]` (f32 rows), `weights` of the site's consumers.
/// Returns the scale `s` `[in]` (normalised as AWQ does) and the objective per grid point.
pub fn search_scale(
    x: &Tensor,
    weights: &[Tensor],
    spec: &WeightSpec,
    grid_points: usize,
    layer: &str,
) -> Result<(Tensor, Vec<f64>)> {
    if grid_points < 2 {
        return Err(SearchError::Setting {
            key: "awq.grid".into(),
            reason: "needs at least 2 points".into(),
        });
    }
    let x_mean = x.abs().mean_dim(0, false, Kind::Float).clamp_min(1e-8);
    let mut best = (f64::INFINITY, Tensor::ones_like(&x_mean));
    let mut curve = Vec::with_capacity(grid_points);
    for i in 0..grid_points {
        let alpha = i as f64 / (grid_points - 1) as f64;
        let s = x_mean.pow_tensor_scalar(alpha).clamp_min(1e-4);
        let s = &s / (s.max() * s.min()).sqrt();
        let mut pairs = Vec::with_capacity(weights.len());
        for w in weights {
            let wq = fake_weight(&(w * s.unsqueeze(0)), spec, layer)?;
            pairs.push((w.shallow_clone(), wq / s.unsqueeze(0)));
        }
        // error of (x/s)·Q(W s)ᵀ against x·Wᵀ, i.e. x·(Q(W s)/s)ᵀ against x·Wᵀ
        let err = output_error(x, &pairs);
        curve.push(err);
        if err < best.0 {
            best = (err, s);
        }
    }
    Ok((best.1, curve))
}

/// AWQ's clipping search: per output row, the ratio (grid from 1 down to `min_ratio`) whose
/// clipped RTN minimises that row's output error on `x`. Returns ratios `[out]`.
pub fn search_clip(
    x: &Tensor,
    w: &Tensor,
    grid: Grid,
    granularity: Granularity,
    steps: usize,
    min_ratio: f64,
    layer: &str,
) -> Result<Tensor> {
    let out = w.size()[0];
    let reference = x.matmul(&w.tr());
    let mut best_err = Tensor::full([out], f64::INFINITY, (Kind::Double, w.device()));
    let mut best_ratio = Tensor::ones([out], (Kind::Float, w.device()));
    for i in 0..steps.max(1) {
        let r = 1.0 - (1.0 - min_ratio) * i as f64 / (steps.max(2) - 1) as f64;
        let ratio = Tensor::full([out, 1], r, (Kind::Float, w.device()));
        let wq = clipped_rtn(w, grid, granularity, &ratio, layer)?;
        let err = (x.matmul(&wq.tr()) - &reference).pow_tensor_scalar(2).sum_dim_intlist(
            0,
            false,
            Kind::Double,
        );
        let better = err.lt_tensor(&best_err);
        best_err = err.where_self(&better, &best_err);
        best_ratio =
            Tensor::full([out], r, (Kind::Float, w.device())).where_self(&better, &best_ratio);
    }
    Ok(best_ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_search_never_loses_to_plain_rtn() -> Result<()> {
        tch::manual_seed(3);
        // Inputs with a few large channels, as AWQ assumes.
        let x = Tensor::randn([256, 32], (Kind::Float, tch::Device::Cpu));
        let _ = x.narrow(1, 0, 2).g_mul_scalar_(20.0);
        let w = Tensor::randn([16, 32], (Kind::Float, tch::Device::Cpu));
        let spec =
            WeightSpec::Rtn { grid: Grid::new(3, false)?, granularity: Granularity::PerChannel };
        let (s, curve) = search_scale(&x, &[w.shallow_clone()], &spec, 11, "t")?;
        assert_eq!(s.size(), vec![32]);
        // α = 0 is plain RTN; the chosen point is at least as good.
        let best = curve.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(best <= curve[0]);
        let ratios =
            search_clip(&x, &w, Grid::new(3, false)?, Granularity::PerChannel, 5, 0.6, "t")?;
        assert!(bool::try_from(ratios.le(1.0).all()).unwrap_or(false));
        Ok(())
    }
}
