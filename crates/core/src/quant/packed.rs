//! Real low-bit weights: portable packed storage with exact byte accounting, and `x Wᵀ` through
//! real low-bit kernels (libtorch's, and the crate's own AVX-512 W4A16 kernel) wherever their shape
//! rules hold (a dequantized matmul elsewhere, never a wrong result).
//!
//! Storage (what [`PackedWeight::bytes`] counts and checkpoints hold; the same on every CPU ISA
//! and device):
//! - uniform grids of at most 4 bits: codes `c = q − qmin ∈ [0, 2^b)`, two per byte, row-major;
//!   byte `j` of a row holds column `2j` in its high nibble and column `2j + 1` in its low nibble
//!   (the order torch's CUDA `_convert_weight_to_int4pack` reads and bitsandbytes writes); an odd
//!   last column is padded with a zero nibble;
//! - uniform grids of 5–8 bits: one byte per code, `q` itself (i8 when symmetric, u8 otherwise);
//! - scales f32 `[out, groups]`; zero points u8 `[out, groups]`, asymmetric grids only (symmetric
//!   zero points are 0 and not stored);
//! - NF4: the 4-bit code indices two per byte in the same nibble order, and the absmax constants
//!   as [`Nf4Weight`] holds them (f32, or 8-bit codes + f32 scales + an f64 offset).
//!
//! The kernels' own operands (torch's int4 layouts depend on the CPU ISA and on the device) are
//! derived from this storage when a weight is packed and are never written to disk. libtorch's
//! int4 paths hold a second copy of the 4-bit codes in memory; the int8 paths use the stored
//! codes; the crate's own AVX-512 int4 kernel ([`crate::quant::int4_avx512`], the CPU default
//! where it applies) keeps the codes only in its layout and rebuilds this storage on demand.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

use crate::error::{Error, Result};
use crate::quant::int4_avx512::{self, Int4Weight, Prefill};
use crate::quant::int4_vnni;
use crate::quant::nf4::{Absmax, Nf4Weight};
use crate::quant::spec::{Granularity, WeightSpec};
use crate::quant::team::Isa;
use crate::quant::uniform::{finite, Grid, QParams};
use crate::quant::weight::QuantizedWeight;

/// Block of the double quantization of NF4 absmax constants, as [`Nf4Weight::quantize`] uses it
/// (bitsandbytes' default).
pub const NF4_DOUBLE_QUANT_BLOCK: i64 = 256;

/// Group sizes torch's int4 kernels accept (`qGroupSize`).
pub const INT4_GROUPS: [i64; 4] = [32, 64, 128, 256];

/// How a packed weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PackedFormat {
    /// Uniform codes with one scale (and, asymmetric, one zero point) per `group` consecutive
    /// inputs of a row; `group: None` means one group per output row (per channel).
    Uniform { grid: Grid, group: Option<i64> },
    /// NF4 indices with block-wise absmax, double-quantized when `double_quant`.
    Nf4 { block: i64, double_quant: bool },
}

/// What the activations are when they meet the weight.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ActMode {
    /// Float activations (cast to bf16 for the W4A16 and W8A16 kernels).
    #[default]
    Float,
    /// Symmetric int8 per token (row), with ranges measured on each input (W8A8, and W4A8 on the
    /// own VNNI kernel).
    Int8PerToken,
    /// Symmetric int4 per token (row), with ranges measured on each input: W4A4, the paper's
    /// Table 4 setting, on the own VNNI kernel ([`Kernel::Int4Vnni`]; the 4-bit values travel in
    /// int8 lanes). A documented choice: per-token symmetric ranges, as QuaRot's W4A4 kernels
    /// use, not Q-VLM's static per-channel language ranges, which no integer kernel can factor
    /// out of the dot product.
    Int4PerToken,
    /// Symmetric int8 with one calibrated scale for the whole tensor, fixed before inference
    /// (static; compressed-tensors' `input_scale`, a plan's static per-tensor range): codes
    /// `clamp(round(x · (1/scale)), −128, 127)`, the rule of the fake-quant reference. `_int_mm`
    /// with 8-bit per-channel weights; ≤ 4-bit weights take the dequantized path (the own VNNI
    /// kernel quantizes per token), with the same arithmetic.
    Int8PerTensor { scale: f32 },
}

impl ActMode {
    /// The grid of a per-token integer mode; `None` for float and static per-tensor activations.
    pub fn per_token_grid(self) -> Option<Grid> {
        match self {
            ActMode::Float | ActMode::Int8PerTensor { .. } => None,
            ActMode::Int8PerToken => Some(Grid { bits: 8, symmetric: true }),
            ActMode::Int4PerToken => Some(Grid { bits: 4, symmetric: true }),
        }
    }

    /// The quantizer these activations go through on `x` `[M, K]`, with `x` made finite: per
    /// token (scales `[M, 1]`) or static per tensor (`[1, 1]`); `None` for float activations.
    pub fn quantizer(self, x: &Tensor) -> Option<(QParams, Tensor)> {
        match self {
            ActMode::Float => None,
            ActMode::Int8PerTensor { scale } => {
                let scale = Tensor::full([1, 1], f64::from(scale), (Kind::Float, x.device()));
                let zero_point = scale.zeros_like();
                let grid = Grid { bits: 8, symmetric: true };
                Some((QParams { grid, scale, zero_point }, finite(x)))
            }
            ActMode::Int8PerToken | ActMode::Int4PerToken => {
                self.per_token_grid().map(|grid| per_token_qparams(x, grid))
            }
        }
    }

    /// A static scale is a positive finite number: anything else would quantize every
    /// activation to 0 or to NaN.
    fn check(self, layer: &str) -> Result<()> {
        match self {
            ActMode::Int8PerTensor { scale } if !(scale.is_finite() && scale > 0.0) => Err(
                quant_err(layer, format!("static input scale {scale} is not a positive number")),
            ),
            _ => Ok(()),
        }
    }
}

/// A packed layer's scheme: its storage and its activations.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackedSpec {
    pub format: PackedFormat,
    pub act: ActMode,
}

impl PackedSpec {
    /// W4A16: asymmetric 4-bit weights in groups of `group` inputs, float activations.
    pub fn w4a16(group: i64) -> Result<Self> {
        if group <= 0 {
            return Err(Error::Invalid(format!("W4A16 group size must be positive, got {group}")));
        }
        let grid = Grid::new(4, false)?;
        Ok(Self { format: PackedFormat::Uniform { grid, group: Some(group) }, act: ActMode::Float })
    }

    /// W8A16: symmetric int8 weights per output channel, float activations.
    pub fn w8a16() -> Self {
        let grid = Grid { bits: 8, symmetric: true };
        Self { format: PackedFormat::Uniform { grid, group: None }, act: ActMode::Float }
    }

    /// W8A8: symmetric int8 weights per output channel, dynamic per-token int8 activations.
    pub fn w8a8() -> Self {
        Self { act: ActMode::Int8PerToken, ..Self::w8a16() }
    }

    /// W4A8: W4A16's weights, dynamic symmetric per-token int8 activations.
    pub fn w4a8(group: i64) -> Result<Self> {
        Ok(Self { act: ActMode::Int8PerToken, ..Self::w4a16(group)? })
    }

