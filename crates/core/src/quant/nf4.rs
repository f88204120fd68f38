//! NormalFloat-4 as in QLoRA / bitsandbytes: 16 levels at quantiles of N(0, 1), normalised to
//! [-1, 1], with block-wise absmax scaling (block 64) and optional double quantization of the
//! absmax constants (8-bit dynamic code, block 256, mean subtracted).
//! <https://github.com/bitsandbytes-foundation/bitsandbytes/blob/0.41.0/bitsandbytes/functional.py#L236-L262>

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`), digits as bitsandbytes prints them.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_433_208_465_58,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

// Coefficients of Wichura's AS241 (PPND16), highest degree first.
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
const AS241_A: [f64; 8] = [
    2509.0809287301226727,
    33430.575583588128105,
    67265.770927008700853,
    45921.953931549871457,
    13731.693765509461125,
    1971.5909503065514427,
    133.14166789178437745,
    3.387132872796366608,
];
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
const AS241_B: [f64; 8] = [
    5226.495278852545925,
    28729.085735721942674,
    39307.89580009271061,
    21213.794301586595867,
    5394.1960214247511077,
    687.1870074920579083,
    42.313330701600911252,
    1.0,
];
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
const AS241_C: [f64; 8] = [
    7.7454501427834140764e-4,
    0.0227238449892691845833,
    0.24178072517745061177,
    1.27045825245236838258,
    3.64784832476320460504,
    5.7694972214606914055,
    4.6303378461565452959,
    1.42343711074968357734,
];
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
const AS241_D: [f64; 8] = [
    1.05075007164441684324e-9,
    5.475938084995344946e-4,
    0.0151986665636164571966,
    0.14810397642748007459,
    0.68976733498510000455,
    1.6763848301838038494,
    2.05319162663775882187,
    1.0,
];
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
const AS241_E: [f64; 8] = [
    2.01033439929228813265e-7,
    2.71155556874348757815e-5,
    0.0012426609473880784386,
    0.026532189526576123093,
    0.29656057182850489123,
    1.7848265399172913358,
    5.4637849111641143699,
    6.6579046435011037772,
];
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
const AS241_F: [f64; 8] = [
    2.04426310338993978564e-15,
    1.4215117583164458887e-7,
    1.8463183175100546818e-5,
    7.868691311456132591e-4,
    0.0148753612908506148525,
    0.13692988092273580531,
    0.59983220655588793769,
    1.0,
];

fn horner(coefficients: &[f64; 8], x: f64) -> f64 {
    coefficients.iter().fold(0.0, |acc, c| acc * x + c)
}

/// Inverse of the standard normal CDF (Wichura's AS241, PPND16; relative error ~1e-16).
/// <https://doi.org/10.2307/2347330>
pub fn normal_ppf(p: f64) -> f64 {
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        return q * horner(&AS241_A, r) / horner(&AS241_B, r);
    }
    let r = if q < 0.0 { p } else { 1.0 - p };
    let r = (-r.ln()).sqrt();
    let val = if r <= 5.0 {
        horner(&AS241_C, r - 1.6) / horner(&AS241_D, r - 1.6)
    } else {
        horner(&AS241_E, r - 5.0) / horner(&AS241_F, r - 5.0)
    };
    if q < 0.0 {
        -val
    } else {
        val
    }
}

/// The NF4 code computed from its definition (QLoRA's `create_normal_map(offset=0.9677083)`):
/// 8 positive levels at N(0,1) quantiles of `linspace(offset, 0.5, 9)[:-1]`, 7 negative levels at
/// `linspace(offset, 0.5, 8)[:-1]`, and 0, divided by the largest.
pub fn nf4_code_from_definition() -> [f64; 16] {
    let offset = 0.967_708_3;
    let lin = |n: usize| -> Vec<f64> {
        (0..n).map(|i| offset + (0.5 - offset) * i as f64 / (n - 1) as f64).collect()
    };
    let mut v: Vec<f64> = lin(9)[..8].iter().map(|&p| normal_ppf(p)).collect();
    v.extend(lin(8)[..7].iter().map(|&p| -normal_ppf(p)));
    v.push(0.0);
    v.sort_by(f64::total_cmp);
    let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut out = [0.0; 16];
    for (o, x) in out.iter_mut().zip(&v) {
        *o = x / max;
    }
    out
}

/// bitsandbytes' 8-bit dynamic code (`create_dynamic_map(signed=True)`), used for the double
/// quantization of absmax constants.
pub fn dynamic_map_8bit() -> Vec<f32> {
    let (total_bits, max_exponent_bits) = (8i32, 7i32);
    let non_sign_bits = total_bits - 1;
    let additional_items = (1i32 << (non_sign_bits - max_exponent_bits)) - 1;
    let means = |n: i32| -> Vec<f64> {
        let b: Vec<f64> = (0..n).map(|i| 0.1 + 0.9 * f64::from(i) / f64::from(n - 1)).collect();
        b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
    };
    let mut data: Vec<f64> = Vec::new();
    let mut last_i = 0;
    for i in 0..max_exponent_bits {
        let items = (1i32 << (i + non_sign_bits - max_exponent_bits)) + 1;
        let scale = 10f64.powi(-(max_exponent_bits - 1) + i);
        for m in means(items) {
            data.push(scale * m);
            data.push(-scale * m);
        }
        last_i = i;
    }
    if additional_items > 0 {
        let scale = 10f64.powi(-(max_exponent_bits - 1) + last_i);
        for m in means(additional_items + 1) {
            data.push(scale * m);
            data.push(-scale * m);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    // bitsandbytes builds the list in f32 (torch.linspace) before sorting.
    let mut data: Vec<f32> = data.into_iter().map(|x| x as f32).collect();
    data.sort_by(f32::total_cmp);
    data
}

/// Index of the nearest code value for each element of `x` (codes sorted ascending).
pub fn nearest_code(x: &Tensor, code: &Tensor) -> Tensor {
    // Midpoints between consecutive codes; bucketize gives the nearest index.
    let n = code.size()[0];
    let mids = (code.narrow(0, 0, n - 1) + code.narrow(0, 1, n - 1)) / 2.0;
    Tensor::bucketize(&x.contiguous(), &mids, false, false)
}

/// NF4-quantized weights: 4-bit indices and per-block absmax (or its double-quantized form).
#[derive(Debug)]
pub struct Nf4Weight {
    pub shape: Vec<i64>,
    pub block: i64,
    /// `[numel]` u8 codes 0..16 (unpacked; see `packed` for two per byte).
    pub codes: Tensor,
    pub absmax: Absmax,
}

#[derive(Debug)]
pub enum Absmax {
    F32(Tensor),
    /// 8-bit codes of (absmax − offset) in blocks of `block`, with per-block scales.
    Double {
        codes: Tensor,
        scales: Tensor,
        offset: f64,
        block: i64,
    },
}

impl Absmax {
    pub fn values(&self) -> Tensor {
        match self {
            Absmax::F32(t) => t.shallow_clone(),
            Absmax::Double { codes, scales, offset, block } => {
                let map = Tensor::from_slice(&dynamic_map_8bit());
                let n = codes.size()[0];
                let v = map.index_select(0, &codes.to_kind(Kind::Int64));
                let padded = (n + block - 1) / block * block;
                let v = v.constant_pad_nd([0, padded - n]).view([-1, *block]) * scales.unsqueeze(1);
                v.reshape([-1]).narrow(0, 0, n) + *offset
            }
        }
    }

    pub fn bytes(&self) -> i64 {
        match self {
            Absmax::F32(t) => 4 * t.numel() as i64,
            Absmax::Double { codes, scales, .. } => {
                codes.numel() as i64 + 4 * scales.numel() as i64 + 4
            }
        }
    }
}

fn blocks(x: &Tensor, block: i64) -> Tensor {
    let n = x.numel() as i64;
    let padded = (n + block - 1) / block * block;
    x.reshape([-1]).constant_pad_nd([0, padded - n]).view([-1, block])
}

impl Nf4Weight {
    pub fn quantize(w: &Tensor, block: i64, double_quant: bool) -> Result<Self> {
        if block <= 0 {
            return Err(Error::Invalid(format!("NF4 block size must be positive, got {block}")));
        }
        let w =
            super::uniform::finite(&w.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu));
        let n = w.numel() as i64;
        let b = blocks(&w, block);
        let absmax = b.abs().amax(1, false);
        let normed = &b / absmax.clamp_min(f64::from(f32::MIN_POSITIVE)).unsqueeze(1);
        let code = Tensor::from_slice(&NF4_CODE);
        let codes = nearest_code(&normed, &code).reshape([-1]).narrow(0, 0, n).to_kind(Kind::Uint8);
        let absmax = if double_quant {
            // bitsandbytes: offset = mean(absmax); blockwise 8-bit dynamic quantization of the rest.
            let dq_block = 256;
            let offset = absmax.mean(Kind::Float).double_value(&[]);
            let centered = &absmax - offset;
            let m = absmax.size()[0];
            let cb = blocks(&centered, dq_block);
            let scales = cb.abs().amax(1, false);
            let normed = &cb / scales.clamp_min(f64::from(f32::MIN_POSITIVE)).unsqueeze(1);
            let map = Tensor::from_slice(&dynamic_map_8bit());
            let codes =
                nearest_code(&normed, &map).reshape([-1]).narrow(0, 0, m).to_kind(Kind::Uint8);
            Absmax::Double { codes, scales, offset, block: dq_block }
        } else {
            Absmax::F32(absmax)
        };
        Ok(Self { shape: w.size(), block, codes, absmax })
    }

    pub fn dequantize(&self) -> Tensor {
        let code = Tensor::from_slice(&NF4_CODE);
        let n = self.codes.numel() as i64;
        let v = code.index_select(0, &self.codes.to_kind(Kind::Int64));
        let scaled = blocks(&v, self.block) * self.absmax.values().unsqueeze(1);
        scaled.reshape([-1]).narrow(0, 0, n).reshape(self.shape.as_slice())
    }

    /// Storage bytes: 4 bits per weight plus the absmax constants.
    pub fn bytes(&self) -> i64 {
        (self.codes.numel() as i64 + 1) / 2 + self.absmax.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_code_matches_its_definition() {
        let computed = nf4_code_from_definition();
        for (a, b) in NF4_CODE.iter().zip(computed.iter()) {
            assert!((f64::from(*a) - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn normal_ppf_inverts_known_quantiles() {
        assert!((normal_ppf(0.975) - 1.959_963_984_540_054).abs() < 1e-12);
        assert!((normal_ppf(0.5)).abs() < 1e-15);
        assert!((normal_ppf(1e-10) + 6.361_340_902_404_056).abs() < 1e-9);
    }

    #[test]
    fn dynamic_map_is_sorted_signed_and_complete() {
        let m = dynamic_map_8bit();
        assert_eq!(m.len(), 256);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m[0] < -0.9 && m.contains(&0.0));
    }

    #[test]
    fn dequantization_is_blockwise_absmax_times_nearest_code() -> Result<()> {
        tch::manual_seed(0);
        let w = Tensor::randn([8, 40], (Kind::Float, tch::Device::Cpu));
        let q = Nf4Weight::quantize(&w, 64, false)?;
        let deq = q.dequantize();
        // Independent reference: per block, absmax · argmin_k |x/absmax − code_k|.
        let flat = Vec::<f32>::try_from(&w.reshape([-1])).unwrap_or_default();
        let got = Vec::<f32>::try_from(&deq.reshape([-1])).unwrap_or_default();
        for (bi, block) in flat.chunks(64).enumerate() {
            let absmax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (j, x) in block.iter().enumerate() {
                let t = x / absmax;
                let best = NF4_CODE
                    .iter()
                    .copied()
                    .min_by(|a, b| (a - t).abs().total_cmp(&(b - t).abs()))
                    .unwrap_or(0.0);
                assert!((got[bi * 64 + j] - best * absmax).abs() < 1e-6);
            }
        }
        // Double quantization changes the constants only slightly.
        let dq = Nf4Weight::quantize(&w, 64, true)?;
        let d = (dq.dequantize() - &deq).abs().max().double_value(&[]);
        assert!(d < 0.02, "{d}");
        assert!(dq.bytes() < q.bytes());
        Ok(())
    }
}
