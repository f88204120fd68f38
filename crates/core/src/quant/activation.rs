//! Activation quantizers: static (ranges measured by a search) or dynamic ranges at any
//! granularity, applied at linear inputs through a [`LinearHook`].

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::hook::LinearHook;
use crate::layer_id::LayerId;
use crate::quant::spec::{ActSpec, Clip, Granularity, RangeMode};
use crate::quant::uniform::QParams;

/// A ready activation quantizer: its spec and, when static, its parameters.
#[derive(Debug, Clone)]
pub struct ActQuantizer {
    pub spec: ActSpec,
    /// Static parameters; broadcast shapes `[]`, `[C]`, `[T, 1]` or `[G, 1]` by granularity.
    pub params: Option<QParams>,
}

impl ActQuantizer {
    /// A dynamic quantizer (ranges measured on each input). Static quantizers come from the
    /// ranges a search measured: [`ActQuantizer::with_range`].
    pub fn dynamic(spec: ActSpec) -> Result<Self> {
        spec.clip.validate()?;
        if spec.range != RangeMode::Dynamic {
            return Err(Error::Invalid(
                "a static activation quantizer needs its ranges: ActQuantizer::with_range".into(),
            ));
        }
        Ok(Self { spec, params: None })
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