    /// W4A4: W4A16's weights, dynamic symmetric per-token int4 activations.
    pub fn w4a4(group: i64) -> Result<Self> {
        Ok(Self { act: ActMode::Int4PerToken, ..Self::w4a16(group)? })
    }

    /// NF4 weights (block-wise absmax), float activations.
    pub fn nf4(block: i64, double_quant: bool) -> Self {
        Self { format: PackedFormat::Nf4 { block, double_quant }, act: ActMode::Float }
    }

    /// The weight quantizer whose integer form this storage holds.
    pub fn weight_spec(&self) -> WeightSpec {
        match self.format {
            PackedFormat::Uniform { grid, group } => WeightSpec::Rtn {
                grid,
                granularity: match group {
                    Some(size) => Granularity::PerGroup { size },
                    None => Granularity::PerChannel,
                },
            },
            PackedFormat::Nf4 { block, double_quant } => WeightSpec::Nf4 { block, double_quant },
        }
    }
}

/// Which code path [`PackedWeight::matmul`] takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    /// `_weight_int4pack_mm_for_cpu`: 4-bit codes, bf16 activations.
    Int4Cpu,
    /// This crate's own AVX-512 kernel ([`crate::quant::int4_avx512`]): 4-bit codes, f32
    /// arithmetic on any float activations; the CPU default where its shape rules hold.
    Int4Avx512,
    /// The same kernel's AVX2 + FMA variant (same layout and values), the default on CPUs without
    /// AVX-512.
    Int4Avx2,
    /// This crate's AVX-512 VNNI kernel ([`crate::quant::int4_vnni`]) on the same layout: the
    /// activations on an integer grid, `vpdpbusd` in i32. The kernel of the per-token integer
    /// activation modes (W4A8, W4A4) where the CPU has VNNI; with float activations only when
    /// asked for ([`PackedWeight::with_kernel`]), since it then rounds them to int8 per group (a
    /// different numeric from the exact [`Kernel::Int4Avx512`]).
    Int4Vnni,
    /// `_weight_int4pack_mm`: CUDA tinygemm on tensor cores, bf16 activations.
    Int4Cuda,
    /// `_weight_int8pack_mm`: int8 weights with per-channel scales, bf16 activations.
    Int8Weight,
    /// `_int_mm`: int8 activations × int8 weights with int32 accumulation, then both scales.
    Int8Int8,
    /// Dequantize the weight, then a float matmul (shape rules unmet, device or format without a
    /// kernel).
    Dequantized,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Int4Cpu => "int4_cpu",
            Kernel::Int4Avx512 => "int4_avx512",
            Kernel::Int4Avx2 => "int4_avx2",
            Kernel::Int4Vnni => "int4_vnni",
            Kernel::Int4Cuda => "int4_cuda",
            Kernel::Int8Weight => "int8_weight",
            Kernel::Int8Int8 => "int8_int8",
            Kernel::Dequantized => "dequantized",
        }
    }
}

/// The stored codes and parameters.
#[derive(Debug)]
enum Store {
    Uniform {
        grid: Grid,
        group: i64,
        /// Nibbles `[out, ⌈in/2⌉]` u8 (≤ 4 bits) or bytes `[out, in]` i8/u8.
        codes: Tensor,
        /// `[out, groups]` f32.
        scale: Tensor,
        /// `[out, groups]` u8, asymmetric grids only.
        zero_point: Option<Tensor>,
    },
    Nf4 {
        block: i64,
        /// `[⌈numel/2⌉]` u8 nibbles.
        codes: Tensor,
        absmax: Absmax,
    },
    /// A uniform ≤ 4-bit grid held only in the own kernel's layout (the one copy of the codes;
    /// the portable tensors are rebuilt from it on demand).
    Int4Avx512 { grid: Grid, group: i64, weight: Box<Int4Weight> },
}

/// The portable tensors of a uniform store (shallow clones, or rebuilt from the own kernel's
/// layout): grid, group, codes, scale, zero point.
pub type UniformTensors = (Grid, i64, Tensor, Tensor, Option<Tensor>);

/// The tensors a kernel takes besides the activations, derived from the storage.
#[derive(Debug)]
enum Operand {
    None,
    /// torch's int4 layout and `qScaleAndZeros` `[in/group, out, 2]` bf16.
    Int4 {
        packed: Tensor,
        scale_zeros: Tensor,
    },
    /// The stored i8 codes `[out, in]` and per-channel scales `[out]` (bf16 for
    /// `_weight_int8pack_mm`, f32 for the `_int_mm` rescale).
    Int8 {
        codes: Tensor,
        scales: Tensor,
    },
}

/// A linear's weight `[out, in]` in real low-bit storage, with the kernel that multiplies by it.
#[derive(Debug)]
pub struct PackedWeight {
    spec: PackedSpec,
    out_features: i64,
    in_features: i64,
    store: Store,
    /// The dtype of the float weight this stands for (the layer's compute dtype).
    kind: Kind,
    device: Device,
    kernel: Kernel,
    fallback: Option<String>,
    operand: Operand,
}

fn quant_err(layer: &str, reason: impl Into<String>) -> Error {
    Error::Quant { layer: layer.to_string(), reason: reason.into() }
}

/// A store read from a checkpoint (or built by another tool) is on the grid it claims: uniform
/// codes and zero points within `[0, 2^bits)` (symmetric byte codes within `[qmin, qmax]`), every
/// scale and NF4 absmax finite. A corrupt file is an error naming the layer, never a weight that
/// decodes to garbage. Codes wider than their storage can hold (4-bit nibbles, 8-bit bytes) need
/// no check.
fn check_store(store: &Store, layer: &str) -> Result<()> {
    let all = |t: &Tensor| t.all().int64_value(&[]) != 0;
    let finite = |t: &Tensor, what: &str| {
        if all(&t.isfinite()) {
            Ok(())
        } else {
            Err(quant_err(layer, format!("{what} holds a non-finite value (NaN or ±inf)")))
        }
    };
    match store {
        Store::Uniform { grid, codes, scale, zero_point, .. } => {
            finite(scale, "scale")?;
            let levels = 1i64 << grid.bits;
            if let Some(z) = zero_point.as_ref().filter(|z| z.numel() > 0) {
                let max = z.to_kind(Kind::Int64).max().int64_value(&[]);
                if max >= levels {
                    return Err(quant_err(
                        layer,
                        format!(
                            "zero point {max} is off the {}-bit grid [0, {})",
                            grid.bits, levels
                        ),
                    ));
                }
            }
            let c = codes.to_kind(Kind::Int64);
            let (lo, hi) = if codes.numel() == 0 {
                (0, 0)
            } else if grid.bits <= 4 {
                // Nibbles: both halves of every byte are codes `c ∈ [0, 2^bits)`; the largest
                // high nibble is that of the largest byte.
                let high = c.max().int64_value(&[]) >> 4;
                (0, high.max(c.bitwise_and(15).max().int64_value(&[])))
            } else {
                (c.min().int64_value(&[]), c.max().int64_value(&[]))
            };
            let (want_lo, want_hi) =
                if grid.bits <= 4 || !grid.symmetric { (0, levels - 1) } else { grid.range() };
            if lo < want_lo || hi > want_hi {
                return Err(quant_err(
                    layer,
                    format!(
                        "codes span [{lo}, {hi}], off the {}-bit grid [{want_lo}, {want_hi}]",
                        grid.bits
                    ),
                ));
            }
            Ok(())
        }
        Store::Nf4 { absmax, .. } => match absmax {
            Absmax::F32(t) => finite(t, "NF4 absmax"),
            Absmax::Double { scales, offset, .. } => {
                finite(scales, "NF4 absmax scales")?;
                if offset.is_finite() {
                    Ok(())
                } else {
                    Err(quant_err(layer, format!("NF4 absmax offset {offset} is not finite")))
                }
            }
        },
        Store::Int4Avx512 { .. } => Ok(()),
    }
}

