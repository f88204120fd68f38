//! GPTQ (Frantar et al., 2023): each linear's weight quantized one input column at a time, the
//! rounding error of every column spread over the columns not yet quantized through the inverse
//! Hessian `H = 2/N · Xᵀ X` of the layer's calibration inputs. Reproduces `GPTQ.fasterquant` of
//! the reference implementation line by line (dead columns, damping, lazy block updates, act-order,
//! static groups):
//! <https://github.com/IST-DASLab/gptq/blob/9f2abd32533c83079847435a7c971bb4420285c8/gptq.py#L60-L150>
//!
//! The updates run in f64; each column is rounded by this crate's uniform quantizer
//! ([`QParams`]: f32, `x · (1/scale)`, the range widened to include 0 as GPTQ's `find_params`
//! does), so the result is exactly the integer codes and per-group scales it returns.
//! `python/gen_gptq_reference.py` is the transcription the tests compare with.

use qvlm_core::quant::spec::Granularity;
use qvlm_core::quant::uniform::{Grid, QParams};
use qvlm_core::quant::weight::QuantizedWeight;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{setting, Result, SearchError};

/// GPTQ's knobs, at the reference implementation's defaults (`percdamp = .01`,
/// `blocksize = 128`, `actorder = False`, `static_groups = False`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptqSettings {
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean.
    #[serde(default = "default_damp")]
    pub damp: f64,
    /// Quantize columns in order of decreasing Hessian diagonal (`--act-order`).
    #[serde(default)]
    pub act_order: bool,
    /// Group scales computed once from the original weight (`--static-groups`) rather than when
    /// the walk reaches each group. With `act_order` and groups it is required: groups found in
    /// the permuted order would not be contiguous input ranges, which no packed layout holds.
    #[serde(default)]
    pub static_groups: bool,
    /// Columns per lazy batch update (changes only the order of floating-point additions).
    #[serde(default = "default_block_size")]
    pub block_size: i64,
}

fn default_damp() -> f64 {
    0.01
}
fn default_block_size() -> i64 {
    128
}

impl Default for GptqSettings {
    fn default() -> Self {
        Self {
            damp: default_damp(),
            act_order: false,
            static_groups: false,
            block_size: default_block_size(),
        }
    }
}

impl GptqSettings {
    pub fn validate(&self) -> Result<()> {
        if !(self.damp > 0.0 && self.damp.is_finite()) {
            return Err(setting("gptq.damp", format!("must be > 0, got {}", self.damp)));
        }
        if self.block_size < 1 {
            return Err(setting(
                "gptq.block_size",
                format!("must be ≥ 1, got {}", self.block_size),
            ));
        }
        Ok(())
    }
}

/// `H = 2/N · Xᵀ X` (f64) of calibration rows `x` `[N, in]`: what `GPTQ.add_batch` accumulates.
pub fn hessian(x: &Tensor) -> Tensor {
    let n = x.size()[0].max(1);
    let x = x.to_kind(Kind::Double);
    x.tr().matmul(&x) * (2.0 / n as f64)
}

/// Per-row parameters `[out, 1]` of the columns `w` `[out, k]` (one group): `find_params(weight=True)`.
fn group_params(grid: Grid, w: &Tensor) -> QParams {
    QParams::from_range(grid, &w.amin(-1, true), &w.amax(-1, true))
}

