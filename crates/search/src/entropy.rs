//! Cross-layer dependency (Q-VLM Eq. 4–6): the conditional entropy of consecutive sites'
//! quantized activations, with the soft assignment of Eq. 5 turning deterministic rounding into
//! probabilities.
//!
//! Choices the paper leaves open (documented in the README, configurable):
//! - Soft assignment in code units: `u = x/Δ + z` (unrounded), `p(m) ∝ exp(−(u − m)² / τ)` over
//!   the grid's levels m. Eq. 5 divides `(x − q_m)²` by Δ, which in code units is a temperature
//!   of 1/Δ — scale-dependent; we use a fixed τ (default 1) so the estimator is scale-invariant.
//! - The joint p(x^k, x^{k+1}): consecutive sites generally have different widths, so elements
//!   cannot be paired (i, j)-wise. They share the token axis: per token r, each site's level
//!   distribution is the mean over its channels of the soft assignments, `P_k(r) ∈ Δ^M`, and the
//!   joint is `p(a, b) = mean_r P_k(r)[a] · P_{k+1}(r)[b]`. D(k, k+1) = H(B | A).
//! - Rows and channels are subsampled (deterministically) to bound cost on large models.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use qvlm_core::quant::uniform::{Grid, QParams};

/// Estimator settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// τ of the soft assignment, in code units.
    pub temperature: f64,
    /// At most this many tokens (rows) enter the estimate.
    pub max_rows: i64,
    /// At most this many channels per site (evenly strided).
    pub max_channels: i64,
}

impl Default for EntropyConfig {
    fn default() -> Self {
        Self { temperature: 1.0, max_rows: 1024, max_channels: 64 }
    }
}

fn stride_select(x: &Tensor, dim: i64, max: i64) -> Tensor {
    let n = x.size()[dim as usize];
    if n <= max {
        return x.shallow_clone();
    }
    let idx: Vec<i64> = (0..max).map(|i| i * n / max).collect();
    x.index_select(dim, &Tensor::from_slice(&idx).to_device(x.device()))
}

/// Per-row level distributions `[R, M]` of `x` `[R, C]` under `params` (broadcast to `[R, C]`):
/// Eq. 5 soft assignments averaged over the row's channels.
pub fn level_distribution(x: &Tensor, params: &QParams, cfg: &EntropyConfig) -> Tensor {
    level_distribution_of_codes(&code_units(x, params), params.grid, cfg)
}

/// `x/Δ + z`, unrounded (the code units of Eq. 5), with `params` broadcast against `x`: one
/// tensor of `x`'s size, the parameters never materialized at it.
pub fn code_units(x: &Tensor, params: &QParams) -> Tensor {
    let mut u = x.to_kind(Kind::Float) / params.scale.to_device(x.device());
    let _ = u.g_add_(&params.zero_point.to_device(x.device()));
    u
}

/// [`level_distribution`] of values already in code units (`u` `[R, C]`, [`code_units`]).
pub fn level_distribution_of_codes(u: &Tensor, grid: Grid, cfg: &EntropyConfig) -> Tensor {
    let (qmin, qmax) = grid.range();
    let u = u.clamp(qmin as f64 - 2.0, qmax as f64 + 2.0);
    let levels = Tensor::arange_start(qmin, qmax + 1, (Kind::Float, u.device()));
    let logits = -(u.unsqueeze(-1) - levels).pow_tensor_scalar(2) / cfg.temperature;
    logits.softmax(-1, Kind::Float).mean_dim(1, false, Kind::Float)
}

/// H(B | A) of the joint `p(a, b) = mean_r P_a(r)[a] · P_b(r)[b]`, in nats.
pub fn conditional_entropy(pa: &Tensor, pb: &Tensor) -> Tensor {
    let r = pa.size()[0].max(1) as f64;
    let joint = pa.transpose(0, 1).matmul(pb) / r;
    let marginal = joint.sum_dim_intlist(1, true, Kind::Float);
    let cond = &joint / marginal.clamp_min(1e-12);
    -(&joint * (cond + 1e-12).log()).sum(Kind::Float)
}