/// Two 4-bit codes per byte along the last axis: column `2j` in the high nibble, `2j + 1` in the
/// low nibble; an odd last column is padded with 0. `[.., C]` (values 0..16) → `[.., ⌈C/2⌉]` u8.
pub fn pack_nibbles(codes: &Tensor) -> Tensor {
    let c = codes.to_kind(Kind::Int);
    let cols = c.size().last().copied().unwrap_or(0);
    let c = if cols % 2 == 1 { c.constant_pad_nd([0, 1]) } else { c };
    let hi = c.slice(-1, 0, None, 2);
    let lo = c.slice(-1, 1, None, 2);
    (hi * 16 + lo).to_kind(Kind::Uint8)
}

/// Inverse of [`pack_nibbles`]: `[.., B]` u8 → `[.., cols]` u8 codes.
pub fn unpack_nibbles(packed: &Tensor, cols: i64) -> Tensor {
    let p = packed.to_kind(Kind::Int);
    let hi = p.floor_divide_scalar(16);
    let lo = p.remainder(16);
    let both = Tensor::stack(&[hi, lo], -1);
    let dims = both.dim() as i64;
    both.flatten(dims - 2, dims - 1).narrow(-1, 0, cols).to_kind(Kind::Uint8)
}

/// Symmetric int8 per-token (per-row) quantization of `x` `[M, K]`, with the range rule of the
/// crate's dynamic activation quantizer (`QParams::from_range` on each row's min and max):
/// codes `[M, K]` i8 and scales `[M, 1]` f32.
pub fn quantize_per_token(x: &Tensor) -> (Tensor, Tensor) {
    let (qp, xf) = per_token_qparams(x, Grid { bits: 8, symmetric: true });
    (qp.quantize(&xf).to_kind(Kind::Int8), qp.scale)
}

fn per_token_qparams(x: &Tensor, grid: Grid) -> (QParams, Tensor) {
    let xf = finite(x);
    let qp = QParams::from_range(grid, &xf.amin(-1, true), &xf.amax(-1, true));
    (qp, xf)
}

/// `x` fake-quantized (quantize → dequantize) per token on `grid`, in `x`'s dtype: what the
/// integer kernels of the per-token modes compute with.
pub fn fake_quant_per_token(x: &Tensor, grid: Grid) -> Tensor {
    let (qp, xf) = per_token_qparams(x, grid);
    qp.fake_quant(&xf).to_kind(x.kind())
}

/// Whether a kernel applies to `format` × `act` on `device` for a weight `[n, k]` (`group`
/// resolved); otherwise why not. The rules are torch's checks, plus the one it lacks (K % 16 for
/// `_weight_int8pack_mm`).
fn plan_kernel(
    format: PackedFormat,
    act: ActMode,
    n: i64,
    k: i64,
    device: Device,
) -> std::result::Result<Kernel, String> {
    let PackedFormat::Uniform { grid, group } = format else {
        return Err("libtorch has no NF4 kernel".into());
    };
    let group = group.unwrap_or(k);
    match act {
        ActMode::Float if grid.bits <= 4 => {
            // CPU (`_convert_weight_to_int4pack_cpu`, `_weight_int4pack_mm_cpu`, registered as the
            // `_for_cpu` ops): N % 16, K % 2, qGroupSize ∈ {32, 64, 128, 256}, K % qGroupSize
            // <https://github.com/pytorch/pytorch/blob/00076d21ed6cd7df2a61165b1fb1d0a436f4e403/aten/src/ATen/native/LinearAlgebra.cpp>.
            // CUDA (`_convert_weight_to_int4pack_cuda`, `_weight_int4pack_mm_cuda`): K %
            // (innerKTiles·16) with innerKTiles ∈ {2, 4, 8}, N in tiles of 8
            // <https://github.com/pytorch/pytorch/blob/6112c47f81ef6e4d24047b79181a5001e9f2055a/aten/src/ATen/native/cuda/int4mm.cu>.
            if !INT4_GROUPS.contains(&group) {
                return Err(format!(
                    "int4 kernels take groups of 32, 64, 128 or 256 inputs, not {group}"
                ));
            }
            match device {
                Device::Cpu if n % 16 == 0 => Ok(Kernel::Int4Cpu),
                Device::Cpu => Err(format!("int4 CPU kernel needs out % 16 == 0, out = {n}")),
                Device::Cuda(_) if n % 8 == 0 && k % 32 == 0 => Ok(Kernel::Int4Cuda),
                Device::Cuda(_) => Err(format!(
                    "int4 CUDA kernel needs out % 8 == 0 and in % 32 == 0, got [{n}, {k}]"
                )),
                other => Err(format!("no int4 kernel on {other:?}")),
            }
        }
        ActMode::Float => {
            if !grid.symmetric {
                return Err("_weight_int8pack_mm has no zero points (asymmetric grid)".into());
            }
            if group != k {
                return Err(format!(
                    "_weight_int8pack_mm takes per-channel scales, not groups of {group}"
                ));
            }
            // `tinygemm_kernel`'s AVX-512 bf16 loop (`for (k = 0; k < K; k += 16)`) has no tail:
            // for K % 16 != 0 it reads past each row and returns garbage (or crashes) with no
            // error <https://github.com/pytorch/pytorch/blob/f3e8ca07ae544d119805764efbf872456432eb83/aten/src/ATen/native/cpu/int8mm_kernel.cpp>.
            if k % 16 != 0 {
                return Err(format!("_weight_int8pack_mm needs in % 16 == 0, in = {k}"));
            }
            match device {
                Device::Cpu | Device::Cuda(_) => Ok(Kernel::Int8Weight),
                other => Err(format!("no int8 weight kernel on {other:?}")),
            }
        }
        ActMode::Int8PerToken | ActMode::Int8PerTensor { .. } => {
            if grid.bits <= 4 || !grid.symmetric || group != k {
                return Err("_int_mm needs symmetric byte codes with per-channel scales".into());
            }
            // CPU (`_int_mm_out_cpu`, same LinearAlgebra.cpp): no shape rule (oneDNN with
            // AVX512-VNNI, else a plain loop). CUDA (`_int_mm_out_cuda`): M > 16 (rows are padded
            // at call time), K % 8, N % 8
            // <https://github.com/pytorch/pytorch/blob/960a68465f6172d22bff1a58a61f942363ff0931/aten/src/ATen/native/cuda/Blas.cpp>.
            match device {
                Device::Cpu => Ok(Kernel::Int8Int8),
                Device::Cuda(_) if n % 8 == 0 && k % 8 == 0 => Ok(Kernel::Int8Int8),
                Device::Cuda(_) => Err(format!(
                    "_int_mm on CUDA needs in % 8 == 0 and out % 8 == 0, got [{n}, {k}]"
                )),
                other => Err(format!("no int8 × int8 kernel on {other:?}")),
            }
        }
        ActMode::Int4PerToken => Err("libtorch has no kernel for 4-bit activations (the own \
                                      int4_vnni kernel takes them, with 4-bit weights)"
            .into()),
    }
}

