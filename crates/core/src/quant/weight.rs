//! Weight quantizers: round-to-nearest uniform (per tensor / output channel / input group) and
//! NF4, each giving a fake-quantized float weight and, for storage, its integer form.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Weight;
use crate::quant::spec::{Granularity, WeightSpec};
use crate::quant::uniform::{Grid, QParams};

/// A quantized weight `[out, in]` in integer form.
#[derive(Debug)]
pub enum QuantizedWeight {
    /// Uniform codes `[out, in]` (as u8, 0..2^b for asymmetric; shifted by −qmin when symmetric)
    /// with scales and zero points `[out, groups]`.
    Uniform {
        grid: Grid,
        group: i64,
        codes: Tensor,
        scale: Tensor,
        zero_point: Tensor,
    },
    Nf4(Nf4Weight),
}

/// Uniform parameters of a weight `[out, in]` viewed as `[out, groups, group]`.
fn weight_qparams(w: &Tensor, grid: Grid, group: i64) -> QParams {
    let (out, inp) = (w.size()[0], w.size()[1]);
    let g = w.reshape([out, inp / group, group]);
    QParams::from_range(grid, &g.amin(-1, true), &g.amax(-1, true))
}

/// The input-group length a granularity means for a weight `[out, in]`.
pub fn group_len(granularity: Granularity, inp: i64, layer: &str) -> Result<i64> {
    match granularity {
        Granularity::PerChannel => Ok(inp),
        Granularity::PerGroup { size } if size > 0 && inp % size == 0 => Ok(size),
        Granularity::PerGroup { size } => Err(Error::Quant {
            layer: layer.to_string(),
            reason: format!("weight group size {size} does not divide the input width {inp}"),
        }),
        Granularity::PerTensor | Granularity::PerToken => Err(Error::Quant {
            layer: layer.to_string(),
            reason: format!(
                "{granularity:?} is not a weight granularity (per_channel or per_group)"
            ),
        }),
    }
}

impl QuantizedWeight {
    /// Quantizes `w` `[out, in]` by `spec`. `layer` names the layer in errors.
    pub fn quantize(w: &Tensor, spec: &WeightSpec, layer: &str) -> Result<Self> {
        let w = super::uniform::finite(&w.detach().to_kind(Kind::Float));
        match *spec {
            WeightSpec::Rtn { grid, granularity } => {
                let (out, inp) = (w.size()[0], w.size()[1]);
                let group = if granularity == Granularity::PerTensor {
                    inp
                } else {
                    group_len(granularity, inp, layer)?
                };
                let qp = if granularity == Granularity::PerTensor {
                    let qp = QParams::from_range(grid, &w.min(), &w.max());
                    QParams {
                        grid,
                        scale: qp.scale.expand([out, 1, 1], false).contiguous(),
                        zero_point: qp.zero_point.expand([out, 1, 1], false).contiguous(),
                    }
                } else {
                    weight_qparams(&w, grid, group)
                };
                let (qmin, _) = grid.range();
                let codes = qp.quantize(&w.reshape([out, inp / group, group])).reshape([out, inp])
                    - qmin as f64;
                Ok(QuantizedWeight::Uniform {
                    grid,
                    group,
                    codes: codes.to_kind(Kind::Uint8),
                    scale: qp.scale.reshape([out, inp / group]),
                    zero_point: qp.zero_point.reshape([out, inp / group]),
                })
            }
            WeightSpec::Nf4 { block, double_quant } => {
                Ok(QuantizedWeight::Nf4(Nf4Weight::quantize(&w, block, double_quant)?))
            }
        }
    }

    /// The float weight these codes stand for (f32, CPU).
    pub fn dequantize(&self) -> Tensor {
        match self {
            QuantizedWeight::Uniform { grid, group, codes, scale, zero_point } => {
                let (out, inp) = (codes.size()[0], codes.size()[1]);
                let (qmin, _) = grid.range();
                let q =
                    codes.to_kind(Kind::Float).reshape([out, inp / group, *group]) + qmin as f64;
                ((q - zero_point.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape([out, inp])
            }
            QuantizedWeight::Nf4(n) => n.dequantize(),
        }
    }

    /// Bytes of packed storage: codes at their bit width plus f32 scales (and f32 zero points for
    /// asymmetric grids).
    pub fn bytes(&self) -> i64 {
        match self {
            QuantizedWeight::Uniform { grid, codes, scale, .. } => {
                let bits = codes.numel() as i64 * i64::from(grid.bits);
                let params = scale.numel() as i64 * if grid.symmetric { 4 } else { 8 };
                (bits + 7) / 8 + params
            }
            QuantizedWeight::Nf4(n) => n.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtn_per_group_matches_the_reference_fake_quant() -> Result<()> {
        tch::manual_seed(1);
        let w = Tensor::randn([6, 32], (Kind::Float, tch::Device::Cpu));
        let grid = Grid::new(4, false)?;
        let q = QuantizedWeight::quantize(
            &w,
            &WeightSpec::Rtn { grid, granularity: Granularity::PerGroup { size: 8 } },
            "t",
        )?;
        let g = w.reshape([6, 4, 8]);
        let qp = QParams::from_range(grid, &g.amin(-1, true), &g.amax(-1, true));
        let (qmin, qmax) = grid.range();
        let want = super::super::reference::fake_quant_reference(
            &g,
            &qp.scale,
            &qp.zero_point,
            qmin,
            qmax,
        )
        .reshape([6, 32]);
        assert_eq!((q.dequantize() - want).abs().max().double_value(&[]), 0.0);
        assert!(group_len(Granularity::PerGroup { size: 5 }, 32, "t").is_err());
        Ok(())
    }
}
