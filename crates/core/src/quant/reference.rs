//! The ground truth every quantizer here is tested against: uniform affine fake quantization,
//! written exactly as PyTorch's `fake_quantize_per_{tensor,channel}_affine` kernels compute it
//! (`inv_scale = 1/scale` in f32, round half to even, add the zero point, clamp, subtract, scale)
//! <https://github.com/pytorch/pytorch/blob/v2.5.0/aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp#L2617-L2650>.

use tch::Tensor;

/// `(clamp(round(x · (1/scale)) + zp, qmin, qmax) − zp) · scale`; `scale` and `zero_point`
/// broadcast against `x`.
pub fn fake_quant_reference(
    x: &Tensor,
    scale: &Tensor,
    zero_point: &Tensor,
    qmin: i64,
    qmax: i64,
) -> Tensor {
    let inv_scale = scale.reciprocal();
    let q = ((x * inv_scale).round() + zero_point).clamp(qmin, qmax);
    (q - zero_point) * scale
}