/// Rows `_int_mm` needs on CUDA (`self.size(0) > 16`).
const CUDA_INT_MM_MIN_ROWS: i64 = 17;

/// The largest `innerKTiles` (8, 4, 2) whose 16-wide k-tiles divide `k`.
fn inner_k_tiles(k: i64) -> i64 {
    [8, 4, 2].into_iter().find(|t| k % (t * 16) == 0).unwrap_or(2)
}

impl PackedWeight {
    /// Quantizes `w` `[out, in]` (round-to-nearest or NF4, as `spec` says) and packs it on `w`'s
    /// device; the layer computes in `w`'s dtype. `layer` names it in errors.
    pub fn quantize(w: &Tensor, spec: PackedSpec, layer: &str) -> Result<Self> {
        if w.dim() != 2 {
            return Err(quant_err(layer, format!("weight must be [out, in], got {:?}", w.size())));
        }
        let q = QuantizedWeight::quantize(w, &spec.weight_spec(), layer)?;
        Self::from_quantized(&q, spec.act, w.kind(), w.device(), layer)
    }

    /// Packs an integer-form weight for `device`, standing for a float weight of dtype `kind`.
    pub fn from_quantized(
        q: &QuantizedWeight,
        act: ActMode,
        kind: Kind,
        device: Device,
        layer: &str,
    ) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        act.check(layer)?;
        match q {
            QuantizedWeight::Uniform { grid, group, codes, scale, zero_point } => {
                let size = codes.size();
                let [out, inp] = size[..] else {
                    return Err(quant_err(layer, format!("codes must be [out, in], got {size:?}")));
                };
                if *group <= 0 || inp % group != 0 {
                    return Err(quant_err(layer, format!("group {group} does not divide {inp}")));
                }
                let groups = inp / group;
                let scale = scale.to_kind(Kind::Float).to_device(Device::Cpu);
                let zp = zero_point.to_kind(Kind::Float).to_device(Device::Cpu);
                if scale.size() != [out, groups] || zp.size() != [out, groups] {
                    return Err(quant_err(
                        layer,
                        format!(
                            "scale {:?} / zero point {:?} are not [out, groups] = [{out}, {groups}]",
                            scale.size(),
                            zp.size()
                        ),
                    ));
                }
                let (qmin, qmax) = grid.range();
                let max_err = |t: &Tensor| t.abs().max().double_value(&[]);
                if max_err(&(&zp - zp.round())) != 0.0
                    || zp.min().double_value(&[]) < qmin as f64
                    || zp.max().double_value(&[]) > qmax as f64
                {
                    return Err(quant_err(layer, "zero points must be integers on the grid"));
                }
                if grid.symmetric && max_err(&zp) != 0.0 {
                    return Err(quant_err(layer, "a symmetric grid has zero points 0"));
                }
                let c = codes.to_device(Device::Cpu).to_kind(Kind::Int);
                // Codes are `q − qmin`: off `[0, qmax − qmin]` they would spill into the
                // neighbouring nibble or wrap in a byte.
                if c.numel() > 0
                    && (c.min().int64_value(&[]) < 0 || c.max().int64_value(&[]) > qmax - qmin)
                {
                    return Err(quant_err(layer, format!("codes off the {}-bit grid", grid.bits)));
                }
                let stored = if grid.bits <= 4 {
                    pack_nibbles(&c)
                } else if grid.symmetric {
                    (c + qmin).to_kind(Kind::Int8)
                } else {
                    (c + qmin).to_kind(Kind::Uint8)
                };
                let zero_point = (!grid.symmetric).then(|| zp.to_kind(Kind::Uint8));
                let store =
                    Store::Uniform { grid: *grid, group: *group, codes: stored, scale, zero_point };
                let format = PackedFormat::Uniform { grid: *grid, group: Some(*group) };
                check_store(&store, layer)?;
                Self::assemble(PackedSpec { format, act }, out, inp, store, kind, device, None)
            }
            QuantizedWeight::Nf4(n) => {
                let [out, inp] = n.shape[..] else {
                    return Err(quant_err(layer, format!("NF4 shape {:?} is not 2-D", n.shape)));
                };
                let absmax = match &n.absmax {
                    Absmax::F32(t) => Absmax::F32(t.to_kind(Kind::Float).to_device(Device::Cpu)),
                    Absmax::Double { codes, scales, offset, block } => {
                        if *block != NF4_DOUBLE_QUANT_BLOCK {
                            return Err(quant_err(
                                layer,
                                format!("NF4 double-quant block {block} is not {NF4_DOUBLE_QUANT_BLOCK}"),
                            ));
                        }
                        Absmax::Double {
                            codes: codes.to_kind(Kind::Uint8).to_device(Device::Cpu),
                            scales: scales.to_kind(Kind::Float).to_device(Device::Cpu),
                            offset: *offset,
                            block: *block,
                        }
                    }
                };
                let double_quant = matches!(absmax, Absmax::Double { .. });
                let codes = pack_nibbles(&n.codes.to_device(Device::Cpu).reshape([-1]));
                let store = Store::Nf4 { block: n.block, codes, absmax };
                let format = PackedFormat::Nf4 { block: n.block, double_quant };
                check_store(&store, layer)?;
                Self::assemble(PackedSpec { format, act }, out, inp, store, kind, device, None)
            }
        }
    }

    /// Rebuilds a packed weight from the tensors [`PackedWeight::parts`] gave (e.g. read back from
    /// a checkpoint); every part must have exactly the dtype and shape `spec` implies.
    pub fn from_parts(
        spec: PackedSpec,
        out: i64,
        inp: i64,
        read: &mut dyn FnMut(&str) -> Result<Tensor>,
        kind: Kind,
        device: Device,
        layer: &str,
    ) -> Result<Self> {
        let mut get = |name: &str, want_kind: Kind, want_shape: &[i64]| -> Result<Tensor> {
            let t = read(name)?;
            if t.kind() != want_kind || t.size() != want_shape {
                return Err(quant_err(
                    layer,
                    format!(
                        "part `{name}` is {:?} {:?}, expected {want_kind:?} {want_shape:?}",
                        t.kind(),
                        t.size()
                    ),
                ));
            }
            Ok(t.to_device(Device::Cpu))
        };
        spec.act.check(layer)?;
        let store = match spec.format {
            PackedFormat::Uniform { grid, group } => {
                Grid::new(grid.bits, grid.symmetric)?;
                let group = group.unwrap_or(inp);
                if group <= 0 || inp % group != 0 {
                    return Err(quant_err(layer, format!("group {group} does not divide {inp}")));
                }
                let groups = inp / group;
                let codes = if grid.bits <= 4 {
                    get("codes", Kind::Uint8, &[out, (inp + 1) / 2])?
                } else if grid.symmetric {
                    get("codes", Kind::Int8, &[out, inp])?
                } else {
                    get("codes", Kind::Uint8, &[out, inp])?
                };
                let scale = get("scale", Kind::Float, &[out, groups])?;
                let zero_point = if grid.symmetric {
                    None
                } else {
                    Some(get("zero_point", Kind::Uint8, &[out, groups])?)
                };
                Store::Uniform { grid, group, codes, scale, zero_point }
            }
            PackedFormat::Nf4 { block, double_quant } => {
                if block <= 0 {
                    return Err(quant_err(layer, format!("NF4 block {block} is not positive")));
                }
                let numel = out * inp;
                let blocks = (numel + block - 1) / block;
                let codes = get("codes", Kind::Uint8, &[(numel + 1) / 2])?;
                let absmax = if double_quant {
                    let dq = (blocks + NF4_DOUBLE_QUANT_BLOCK - 1) / NF4_DOUBLE_QUANT_BLOCK;
                    Absmax::Double {
                        codes: get("absmax_codes", Kind::Uint8, &[blocks])?,
                        scales: get("absmax_scales", Kind::Float, &[dq])?,
                        offset: get("absmax_offset", Kind::Double, &[1])?.double_value(&[0]),
                        block: NF4_DOUBLE_QUANT_BLOCK,
                    }
                } else {
                    Absmax::F32(get("absmax", Kind::Float, &[blocks])?)
                };
                Store::Nf4 { block, codes, absmax }
            }
        };
        check_store(&store, layer)?;
        Self::assemble(spec, out, inp, store, kind, device, None)
    }

    /// Moves the storage to `device`, picks the kernel (`force`, or the fastest whose rules
    /// hold) and builds its operand, falling back to the dequantized path, with the reason kept,
    /// when torch refuses. A forced kernel that does not apply is an error.
    fn assemble(
        spec: PackedSpec,
        out_features: i64,
        in_features: i64,
        store: Store,
        kind: Kind,
        device: Device,
        force: Option<Kernel>,
    ) -> Result<Self> {
        let store = match store {
            Store::Uniform { grid, group, codes, scale, zero_point } => Store::Uniform {
                grid,
                group,
                codes: codes.to_device(device),
                scale: scale.to_device(device),
                zero_point: zero_point.map(|z| z.to_device(device)),
            },
            // NF4 dequantizes through `Nf4Weight`, which works on the CPU; the own int4 layout
            // lives on the CPU.
            other => other,
        };
        let mut weight = Self {
            spec,
            out_features,
            in_features,
            store,
            kind,
            device,
            kernel: Kernel::Dequantized,
            fallback: None,
            operand: Operand::None,
        };
        let mut planned = plan_kernel(spec.format, spec.act, out_features, in_features, device);
        // The own int4 kernels first (their rules are their own: libtorch's need not hold).
        let own_wanted =
            matches!(force, None | Some(Kernel::Int4Avx512 | Kernel::Int4Avx2 | Kernel::Int4Vnni));
        // ≤ 4-bit weights with integer activations have no libtorch kernel: the own VNNI one's
        // reason for refusing is the one to keep.
        let int_activations_on_nibbles = spec.act != ActMode::Float
            && matches!(spec.format, PackedFormat::Uniform { grid, .. } if grid.bits <= 4);
        if own_wanted {
            let own = weight.own_int4().and_then(|own| own_kernel(own, spec.act, force));
            match own {
                Ok((own, kernel)) => {
                    // The own layout replaces the portable tensors: one copy of the codes.
                    if let Store::Uniform { grid, group, .. } = weight.store {
                        planned = Ok(kernel);
                        weight.store = Store::Int4Avx512 { grid, group, weight: Box::new(own) };
                    }
                }
                Err(reason) if force.is_some() || int_activations_on_nibbles => {
                    planned = Err(reason)
                }
                Err(_) => {}
            }
        }
        if let Some(f) = force {
            match &planned {
                Ok(k) if *k == f => {}
                Ok(k) => {
                    return Err(Error::Invalid(format!(
                        "kernel {} does not apply: {} does here",
                        f.name(),
                        k.name()
                    )))
                }
                Err(reason) => {
                    return Err(Error::Invalid(format!(
                        "kernel {} does not apply: {reason}",
                        f.name()
                    )))
                }
            }
        }
        match planned {
            Ok(k @ (Kernel::Int4Avx512 | Kernel::Int4Avx2 | Kernel::Int4Vnni)) => weight.kernel = k,
            Ok(kernel) => match weight.build_operand(kernel) {
                Ok(operand) => {
                    weight.kernel = kernel;
                    weight.operand = operand;
                    // One zero row through the kernel: a device or build without it (e.g. int4
                    // tinygemm below sm80) is found here, not on every forward.
                    let probe = Tensor::zeros([1, in_features], (Kind::Float, device));
                    if let Some(Err(e)) = weight.kernel_matmul(&probe) {
                        weight.fallback = Some(format!("{} refused: {e}", kernel.name()));
                        weight.kernel = Kernel::Dequantized;
                        weight.operand = Operand::None;
                    }
                }
                Err(e) => weight.fallback = Some(format!("{} refused: {e}", kernel.name())),
            },
            Err(reason) => weight.fallback = Some(reason),
        }
        if force.is_some_and(|f| f != weight.kernel) {
            return Err(Error::Invalid(format!(
                "kernel {} refused: {}",
                force.map_or("", Kernel::name),
                weight.fallback.as_deref().unwrap_or("")
            )));
        }
        Ok(weight)
    }

    /// The same weight with `kernel` (e.g. libtorch's [`Kernel::Int4Cpu`] instead of the own
    /// [`Kernel::Int4Avx512`], to compare them); an error naming the rule when it does not apply.
    pub fn with_kernel(self, kernel: Kernel) -> Result<Self> {
        let (spec, out, inp, kind, device) =
            (self.spec, self.out_features, self.in_features, self.kind, self.device);
        let store = match self.uniform_tensors() {
            Some((grid, group, codes, scale, zero_point)) => {
                Store::Uniform { grid, group, codes, scale, zero_point }
            }
            None => self.store,
        };
        Self::assemble(spec, out, inp, store, kind, device, Some(kernel))
    }

    /// The same weight with the own int4 kernel's prefill path set ([`Prefill`]: bf16 pairs
    /// where they can run, or f32 always), to compare the two; an error on another kernel.
    pub fn with_prefill(mut self, prefill: Prefill) -> Result<Self> {
        match &mut self.store {
            Store::Int4Avx512 { weight, .. } => {
                weight.prefill = prefill;
                Ok(self)
            }
            _ => Err(Error::Invalid(format!(
                "a prefill path is set on the own int4 kernels only; this weight is on {}",
                self.kernel.name()
            ))),
        }
    }

    /// The uniform store in the own kernel's layout, or why it cannot be (CPU, float activations,
    /// ≤ 4 bits, [`int4_avx512::unsupported`]'s shape rules).
    fn own_int4(&self) -> std::result::Result<Int4Weight, String> {
        let Store::Uniform { grid, group, codes, scale, zero_point } = &self.store else {
            return Err("not a uniform grid".into());
        };
        if self.device != Device::Cpu || grid.bits > 4 {
            return Err("own int4 kernels: CPU and ≤ 4-bit weights only".into());
        }
        let (n, k) = (self.out_features as usize, self.in_features as usize);
        if let Some(reason) = int4_avx512::unsupported(n, k, *group as usize) {
            return Err(reason);
        }
        let bytes = |t: &Tensor| Vec::<u8>::try_from(&t.contiguous().reshape([-1]));
        let nibbles = bytes(codes).map_err(|e| e.to_string())?;
        let scale =
            Vec::<f32>::try_from(&scale.contiguous().reshape([-1])).map_err(|e| e.to_string())?;
        let zp = zero_point.as_ref().map(bytes).transpose().map_err(|e| e.to_string())?;
        let (qmin, _) = grid.range();
        Int4Weight::from_nibbles(&nibbles, scale, zp, qmin as i32, n, k, *group as usize)
            .ok_or_else(|| "own int4 kernel: storage lengths do not match the shape".into())
    }

    /// A uniform weight's integer form with the codes unpacked, on the CPU: grid, group, codes
    /// `[out, in]` u8 as `q − qmin` (the [`QuantizedWeight`] convention), scale `[out, groups]`
    /// f32 and, asymmetric grids only, zero points `[out, groups]` u8; `None` for NF4.
    pub fn uniform_codes(&self) -> Option<UniformTensors> {
        let (grid, group, codes, scale, zero_point) = self.uniform_tensors()?;
        let codes = codes.to_device(Device::Cpu);
        let codes = if grid.bits <= 4 {
            unpack_nibbles(&codes, self.in_features)
        } else {
            (codes.to_kind(Kind::Int) - grid.range().0).to_kind(Kind::Uint8)
        };
        let cpu = |t: Tensor| t.to_device(Device::Cpu);
        Some((grid, group, codes, cpu(scale), zero_point.map(cpu)))
    }

    /// Grid, group, codes, scale and zero point of a uniform store, on the weight's device.
    fn uniform_tensors(&self) -> Option<UniformTensors> {
        match &self.store {
            Store::Uniform { grid, group, codes, scale, zero_point } => Some((
                *grid,
                *group,
                codes.shallow_clone(),
                scale.shallow_clone(),
                zero_point.as_ref().map(Tensor::shallow_clone),
            )),
            Store::Int4Avx512 { grid, group, weight } => {
                let [n, k] = weight.shape().map(|d| d as i64);
                let groups = k / group;
                let codes = Tensor::from_slice(&weight.nibbles()).reshape([n, k / 2]);
                let scale = Tensor::from_slice(weight.scale()).reshape([n, groups]);
                let zero_point =
                    weight.zero_point().map(|z| Tensor::from_slice(z).reshape([n, groups]));
                Some((*grid, *group, codes, scale, zero_point))
            }
            Store::Nf4 { .. } => None,
        }
    }

    fn build_operand(&self, kernel: Kernel) -> std::result::Result<Operand, TchError> {
        let _guard = tch::no_grad_guard();
        let Some((grid, group, codes, scale, zero_point)) = self.uniform_tensors() else {
            return Ok(Operand::None);
        };
        let (grid, group, codes, scale, zero_point) = (&grid, &group, &codes, &scale, &zero_point);
        let (n, k) = (self.out_features, self.in_features);
        match kernel {
            Kernel::Int4Cpu | Kernel::Int4Cuda => {
                // torch dequantizes `(c − 8)·scale + zero` (its tests build zero = min + 8·scale;
                // the CPU kernel's lookup table holds −8..7
                // <https://github.com/pytorch/pytorch/blob/73a52340e13abd80c95b537808f1a0e90176d45a/aten/src/ATen/native/cpu/int4mm_kernel.cpp>);
                // ours is `(c + qmin − zp)·scale`, so zero = (8 + qmin − zp)·scale.
                let (qmin, _) = grid.range();
                let zp = match zero_point {
                    Some(z) => z.to_kind(Kind::Float),
                    None => scale.zeros_like(),
                };
                let zero = (zp.neg() + (8 + qmin) as f64) * scale;
                let scale_zeros = Tensor::stack(&[scale.shallow_clone(), zero], -1)
                    .transpose(0, 1)
                    .contiguous()
                    .to_kind(Kind::BFloat16);
                let packed = if kernel == Kernel::Int4Cpu {
                    // The CPU layout interleaves 64 (AVX-512) or 32 columns: from int32 codes.
                    unpack_nibbles(codes, k)
                        .to_kind(Kind::Int)
                        .f_internal_convert_weight_to_int4pack_for_cpu(2)?
                } else {
                    // CUDA reads our nibble order directly.
                    codes.contiguous().f_internal_convert_weight_to_int4pack(inner_k_tiles(k))?
                };
                debug_assert_eq!(scale_zeros.size(), [k / group, n, 2]);
                Ok(Operand::Int4 { packed, scale_zeros })
            }
            Kernel::Int8Weight => Ok(Operand::Int8 {
                codes: codes.contiguous(),
                scales: scale.reshape([n]).to_kind(Kind::BFloat16),
            }),
            Kernel::Int8Int8 => Ok(Operand::Int8 {
                codes: codes.contiguous(),
                scales: scale.reshape([1, n]).to_kind(Kind::Float),
            }),
            Kernel::Dequantized | Kernel::Int4Avx512 | Kernel::Int4Avx2 | Kernel::Int4Vnni => {
                Ok(Operand::None)
            }
        }
    }

    pub fn spec(&self) -> PackedSpec {
        self.spec
    }

    /// The path `matmul` takes (for reports).
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Why the dequantized path was chosen, when it was.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [i64; 2] {
        [self.out_features, self.in_features]
    }

    /// The dtype of the float weight this stands for; `matmul` returns its input's dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The stored tensors by part name (`codes`, `scale`, `zero_point`; NF4: `codes`, `absmax` or
    /// `absmax_codes`, `absmax_scales`, `absmax_offset`), on the CPU.
    pub fn parts(&self) -> Vec<(&'static str, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(Device::Cpu);
        if let Some((_, _, codes, scale, zero_point)) = self.uniform_tensors() {
            let mut parts = vec![("codes", cpu(&codes)), ("scale", cpu(&scale))];
            if let Some(z) = zero_point {
                parts.push(("zero_point", cpu(&z)));
            }
            return parts;
        }
        match &self.store {
            Store::Uniform { .. } | Store::Int4Avx512 { .. } => {
                unreachable!("uniform stores return their parts above")
            }
            Store::Nf4 { codes, absmax, .. } => {
                let mut parts = vec![("codes", cpu(codes))];
                match absmax {
                    Absmax::F32(t) => parts.push(("absmax", cpu(t))),
                    Absmax::Double { codes, scales, offset, .. } => {
                        parts.push(("absmax_codes", cpu(codes)));
                        parts.push(("absmax_scales", cpu(scales)));
                        parts.push(("absmax_offset", Tensor::from_slice(&[*offset])));
                    }
                }
                parts
            }
        }
    }

    /// Exact storage bytes: the sum of the parts' sizes (codes, scales, zero points or absmax),
    /// and a static activation scale's 4 bytes.
    pub fn bytes(&self) -> i64 {
        let act = match self.spec.act {
            ActMode::Int8PerTensor { .. } => 4,
            _ => 0,
        };
        if let Store::Int4Avx512 { weight, .. } = &self.store {
            // The same byte count as the portable parts, without rebuilding them.
            return weight.bytes() as i64 + act;
        }
        let parts: i64 = self
            .parts()
            .iter()
            .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as i64)
            .sum();
        parts + act
    }

    /// The weight these codes stand for, f32 `[out, in]` on the weight's device: bit-identical to
    /// [`QuantizedWeight::dequantize`] of the codes it was packed from.
    pub fn dequantize(&self) -> Tensor {
        let _guard = tch::no_grad_guard();
        let (out, inp) = (self.out_features, self.in_features);
        if let Some((grid, group, codes, scale, zero_point)) = self.uniform_tensors() {
            let (qmin, _) = grid.range();
            // Same operations in the same order as QuantizedWeight::dequantize.
            let q = if grid.bits <= 4 {
                unpack_nibbles(&codes, inp).to_kind(Kind::Float) + qmin as f64
            } else {
                codes.to_kind(Kind::Float)
            };
            let q = q.reshape([out, inp / group, group]);
            let q = match zero_point {
                Some(z) => q - z.to_kind(Kind::Float).unsqueeze(-1),
                None => q,
            };
            return (q * scale.unsqueeze(-1)).reshape([out, inp]);
        }
        match &self.store {
            Store::Nf4 { block, codes, absmax } => {
                let numel = out * inp;
                let absmax = match absmax {
                    Absmax::F32(t) => Absmax::F32(t.shallow_clone()),
                    Absmax::Double { codes, scales, offset, block } => Absmax::Double {
                        codes: codes.shallow_clone(),
                        scales: scales.shallow_clone(),
                        offset: *offset,
                        block: *block,
                    },
                };
                let n = Nf4Weight {
                    shape: vec![out, inp],
                    block: *block,
                    codes: unpack_nibbles(codes, numel),
                    absmax,
                };
                n.dequantize().to_device(self.device)
            }
            Store::Uniform { .. } | Store::Int4Avx512 { .. } => {
                unreachable!("uniform stores are dequantized above")
            }
        }
    }

    /// `x Wᵀ` for `x` `[.., in]`, in `x`'s dtype: the chosen kernel, or the dequantized matmul
    /// when there is none (or torch refuses at run time, or `x` is on another device).
    pub fn matmul(&self, x: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let (n, k) = (self.out_features, self.in_features);
        let mut out_shape = x.size();
        out_shape.pop();
        out_shape.push(n);
        let x2 = x.reshape([-1, k]);
        let m = x2.size()[0];
        let y = if m == 0 {
            Tensor::zeros([0, n], (x.kind(), x.device()))
        } else if x.device() != self.device {
            self.dequantized_matmul(&x2)
        } else {
            match self.kernel_matmul(&x2) {
                Some(Ok(y)) => y,
                Some(Err(e)) => {
                    tracing::warn!(kernel = self.kernel.name(), error = %e, "packed kernel failed; using the dequantized matmul");
                    self.dequantized_matmul(&x2)
                }
                None => self.dequantized_matmul(&x2),
            }
        };
        y.reshape(out_shape.as_slice())
    }

    /// The real kernel on `x` `[M, K]` (M > 0), or `None` on the dequantized path.
    fn kernel_matmul(&self, x: &Tensor) -> Option<std::result::Result<Tensor, TchError>> {
        let kind = x.kind();
        let group = match &self.store {
            Store::Uniform { group, .. } => *group,
            Store::Int4Avx512 { .. } => {
                let name = match self.kernel {
                    Kernel::Int4Vnni => "own VNNI kernel",
                    Kernel::Int4Avx512 | Kernel::Int4Avx2 => "own int4 kernel",
                    _ => return None,
                };
                let y = own_matmul(self.out_features, x, name, |xs, m| {
                    Self::own_products(&[self], xs, m)?.pop()
                });
                return Some(y.map(|y| y.to_kind(kind)));
            }
            Store::Nf4 { .. } => return None,
        };
        let bf16 = || x.to_kind(Kind::BFloat16).contiguous();
        let result = match (&self.operand, self.kernel) {
            // bf16 activations (f32 takes a scalar path 25–60× slower on the CPU) and scales of
            // the activations' dtype, as `_weight_int4pack_mm_cpu` checks.
            (Operand::Int4 { packed, scale_zeros }, Kernel::Int4Cpu) => {
                bf16().f_internal_weight_int4pack_mm_for_cpu(packed, group, scale_zeros)
            }
            (Operand::Int4 { packed, scale_zeros }, Kernel::Int4Cuda) => {
                bf16().f_internal_weight_int4pack_mm(packed, group, scale_zeros)
            }
            (Operand::Int8 { codes, scales }, Kernel::Int8Weight) => {
                bf16().f_internal_weight_int8pack_mm(codes, scales)
            }
            (Operand::Int8 { codes, scales }, Kernel::Int8Int8) => self.int_mm(x, codes, scales),
            _ => return None,
        };
        Some(result.map(|y| y.to_kind(kind)))
    }

    /// W8A8: int8 activations (per token, or the static per-tensor scale) × int8 weights (`[K, N]` as a transposed view, the layout
    /// torch's CPU and cuBLAS paths take without a copy), int32 accumulation, then both scales.
    fn int_mm(
        &self,
        x: &Tensor,
        codes: &Tensor,
        scales: &Tensor,
    ) -> std::result::Result<Tensor, TchError> {
        let Some((qp, xf)) = self.spec.act.quantizer(x) else {
            return Err(TchError::Kind("_int_mm needs integer activations".into()));
        };
        let (xq, sx) = (qp.quantize(&xf).to_kind(Kind::Int8), qp.scale);
        let m = xq.size()[0];
        let xq = if self.device.is_cuda() && m < CUDA_INT_MM_MIN_ROWS {
            // Zero rows add nothing to the others' dot products; they are sliced off below.
            xq.constant_pad_nd([0, 0, 0, CUDA_INT_MM_MIN_ROWS - m])
        } else {
            xq
        };
        let acc = xq.f_internal_int_mm(&codes.tr())?.narrow(0, 0, m);
        Ok(acc.to_kind(Kind::Float) * sx * scales)
    }

    /// One token's `x Wᵀ` (`x` `[in]`, `[out]` out) in f32 through the own CPU kernel — the values
    /// [`Self::matmul`] rounds to the layer's dtype — or `None` when this weight has no own kernel
    /// (or it refused `x`): then [`Self::matmul`] on a tensor is the way. For callers that hold
    /// the activations as f32 already (the fused decode step), without a tensor round trip.
    pub fn matmul_token(&self, x: &[f32]) -> Option<Vec<f32>> {
        Self::matmul_token_many(&[self], x)?.pop()
    }

    /// [`Self::matmul_token`] of several weights on the same token `x` in one hand-out of the own
    /// kernel's thread team, the activations put on the kernel's integer grid once (a layer's q,
    /// k and v projections; its gate and up): each weight's `[out_i]`, bit for bit what one
    /// [`Self::matmul_token`] each gives. `None` when they do not share one own kernel, activation
    /// spec, input width and group size on the CPU, or one would be refused alone: then it is one
    /// call each.
    pub fn matmul_token_many(weights: &[&Self], x: &[f32]) -> Option<Vec<Vec<f32>>> {
        let first = weights.first()?;
        let alike = |w: &&Self| {
            w.kernel == first.kernel
                && w.spec.act == first.spec.act
                && w.in_features == first.in_features
                && w.device == Device::Cpu
        };
        if x.len() != first.in_features as usize || !weights.iter().all(alike) {
            return None;
        }
        Self::own_products(weights, x, 1)
    }

    /// `xs` `[m, in]` (row-major f32) through the own kernel of `weights` (one kernel, spec and
    /// input width, checked by the callers): the VNNI one puts `xs` on the integer grid of the
    /// spec's activations (per token for W4A8/W4A4, int8 per group for float activations), once
    /// for all of them; the exact one multiplies f32 by the dequantized codes. `None`: no own
    /// kernel here, or it refused.
    fn own_products(weights: &[&Self], xs: &[f32], m: usize) -> Option<Vec<Vec<f32>>> {
        let first = weights.first()?;
        let own = weights
            .iter()
            .map(|w| match &w.store {
                Store::Int4Avx512 { weight, .. } => Some(&**weight),
                _ => None,
            })
            .collect::<Option<Vec<&Int4Weight>>>()?;
        match first.kernel {
            Kernel::Int4Vnni => {
                let (k, group) = (first.in_features as usize, own[0].group());
                let quantized = match first.spec.act.per_token_grid() {
                    None => int4_vnni::quantize_activations(xs, k, group),
                    Some(grid) => {
                        int4_vnni::quantize_activations_per_token(xs, k, group, grid.bits)
                    }
                };
                Int4Weight::matmul_quantized_many(&own, &quantized?)
            }
            Kernel::Int4Avx512 | Kernel::Int4Avx2 => Int4Weight::matmul_many(&own, xs, m),
            _ => None,
        }
    }

    /// The fallback: the same arithmetic as the fake-quant reference (activations
    /// fake-quantized per token or per tensor when `act` says so), dequantizing the weight on each call.
    fn dequantized_matmul(&self, x: &Tensor) -> Tensor {
        let x = match self.spec.act.quantizer(x) {
            None => x.shallow_clone(),
            Some((qp, xf)) => qp.fake_quant(&xf).to_kind(x.kind()),
        };
        let w = self.dequantize().to_device(x.device()).to_kind(x.kind());
        x.matmul(&w.tr())
    }
}

