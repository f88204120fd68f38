//! Uniform affine quantization: bit width, symmetric/asymmetric grids, and quantization
//! parameters from ranges — guarded so that constant channels, zeros, infinities and NaNs never
//! produce a zero scale, a division by zero or a non-finite output (Q-VLM's released code
//! divides by `max − min` unguarded).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Smallest scale, as PyTorch's observers (`torch.finfo(torch.float32).eps`).
pub const MIN_SCALE: f64 = f32::EPSILON as f64;

/// The integer grid of a quantizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grid {
    pub bits: u8,
    pub symmetric: bool,
}

impl Grid {
    pub fn new(bits: u8, symmetric: bool) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(Error::Invalid(format!("bits must be 2–8, got {bits}")));
        }
        Ok(Self { bits, symmetric })
    }

    /// `[qmin, qmax]`: signed `[-2^(b-1), 2^(b-1)-1]` when symmetric, `[0, 2^b − 1]` otherwise.
    pub fn range(self) -> (i64, i64) {
        let b = i64::from(self.bits);
        if self.symmetric {
            (-(1 << (b - 1)), (1 << (b - 1)) - 1)
        } else {
            (0, (1 << b) - 1)
        }
    }

    pub fn levels(self) -> i64 {
        1 << self.bits
    }
}

/// Scale and zero point with the grid they belong to; `scale`/`zero_point` broadcast against the
/// tensor they quantize (scalar, `[C]` along the last axis, `[T, 1]` per token, …).
#[derive(Debug)]
pub struct QParams {
    pub grid: Grid,
    pub scale: Tensor,
    pub zero_point: Tensor,
}

impl Clone for QParams {
    fn clone(&self) -> Self {
        Self {
            grid: self.grid,
            scale: self.scale.shallow_clone(),
            zero_point: self.zero_point.shallow_clone(),
        }
    }
}

/// Replaces NaN by 0 and ±inf by the largest finite f32 of the same sign.
pub fn finite(t: &Tensor) -> Tensor {
    t.to_kind(Kind::Float).nan_to_num(0.0, Some(f64::from(f32::MAX)), Some(f64::from(f32::MIN)))
}

impl QParams {
    /// From ranges `min ≤ max` (any broadcastable shape). The range is widened to include 0
    /// (so 0 is exact) as PyTorch's observers do; ranges are made finite first.
    pub fn from_range(grid: Grid, min: &Tensor, max: &Tensor) -> QParams {
        let (qmin, qmax) = grid.range();
        let min = finite(min).clamp_max(0.0);
        let max = finite(max).clamp_min(0.0);
        if grid.symmetric {
            let amax = min.abs().maximum(&max);
            let scale = (amax / ((qmax - qmin) as f64 / 2.0)).clamp_min(MIN_SCALE);
            let zero_point = scale.zeros_like();
            QParams { grid, scale, zero_point }
        } else {
            // Computed in f64 so a huge range cannot overflow before the division.
            let width = max.to_kind(Kind::Double) - min.to_kind(Kind::Double);
            let scale = (width / (qmax - qmin) as f64).clamp_min(MIN_SCALE).to_kind(Kind::Float);
            let zero_point = (Tensor::from(qmin as f64) - (min / &scale).round()).clamp(qmin, qmax);
            QParams { grid, scale, zero_point }
        }
    }

    /// Quantize → dequantize `x` (its dtype is kept; arithmetic in f32).
    pub fn fake_quant(&self, x: &Tensor) -> Tensor {
        let (qmin, qmax) = self.grid.range();
        let kind = x.kind();
        let y = super::reference::fake_quant_reference(
            &x.to_kind(Kind::Float),
            &self.scale.to_device(x.device()),
            &self.zero_point.to_device(x.device()),
            qmin,
            qmax,
        );
        y.to_kind(kind)
    }

    /// Fake quantization with a straight-through estimator: the forward value of `fake_quant`,
    /// the gradient of the identity with respect to `x` (and of the scale through the clamp
    /// bounds, as LSQ-style learned ranges need).
    pub fn fake_quant_ste(&self, x: &Tensor) -> Tensor {
        let q = self.fake_quant(x);
        x + (q - x).detach()
    }

    /// Integer codes `clamp(round(x/scale) + zp)`.
    pub fn quantize(&self, x: &Tensor) -> Tensor {
        let (qmin, qmax) = self.grid.range();
        let inv = self.scale.reciprocal();
        ((x.to_kind(Kind::Float) * inv).round() + &self.zero_point).clamp(qmin, qmax)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_have_the_usual_ranges() -> Result<()> {
        assert_eq!(Grid::new(8, true)?.range(), (-128, 127));
        assert_eq!(Grid::new(4, false)?.range(), (0, 15));
        assert!(Grid::new(1, false).is_err() && Grid::new(9, true).is_err());
        Ok(())
    }

    #[test]
    fn degenerate_ranges_give_finite_params_and_outputs() -> Result<()> {
        let grid = Grid::new(4, false)?;
        let min = Tensor::from_slice(&[0.0f32, 3.0, f32::NAN, f32::NEG_INFINITY]);
        let max = Tensor::from_slice(&[0.0f32, 3.0, f32::NAN, f32::INFINITY]);
        let qp = QParams::from_range(grid, &min, &max);
        assert!(bool::try_from(qp.scale.isfinite().all()).unwrap_or(false));
        assert!(bool::try_from(qp.scale.gt(0.0).all()).unwrap_or(false));
        let x = Tensor::from_slice(&[1.0f32, 3.0, f32::NAN, 5.0]);
        let y = qp.fake_quant(&finite(&x));
        assert!(bool::try_from(y.isfinite().all()).unwrap_or(false), "{y:?}");
        Ok(())
    }
}

/// The reference fake-quant equals libtorch's own ops bit for bit, and the quantizer's
/// invariants hold for arbitrary inputs (property tests).
#[cfg(test)]
mod parity {
    use proptest::prelude::*;
    use tch::{Device, Kind, Tensor};

