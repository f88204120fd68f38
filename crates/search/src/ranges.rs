//! Static activation ranges computed directly from captured calibration inputs (exact
//! quantiles), at every granularity.

use qvlm_core::quant::spec::{Clip, Granularity};
use tch::Tensor;

use crate::error::{setting, Result};

/// At most this many values enter a per-tensor quantile (evenly strided beyond it).
const MAX_TENSOR_VALUES: i64 = 1 << 22;

/// A site input prepared for range queries at one granularity: sorted once, so every candidate
/// clip is a cheap lookup.
pub struct SortedInput {
    /// Values sorted along `dim`.
    sorted: Tensor,
    dim: i64,
    granularity: Granularity,
    channels: i64,
}

impl SortedInput {
    /// `x` is `[B, T, C]` or `[N, C]`; `real_rows` selects the rows (flattened B·T) that count
    /// (padding excluded); per-token ranges use all rows (vision).
    pub fn new(x: &Tensor, real_rows: Option<&Tensor>, granularity: Granularity) -> Result<Self> {
        let x = qvlm_core::quant::uniform::finite(x);
        let c = *x.size().last().unwrap_or(&1);
        let rows = {
            let r = x.reshape([-1, c]);
            match real_rows {
                Some(idx) => r.index_select(0, &idx.to_device(r.device())),
                None => r,
            }
        };
        let (values, dim) = match granularity {
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
                (flat, 0)
            }
            Granularity::PerChannel | Granularity::PerGroup { .. } => (rows, 0),
            Granularity::PerToken => {
                if x.dim() < 3 {
                    return Err(setting(
                        "granularity",
                        "static per-token ranges need [batch, tokens, channels] inputs with a fixed token count (LLaVA's vision tower); Qwen2-VL's vision tower sees a different number of patches per image: use per-channel or per-tensor static ranges, or dynamic per-token ones",
                    ));
                }
                let t = x.size()[x.dim() - 2];
                // Per position: over batch and channels.
                (x.reshape([-1, t, c]).transpose(0, 1).reshape([t, -1]), 1)
            }
        };
        if let Granularity::PerGroup { size } = granularity {
            if size <= 0 || c % size != 0 {
                return Err(setting(
                    "granularity.size",
                    format!("group size {size} does not divide {c} channels"),
                ));
            }
        }
        let (sorted, _) = values.sort(dim, false);
        Ok(Self { sorted, dim, granularity, channels: c })
    }

    fn quantile(&self, q: f64) -> Tensor {
        let n = self.sorted.size()[self.dim as usize];
        let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
        let (lo, hi) = (pos.floor() as i64, pos.ceil() as i64);
        let a = self.sorted.select(self.dim, lo);
        let b = self.sorted.select(self.dim, hi);
        let v = &a + (b - &a) * (pos - lo as f64);
        if self.granularity == Granularity::PerToken {
            v.unsqueeze(1)
        } else {
            v
        }
    }

    /// `(lo, hi)` for a clip, broadcastable against the input: `[]` per tensor, `[C]` per
    /// channel, `[T, 1]` per token position, `[G, 1]` per group.
    pub fn range(&self, clip: Clip) -> (Tensor, Tensor) {
        let (lo, hi) = match clip {
            Clip::Percentile(p) => (self.quantile(1.0 - p), self.quantile(p)),
            Clip::MinMax => (self.quantile(0.0), self.quantile(1.0)),
            Clip::Ratio(r) => (self.quantile(0.0) * r, self.quantile(1.0) * r),
        };
        match self.granularity {
            Granularity::PerGroup { size } => {
                let g = self.channels / size;
                (lo.reshape([g, size]).amin(1, true), hi.reshape([g, size]).amax(1, true))
            }
            _ => (lo, hi),
        }
    }
}

/// `(lo, hi)` of `x` for one granularity and clip (see [`SortedInput`]).
pub fn static_range(
    x: &Tensor,
    real_rows: Option<&Tensor>,
    granularity: Granularity,
    clip: Clip,
) -> Result<(Tensor, Tensor)> {
    Ok(SortedInput::new(x, real_rows, granularity)?.range(clip))
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
