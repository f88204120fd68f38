//! Static activation ranges computed directly from captured calibration inputs (exact
//! quantiles), at every granularity.

use qvlm_core::quant::spec::{Clip, Granularity};
use tch::Tensor;

use crate::error::{setting, Result};

/// Quantiles `q` and `1 − q` of `x` along `dim` (exact, by sorting).
fn quantile_pair(x: &Tensor, dim: i64, p: f64, keepdim: bool) -> (Tensor, Tensor) {
    let n = x.size()[dim as usize];
    let (sorted, _) = x.sort(dim, false);
    let at = |q: f64| {
        let pos = q * (n - 1) as f64;
        let (lo, hi) = (pos.floor() as i64, pos.ceil() as i64);
        let a = sorted.select(dim, lo);
        let b = sorted.select(dim, hi);
        let v = &a + (b - &a) * (pos - lo as f64);
        if keepdim {
            v.unsqueeze(dim)
        } else {
            v
        }
    };
    (at(1.0 - p), at(p))
}

/// At most this many values enter a per-tensor quantile (evenly strided beyond it).
const MAX_TENSOR_VALUES: i64 = 1 << 22;

/// `(lo, hi)` of `x` (`[B, T, C]` or `[N, C]`) for a granularity and clip, broadcastable against
/// `x`: `[]` per tensor, `[C]` per channel, `[T, 1]` per token position, `[G, 1]` per group.
/// `real_rows` selects the rows (flattened B·T) that count (padding excluded); per-token ranges
/// need all rows (vision).
pub fn static_range(
    x: &Tensor,
    real_rows: Option<&Tensor>,
    granularity: Granularity,
    clip: Clip,
) -> Result<(Tensor, Tensor)> {
    let x = qvlm_core::quant::uniform::finite(x);
    let c = *x.size().last().unwrap_or(&1);
    let rows = {
        let r = x.reshape([-1, c]);
        match real_rows {
            Some(idx) => r.index_select(0, &idx.to_device(r.device())),
            None => r,
        }
    };
    let p = match clip {
        Clip::Percentile(p) => Some(p),
        _ => None,
    };
    let (lo, hi) = match granularity {
        Granularity::PerTensor => {
            let flat = rows.reshape([-1]);
            let n = flat.size()[0];
            let flat = if n > MAX_TENSOR_VALUES {
                let idx: Vec<i64> =
                    (0..MAX_TENSOR_VALUES).map(|i| i * n / MAX_TENSOR_VALUES).collect();
                flat.index_select(0, &Tensor::from_slice(&idx).to_device(flat.device()))
            } else {
                flat
            };
            match p {
                Some(p) => quantile_pair(&flat, 0, p, false),
                None => (flat.min(), flat.max()),
            }
        }
        Granularity::PerChannel | Granularity::PerGroup { .. } => match p {
            Some(p) => quantile_pair(&rows, 0, p, false),
            None => (rows.amin(0, false), rows.amax(0, false)),
        },
        Granularity::PerToken => {
            if x.dim() < 3 {
                return Err(setting(
                    "granularity",
                    "static per-token ranges need [batch, tokens, channels] inputs",
                ));
            }
            let t = x.size()[x.dim() - 2];
            // Per position: over batch and channels.
            let per_pos = x.reshape([-1, t, c]).transpose(0, 1).reshape([t, -1]);
            match p {
                Some(p) => quantile_pair(&per_pos, 1, p, true),
                None => (per_pos.amin(1, true), per_pos.amax(1, true)),
            }
        }
    };
    let (lo, hi) = match clip {
        Clip::Ratio(r) => (lo * r, hi * r),
        _ => (lo, hi),
    };
    Ok(match granularity {
        Granularity::PerGroup { size } => {
            if size <= 0 || c % size != 0 {
                return Err(setting(
                    "granularity.size",
                    format!("group size {size} does not divide {c} channels"),
                ));
            }
            (lo.reshape([c / size, size]).amin(1, true), hi.reshape([c / size, size]).amax(1, true))
        }
        _ => (lo, hi),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn ranges_have_broadcastable_shapes_and_percentiles_shrink_them() -> Result<()> {
        tch::manual_seed(0);
        let x = Tensor::randn([2, 5, 8], (Kind::Float, tch::Device::Cpu));
        let (lo, hi) = static_range(&x, None, Granularity::PerChannel, Clip::MinMax)?;
        assert_eq!((lo.size(), hi.size()), (vec![8], vec![8]));
        let (tlo, _) = static_range(&x, None, Granularity::PerToken, Clip::MinMax)?;
        assert_eq!(tlo.size(), vec![5, 1]);
        let (glo, _) = static_range(&x, None, Granularity::PerGroup { size: 4 }, Clip::MinMax)?;
        assert_eq!(glo.size(), vec![2, 1]);
        let (plo, phi) = static_range(&x, None, Granularity::PerTensor, Clip::Percentile(0.9))?;
        let (mlo, mhi) = static_range(&x, None, Granularity::PerTensor, Clip::MinMax)?;
        assert!(
            plo.double_value(&[]) > mlo.double_value(&[])
                && phi.double_value(&[]) < mhi.double_value(&[])
        );
        let idx = Tensor::from_slice(&[0i64, 1, 2]);
        let (rlo, _) = static_range(&x, Some(&idx), Granularity::PerChannel, Clip::MinMax)?;
        let want = x.reshape([-1, 8]).narrow(0, 0, 3).amin(0, false);
        assert_eq!((rlo - want).abs().max().double_value(&[]), 0.0);
        Ok(())
    }
}