/// Quantizes `w` `[out, in]` with GPTQ against the Hessian `h` `[in, in]` of its inputs.
/// `granularity` is per output channel or per group of input columns. `layer` names the layer
/// in errors (e.g. a Hessian that stays singular after damping).
pub fn quantize(
    w: &Tensor,
    h: &Tensor,
    grid: Grid,
    granularity: Granularity,
    settings: &GptqSettings,
    layer: &str,
) -> Result<QuantizedWeight> {
    settings.validate()?;
    let _guard = tch::no_grad_guard();
    let unsupported = |reason: String| SearchError::Unsupported { layer: layer.into(), reason };
    let (rows, cols) = (w.size()[0], w.size()[1]);
    if h.size() != [cols, cols] {
        return Err(unsupported(format!("Hessian {:?} for a weight of {cols} inputs", h.size())));
    }
    let group = match granularity {
        Granularity::PerChannel => cols,
        Granularity::PerGroup { size } if size > 0 && cols % size == 0 => size,
        g => {
            return Err(unsupported(format!(
                "GPTQ takes per_channel or per_group weights whose group divides {cols}, not {g:?}"
            )))
        }
    };
    let groups = cols / group;
    let static_params = group < cols && settings.static_groups;
    if settings.act_order && group < cols && !settings.static_groups {
        return Err(setting(
            "gptq.static_groups",
            "act_order with weight groups needs static_groups = true (groups found in the \
             permuted order are not contiguous input ranges)",
        ));
    }
    let opts = (Kind::Double, w.device());
    let mut w = qvlm_core::quant::uniform::finite(w).to_kind(Kind::Double);
    let mut h = h.to_kind(Kind::Double).copy();

    // Per-channel parameters come from the weight as it is (upstream's `find_params(W)` runs
    // before dead columns are zeroed); static group parameters after the zeroing, as upstream.
    let per_channel: Vec<QParams> =
        if group == cols { vec![group_params(grid, &w)] } else { Vec::new() };

    // Dead inputs (never non-zero in calibration): H[dead, dead] = 1, W[:, dead] = 0.
    let dead = h.diagonal(0, 0, 1).eq(0.0);
    let _ = h.diagonal(0, 0, 1).masked_fill_(&dead, 1.0);
    w = w.masked_fill(&dead.unsqueeze(0), 0.0);

    let fixed: Vec<QParams> = if static_params {
        (0..groups).map(|g| group_params(grid, &w.narrow(1, g * group, group))).collect()
    } else {
        per_channel
    };

    let perm = settings.act_order.then(|| h.diagonal(0, 0, 1).argsort(0, true));
    if let Some(p) = &perm {
        w = w.index_select(1, p);
        h = h.index_select(0, p).index_select(1, p);
    }
    let perm_index: Option<Vec<i64>> = match &perm {
        Some(p) => Some(Vec::<i64>::try_from(p)?),
        None => None,
    };

    let damp = settings.damp * h.diagonal(0, 0, 1).mean(Kind::Double).double_value(&[]);
    let _ = h.diagonal(0, 0, 1).g_add_scalar_(damp);
    let not_pd = |e: tch::TchError| {
        unsupported(format!(
            "the damped Hessian is not positive definite (damp {}): {e}",
            settings.damp
        ))
    };
    let l = h.f_linalg_cholesky(false).map_err(not_pd)?;
    let hinv = l.f_cholesky_inverse(false)?.f_linalg_cholesky(true).map_err(not_pd)?;

    let (qmin, _) = grid.range();
    let mut codes = Tensor::zeros([rows, cols], opts);
    let scale = Tensor::zeros([rows, groups], (Kind::Float, w.device()));
    let zero_point = Tensor::zeros([rows, groups], (Kind::Float, w.device()));
    for (g, p) in fixed.iter().enumerate() {
        scale.narrow(1, g as i64, 1).copy_(&p.scale.reshape([rows, 1]));
        zero_point.narrow(1, g as i64, 1).copy_(&p.zero_point.reshape([rows, 1]));
    }
    let mut current: Option<QParams> = None;
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + settings.block_size).min(cols);
        let count = i2 - i1;
        let w1 = w.narrow(1, i1, count).copy();
        let err1 = Tensor::zeros([rows, count], opts);
        let hinv1 = hinv.narrow(0, i1, count).narrow(1, i1, count);
        for i in 0..count {
            let col = i1 + i;
            let original = perm_index.as_ref().map_or(col, |p| p[col as usize]);
            let params = if fixed.is_empty() {
                if col % group == 0 {
                    // Upstream reads the group from W, which inside a lazy block still holds the
                    // block's starting values (the in-block updates live in W1).
                    let p = group_params(grid, &w.narrow(1, col, group));
                    scale.narrow(1, col / group, 1).copy_(&p.scale.reshape([rows, 1]));
                    zero_point.narrow(1, col / group, 1).copy_(&p.zero_point.reshape([rows, 1]));
                    current = Some(p);
                }
                current.clone().ok_or_else(|| unsupported("no group parameters".into()))?
            } else {
                fixed[(original / group) as usize].clone()
            };
            let column = w1.select(1, i);
            let code = params.quantize(&column.reshape([rows, 1]).to_kind(Kind::Float));
            let q = ((&code - &params.zero_point.reshape([rows, 1]))
                * params.scale.reshape([rows, 1]))
            .reshape([rows])
            .to_kind(Kind::Double);
            codes.select(1, col).copy_(&(code.reshape([rows]) - qmin as f64));
            let d = hinv1.double_value(&[i, i]);
            let err = (&column - &q) / d;
            let mut tail = w1.narrow(1, i, count - i);
            let _ = tail.f_sub_(&err.unsqueeze(1).matmul(&hinv1.narrow(0, i, 1).narrow(
                1,
                i,
                count - i,
            )))?;
            err1.select(1, i).copy_(&err);
        }
        if i2 < cols {
            let mut rest = w.narrow(1, i2, cols - i2);
            let _ =
                rest.f_sub_(&err1.matmul(&hinv.narrow(0, i1, count).narrow(1, i2, cols - i2)))?;
        }
        i1 = i2;
    }
    if let Some(p) = &perm {
        codes = codes.index_select(1, &p.argsort(0, false));
    }
    Ok(QuantizedWeight::Uniform {
        grid,
        group,
        codes: codes.to_kind(Kind::Uint8),
        scale,
        zero_point,
    })
}