/// Which own kernel takes `own` for activations `act` (`force`, or the best this CPU runs), or why
/// none does: float activations go to the exact f32 kernel at its SIMD level (or to the VNNI one
/// when forced); per-token integer activations only to the VNNI one.
fn own_kernel(
    own: Int4Weight,
    act: ActMode,
    force: Option<Kernel>,
) -> std::result::Result<(Int4Weight, Kernel), String> {
    let vnni = |own: Int4Weight| {
        let [n, k] = own.shape();
        match int4_vnni::unsupported(n, k, own.group()) {
            None => Ok((own, Kernel::Int4Vnni)),
            Some(reason) => Err(reason),
        }
    };
    match (act, force) {
        (ActMode::Float, Some(Kernel::Int4Vnni)) => vnni(own),
        (ActMode::Float, Some(Kernel::Int4Avx2)) => own
            .with_isa(Isa::Avx2)
            .map(|own| (own, Kernel::Int4Avx2))
            .ok_or_else(|| "the CPU has no AVX2 + FMA".to_string()),
        (ActMode::Float, Some(Kernel::Int4Avx512)) => own
            .with_isa(Isa::Avx512)
            .map(|own| (own, Kernel::Int4Avx512))
            .ok_or_else(|| "the CPU has no AVX-512F + AVX-512BW".to_string()),
        (ActMode::Float, _) => {
            let kernel = match own.isa() {
                Isa::Avx512 => Kernel::Int4Avx512,
                Isa::Avx2 => Kernel::Int4Avx2,
            };
            Ok((own, kernel))
        }
        (ActMode::Int8PerTensor { .. }, _) => Err("the own VNNI kernel quantizes activations per \
                                                    token: static per-tensor int8 activations on \
                                                    ≤ 4-bit weights run dequantized"
            .into()),
        (_, None | Some(Kernel::Int4Vnni)) => vnni(own),
        (_, Some(other)) => Err(format!(
            "{} multiplies float activations; {act:?} activations run on int4_vnni",
            other.name()
        )),
    }
}