/// Shannon entropy (nats) of the mean level distribution of `p` `[R, M]`.
pub fn entropy(p: &Tensor) -> Tensor {
    let m = p.mean_dim(0, false, Kind::Float);
    -(&m * (&m + 1e-12).log()).sum(Kind::Float)
}

/// Rows used by the estimator (evenly strided, at most `max_rows`) and their channels.
pub fn subsample(x_rows: &Tensor, cfg: &EntropyConfig) -> Tensor {
    stride_select(&stride_select(x_rows, 0, cfg.max_rows), 1, cfg.max_channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(bits: u8) -> QParams {
        QParams::from_range(
            Grid::new(bits, false).unwrap_or(Grid { bits, symmetric: false }),
            &Tensor::from(-1.0f32),
            &Tensor::from(1.0f32),
        )
    }

    #[test]
    fn soft_assignment_is_a_distribution_peaked_at_the_rounded_level() {
        let cfg = EntropyConfig { temperature: 0.1, ..EntropyConfig::default() };
        let p = params(4);
        let x = Tensor::from_slice(&[0.0f32, 0.5, -0.9]).view([3, 1]);
        let d = level_distribution(&x, &p, &cfg);
        let sums =
            Vec::<f32>::try_from(&d.sum_dim_intlist(1, false, Kind::Float)).unwrap_or_default();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
        let hard = p.quantize(&x).view([3]).to_kind(Kind::Int64);
        assert_eq!(
            Vec::<i64>::try_from(&d.argmax(1, false)).ok(),
            Vec::<i64>::try_from(&hard).ok()
        );
    }

    #[test]
    fn conditional_entropy_is_zero_for_a_function_and_log_m_for_independence() {
        // B determined by A: identical one-hot rows.
        let eye = Tensor::eye(4, (Kind::Float, tch::Device::Cpu));
        let h = conditional_entropy(&eye, &eye).double_value(&[]);
        assert!(h.abs() < 1e-6, "{h}");
        // B uniform whatever A: H(B|A) = log 4.
        let uniform = Tensor::full([4, 4], 0.25, (Kind::Float, tch::Device::Cpu));
        let h = conditional_entropy(&eye, &uniform).double_value(&[]);
        assert!((h - 4f64.ln()).abs() < 1e-5, "{h}");
    }

    /// Code units taken before the rows are selected equal the parameters expanded to the rows
    /// first (what `blocked.rs` did, at five times the memory): bit for bit.
    #[test]
    fn code_units_before_the_subsample_equal_expanded_parameters_after_it() {
        tch::manual_seed(3);
        let opts = (Kind::Float, tch::Device::Cpu);
        let x = Tensor::randn([3, 40, 100], opts);
        let cfg = EntropyConfig { temperature: 1.0, max_rows: 17, max_channels: 9 };
        let grid = Grid { bits: 4, symmetric: false };
        for (scale, zero) in [
            // per token [T, 1]
            (Tensor::rand([40, 1], opts) + 0.1, Tensor::randint(15, [40, 1], opts)),
            // per channel [C]
            (Tensor::rand([100], opts) + 0.1, Tensor::randint(15, [100], opts)),
        ] {
            let params = QParams { grid, scale, zero_point: zero };
            let rows = |t: &Tensor| t.reshape([-1, 100]).narrow(0, 5, 90);
            let full = |t: &Tensor| t.expand_as(&x).contiguous();
            let old = level_distribution(
                &subsample(&rows(&x), &cfg),
                &QParams {
                    grid,
                    scale: subsample(&rows(&full(&params.scale)), &cfg),
                    zero_point: subsample(&rows(&full(&params.zero_point)), &cfg),
                },
                &cfg,
            );
            let new = level_distribution_of_codes(
                &subsample(&rows(&code_units(&x, &params)), &cfg),
                grid,
                &cfg,
            );
            assert_eq!(old.size(), vec![17, 16]);
            assert!(old.equal(&new), "not bit-identical");
        }
    }
}