/// `tr((W − Q) H (W − Q)ᵀ)`: the proxy loss GPTQ minimises (f64).
pub fn proxy_loss(w: &Tensor, q: &Tensor, h: &Tensor) -> f64 {
    let d = (w.to_kind(Kind::Double) - q.to_kind(Kind::Double)).to_device(h.device());
    (d.matmul(&h.to_kind(Kind::Double)) * &d).sum(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtn(w: &Tensor, grid: Grid, group: i64) -> Tensor {
        let (out, inp) = (w.size()[0], w.size()[1]);
        let g = w.reshape([out, inp / group, group]);
        QParams::from_range(grid, &g.amin(-1, true), &g.amax(-1, true))
            .fake_quant(&g)
            .reshape([out, inp])
    }

    /// With an identity Hessian no column's error reaches another column (`Hinv` is diagonal),
    /// so GPTQ is round-to-nearest: the hand-checked case.
    #[test]
    fn an_identity_hessian_gives_round_to_nearest() -> Result<()> {
        tch::manual_seed(5);
        let w = Tensor::randn([8, 32], (Kind::Float, tch::Device::Cpu));
        let grid = Grid::new(4, false)?;
        for (granularity, group) in
            [(Granularity::PerChannel, 32), (Granularity::PerGroup { size: 8 }, 8)]
        {
            let h = Tensor::eye(32, (Kind::Double, tch::Device::Cpu));
            let q = quantize(&w, &h, grid, granularity, &GptqSettings::default(), "t")?;
            let diff = (q.dequantize() - rtn(&w, grid, group)).abs().max().double_value(&[]);
            assert_eq!(diff, 0.0, "{granularity:?}");
        }
        Ok(())
    }

    /// On correlated inputs GPTQ's proxy loss is below round-to-nearest's, with and without
    /// act-order.
    #[test]
    fn gptq_beats_round_to_nearest_on_its_own_objective() -> Result<()> {
        tch::manual_seed(6);
        let mix = Tensor::randn([32, 32], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::randn([512, 32], (Kind::Float, tch::Device::Cpu)).matmul(&mix);
        let w = Tensor::randn([16, 32], (Kind::Float, tch::Device::Cpu));
        let h = hessian(&x);
        let grid = Grid::new(3, true)?;
        let plain = proxy_loss(&w, &rtn(&w, grid, 8), &h);
        for act_order in [false, true] {
            let s = GptqSettings { act_order, static_groups: true, ..GptqSettings::default() };
            let q = quantize(&w, &h, grid, Granularity::PerGroup { size: 8 }, &s, "t")?;
            let loss = proxy_loss(&w, &q.dequantize(), &h);
            assert!(loss < 0.7 * plain, "act_order {act_order}: {loss} vs RTN {plain}");
        }
        Ok(())
    }

    #[test]
    fn bad_settings_are_named_errors() -> Result<()> {
        let w = Tensor::randn([4, 16], (Kind::Float, tch::Device::Cpu));
        let h = Tensor::eye(16, (Kind::Double, tch::Device::Cpu));
        let grid = Grid::new(4, false)?;
        let s = GptqSettings { act_order: true, ..GptqSettings::default() };
        let err = quantize(&w, &h, grid, Granularity::PerGroup { size: 8 }, &s, "t");
        assert!(
            matches!(err, Err(SearchError::Setting { ref key, .. }) if key == "gptq.static_groups")
        );
        let err = quantize(
            &w,
            &h,
            grid,
            Granularity::PerGroup { size: 5 },
            &GptqSettings::default(),
            "t",
        );
        assert!(matches!(err, Err(SearchError::Unsupported { .. })));
        let s = GptqSettings { damp: 0.0, ..GptqSettings::default() };
        assert!(quantize(&w, &h, grid, Granularity::PerChannel, &s, "t").is_err());
        Ok(())
    }
}