    use super::{Grid, QParams};

    fn f32s(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.reshape([-1])).unwrap_or_default()
    }

    #[test]
    fn equals_fake_quantize_per_tensor_affine_bit_for_bit() {
        tch::manual_seed(0);
        let x = Tensor::randn([64, 33], (Kind::Float, Device::Cpu)) * 3.0;
        for (bits, symmetric) in
            [(8, false), (8, true), (6, false), (4, false), (4, true), (2, false)]
        {
            let grid = Grid { bits, symmetric };
            let (qmin, qmax) = grid.range();
            let qp = QParams::from_range(grid, &x.min(), &x.max());
            let scale = qp.scale.double_value(&[]);
            let zp = qp.zero_point.double_value(&[]) as i64;
            let ours = qp.fake_quant(&x);
            let torch = x.fake_quantize_per_tensor_affine(scale, zp, qmin, qmax);
            assert_eq!(f32s(&ours), f32s(&torch), "W{bits} symmetric={symmetric}");
        }
    }

    #[test]
    fn equals_fake_quantize_per_channel_affine_bit_for_bit() {
        tch::manual_seed(1);
        let x = Tensor::randn([40, 24], (Kind::Float, Device::Cpu))
            * Tensor::linspace(0.1, 10.0, 24, (Kind::Float, Device::Cpu));
        for (bits, symmetric) in [(8, false), (4, false), (4, true), (3, false)] {
            let grid = Grid { bits, symmetric };
            let (qmin, qmax) = grid.range();
            let qp = QParams::from_range(grid, &x.amin(0, false), &x.amax(0, false));
            let ours = qp.fake_quant(&x);
            let torch = x.fake_quantize_per_channel_affine(
                &qp.scale,
                &qp.zero_point.to_kind(Kind::Int),
                1,
                qmin,
                qmax,
            );
            assert_eq!(f32s(&ours), f32s(&torch), "W{bits} symmetric={symmetric}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn idempotent_on_grid_and_within_half_a_step(
            values in proptest::collection::vec(-1.0e3f32..1.0e3, 1..64),
            bits in 2u8..=8,
            symmetric in any::<bool>(),
        ) {
            let grid = Grid { bits, symmetric };
            let x = Tensor::from_slice(&values);
            let qp = QParams::from_range(grid, &x.min(), &x.max());
            let y = qp.fake_quant(&x);
            // Idempotence.
            prop_assert_eq!(f32s(&qp.fake_quant(&y)), f32s(&y));
            // On the grid: (y / scale + zp) is an integer in [qmin, qmax].
            let (qmin, qmax) = grid.range();
            let codes = &y / &qp.scale + &qp.zero_point;
            let err = (&codes - codes.round()).abs().max().double_value(&[]);
            prop_assert!(err < 1e-3, "off-grid by {}", err);
            prop_assert!(codes.min().double_value(&[]) >= qmin as f64 - 1e-3);
            prop_assert!(codes.max().double_value(&[]) <= qmax as f64 + 1e-3);
            // Error ≤ scale/2 for inputs inside the representable range [(qmin − z)·s, (qmax − z)·s]
            // (a symmetric grid's range stops half a step short of amax, as PyTorch's does).
            let scale = qp.scale.double_value(&[]);
            let zp = qp.zero_point.double_value(&[]);
            let (lo, hi) = ((qmin as f64 - zp) * scale, (qmax as f64 - zp) * scale);
            // In f32 the dequantized `q · s` is itself rounded, by up to half an ulp of |x|: the
            // bound is s/2 plus one f32 epsilon of |x| per element. (The earlier flat 1e-5 of s/2
            // was tighter than that: x = -996.6426 at W8 symmetric erred by s/2 + 1.15e-5 · s/2,
            // a proptest case found on 2026-12-06.)
            let inside = x.ge(lo).logical_and(&x.le(hi));
            let slack = x.abs() * f64::from(f32::EPSILON) + 1e-6;
            let excess = ((&y - &x).abs() - &slack - scale / 2.0).masked_select(&inside);
            if excess.numel() > 0 {
                let worst = excess.max().double_value(&[]);
                prop_assert!(worst <= 0.0, "error above scale/2 {} by {} beyond f32 rounding", scale / 2.0, worst);
            }
        }
    }
}
