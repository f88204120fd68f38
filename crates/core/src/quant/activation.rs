//! Activation quantizers: static (from calibration statistics) or dynamic ranges at any
//! granularity, applied at linear inputs through a [`LinearHook`].

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::hook::LinearHook;
use crate::layer_id::LayerId;
use crate::quant::observer::SiteStats;
use crate::quant::spec::{ActSpec, Clip, Granularity, RangeMode};
use crate::quant::uniform::QParams;

/// A ready activation quantizer: its spec and, when static, its parameters.
#[derive(Debug, Clone)]
pub struct ActQuantizer {
    pub spec: ActSpec,
    /// Static parameters; broadcast shapes `[]`, `[C]`, `[T, 1]` or `[G, 1]` by granularity.
    pub params: Option<QParams>,
}

/// Range of `stats` for a granularity, narrowed by `clip`.
fn static_range(
    stats: &SiteStats,
    granularity: Granularity,
    clip: Clip,
    layer: LayerId,
) -> Result<(Tensor, Tensor)> {
    let missing_hist = || Error::Quant {
        layer: layer.to_string(),
        reason: "percentile clipping needs histogram statistics (calibration pass 2)".into(),
    };
    let quantiles = |h: Option<&super::observer::Histograms>, p: f64| -> Result<(Tensor, Tensor)> {
        let h = h.ok_or_else(missing_hist)?;
        Ok((h.quantile(1.0 - p), h.quantile(p)))
    };
    let (lo, hi) = match (granularity, clip) {
        (Granularity::PerTensor, Clip::Percentile(p)) => {
            let (a, b) = quantiles(stats.tensor_hist.as_ref(), p)?;
            (a.reshape([]), b.reshape([]))
        }
        (Granularity::PerTensor, _) => stats.min_max(),
        (Granularity::PerChannel | Granularity::PerGroup { .. }, Clip::Percentile(p)) => {
            quantiles(stats.channel_hist.as_ref(), p)?
        }
        (Granularity::PerChannel | Granularity::PerGroup { .. }, _) => {
            (stats.channel_min.shallow_clone(), stats.channel_max.shallow_clone())
        }
        (Granularity::PerToken, clip) => {
            let (tmin, tmax) = stats.token_range.as_ref().ok_or_else(|| Error::Quant {
                layer: layer.to_string(),
                reason: "static per-token ranges need a fixed sequence length (use them on the vision tower, \
                         or dynamic ranges)"
                    .into(),
            })?;
            match clip {
                Clip::Percentile(p) => quantiles(stats.token_hist.as_ref(), p)?,
                _ => (tmin.shallow_clone(), tmax.shallow_clone()),
            }
        }
    };
    let (lo, hi) = match clip {
        Clip::Ratio(r) => (lo * r, hi * r),
        _ => (lo, hi),
    };
    Ok(match granularity {
        Granularity::PerGroup { size } => {
            let c = stats.channels;
            if size <= 0 || c % size != 0 {
                return Err(Error::Quant {
                    layer: layer.to_string(),
                    reason: format!("group size {size} does not divide the {c} input channels"),
                });
            }
            let g = c / size;
            (lo.reshape([g, size]).amin(1, true), hi.reshape([g, size]).amax(1, true))
        }
        Granularity::PerToken => (lo.unsqueeze(1), hi.unsqueeze(1)),
        _ => (lo, hi),
    })
}

impl ActQuantizer {
    /// A static quantizer from calibration statistics, or a dynamic one (statistics unused).
    pub fn new(spec: ActSpec, stats: Option<&SiteStats>, layer: LayerId) -> Result<Self> {
        spec.clip.validate()?;
        let params = match spec.range {
            RangeMode::Dynamic => None,
            RangeMode::Static => {
                let stats = stats.ok_or_else(|| Error::Quant {
                    layer: layer.to_string(),
                    reason: "static ranges need calibration statistics".into(),
                })?;
                let (lo, hi) = static_range(stats, spec.granularity, spec.clip, layer)?;
                Some(QParams::from_range(spec.grid, &lo, &hi))
            }
        };
        Ok(Self { spec, params })
    }

    /// A static quantizer with explicit ranges (search candidates, learned ranges).
    pub fn with_range(spec: ActSpec, lo: &Tensor, hi: &Tensor) -> Self {
        Self { spec, params: Some(QParams::from_range(spec.grid, lo, hi)) }
    }

    /// The parameters applied to `x`: the static ones, or those measured on `x` (dynamic ranges).
    pub fn params_for(&self, x: &Tensor) -> QParams {
        match &self.params {
            Some(p) => p.clone(),
            None => self.dynamic_params(x),
        }
    }

    fn dynamic_params(&self, x: &Tensor) -> QParams {
        let x = super::uniform::finite(x);
        let c = *x.size().last().unwrap_or(&1);
        let (lo, hi) = match self.spec.granularity {
            Granularity::PerTensor => (x.min(), x.max()),
            Granularity::PerChannel => {
                let rows = x.reshape([-1, c]);
                (rows.amin(0, false), rows.amax(0, false))
            }
            Granularity::PerToken => (x.amin(-1, true), x.amax(-1, true)),
            Granularity::PerGroup { size } => {
                let mut shape = x.size();
                shape.pop();
                shape.extend([c / size, size]);
                let g = x.reshape(shape.as_slice());
                (g.amin(-1, true), g.amax(-1, true))
            }
        };
        let (lo, hi) = match self.spec.clip {
            Clip::Ratio(r) => (lo * r, hi * r),
            Clip::Percentile(p) if matches!(self.spec.granularity, Granularity::PerToken) => {
                let xf = x.to_kind(Kind::Float);
                (
                    xf.quantile_scalar(1.0 - p, -1, true, "linear"),
                    xf.quantile_scalar(p, -1, true, "linear"),
                )
            }
            _ => (lo, hi),
        };
        QParams::from_range(self.spec.grid, &lo, &hi)
    }

    /// Quantize → dequantize `x` `[.., C]`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let dynamic;
        let params = match &self.params {
            Some(p) => p,
            None => {
                dynamic = self.dynamic_params(x);
                &dynamic
            }
        };
        match self.spec.granularity {
            Granularity::PerGroup { size } => {
                let shape = x.size();
                let c = *shape.last().unwrap_or(&1);
                let mut grouped = shape.clone();
                grouped.pop();
                grouped.extend([c / size, size]);
                params.fake_quant(&x.reshape(grouped.as_slice())).reshape(shape.as_slice())
            }
            _ => params.fake_quant(x),
        }
    }
}

/// Fake-quantizes the inputs of the sites it holds; other sites stay in float.
#[derive(Debug, Default, Clone)]
pub struct ActQuantHook {
    pub sites: BTreeMap<LayerId, ActQuantizer>,
}

impl LinearHook for ActQuantHook {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        match self.sites.get(&id) {
            Some(q) => q.apply(&x),
            None => x,
        }
    }
}