/// `x` `[M, K]` read as f32 into `run(x, M)`, which gives the `[M, n]` f32 product (`None`: the
/// kernel refused), back as a tensor on `x`'s device.
fn own_matmul(
    n: i64,
    x: &Tensor,
    kernel: &str,
    run: impl FnOnce(&[f32], usize) -> Option<Vec<f32>>,
) -> std::result::Result<Tensor, TchError> {
    let [m, _] = x.size()[..] else {
        return Err(TchError::Shape(format!("expected [M, K] activations, got {:?}", x.size())));
    };
    let xs = Vec::<f32>::try_from(&x.to_kind(Kind::Float).contiguous().reshape([-1]))?;
    let y = run(&xs, m as usize)
        .ok_or_else(|| TchError::Kind(format!("{kernel} refused activations {:?}", x.size())))?;
    Ok(Tensor::from_slice(&y).reshape([m, n]).to_device(x.device()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_round_trip_with_the_documented_order() {
        let codes = Tensor::from_slice(&[1u8, 2, 3, 4, 5, 15, 0]).reshape([1, 7]);
        let packed = pack_nibbles(&codes);
        let bytes = Vec::<u8>::try_from(&packed.reshape([-1])).unwrap_or_default();
        assert_eq!(bytes, vec![0x12, 0x34, 0x5f, 0x00]);
        let back = unpack_nibbles(&packed, 7);
        assert!(back.equal(&codes));
    }

    #[test]
    fn kernel_rules_follow_torch_checks() {
        let w4 =
            |g| PackedFormat::Uniform { grid: Grid { bits: 4, symmetric: false }, group: Some(g) };
        let w8 = PackedSpec::w8a16().format;
        let cpu = Device::Cpu;
        assert_eq!(plan_kernel(w4(32), ActMode::Float, 48, 64, cpu), Ok(Kernel::Int4Cpu));
        assert!(plan_kernel(w4(32), ActMode::Float, 40, 64, cpu).is_err());
        assert!(plan_kernel(w4(16), ActMode::Float, 48, 64, cpu).is_err());
        assert_eq!(plan_kernel(w8, ActMode::Float, 24, 48, cpu), Ok(Kernel::Int8Weight));
        assert!(plan_kernel(w8, ActMode::Float, 24, 40, cpu).is_err());
        assert_eq!(plan_kernel(w8, ActMode::Int8PerToken, 24, 40, cpu), Ok(Kernel::Int8Int8));
        let cuda = Device::Cuda(0);
        assert_eq!(plan_kernel(w4(32), ActMode::Float, 8, 64, cuda), Ok(Kernel::Int4Cuda));
        assert!(plan_kernel(w8, ActMode::Int8PerToken, 24, 36, cuda).is_err());
        assert!(
            plan_kernel(PackedSpec::nf4(64, false).format, ActMode::Float, 16, 64, cpu).is_err()
        );
        assert_eq!(inner_k_tiles(4096), 8);
        assert_eq!(inner_k_tiles(96), 2);
    }
}
