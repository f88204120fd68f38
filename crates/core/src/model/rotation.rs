//! QuaRot-style rotations of the language model (Ashkboos et al., 2024), function-preserving in
//! float. Rotating the residual stream by an orthogonal `Q` spreads outlier channels over all
//! channels, so per-tensor and per-token quantizers lose less to them:
//!
//! 1. every RMSNorm gain is folded into the linears it feeds (q/k/v, gate/up, `lm_head`) and
//!    set to 1, so the norm commutes with `Q` (`‖xQ‖ = ‖x‖`)
//!    (<https://github.com/spcl/QuaRot/blob/5008669b08c1f11f9b64d52d16fddd47ca754c5a/fake_quant/rotation_utils.py#L30-L60>);
//! 2. the residual stream is rotated: the embeddings and the projector's output (LLaVA's image
//!    tokens enter the residual there) by `Q`, the linears that read the residual by `W Q`, those
//!    that write it (`o_proj`, `down_proj`) by `Qᵀ W`
//!    (<https://github.com/spcl/QuaRot/blob/5008669b08c1f11f9b64d52d16fddd47ca754c5a/fake_quant/rotation_utils.py#L115-L190>);
//! 3. per attention head, `v_proj`'s outputs and `o_proj`'s inputs by a `head_dim` rotation
//!    (offline, both sides folded);
//! 4. the input of `down_proj` by an *online* rotation: the layer multiplies its input by `H`
//!    before quantization and holds `W H` ([`Linear::input_rotation`]; a dense matmul here, a
//!    fast Walsh–Hadamard transform in a deployment).
//!
//! The same on Qwen2-VL's decoder ([`rotate_qwen2_vl`]): its patch merger writes the image tokens.
//! The vision tower is not rotated: CLIP's LayerNorm subtracts the mean, which does not commute
//! with a rotation unless the mean is first folded into the previous layer (SliceGPT), which is
//! not implemented.
//!
//! Matrices: [`RotationKind::Hadamard`] is QuaRot's randomized Hadamard `H · diag(±1) / √n`, for
//! sizes `m · 2^k` with `m` = 1 or `q + 1` for a prime `q ≡ 3 (mod 4)` (Paley I times Sylvester;
//! LLaMA-7B's 11008 = 5504 · 2 with q = 5503, where QuaRot hard-codes H₁₇₂ · 64); other sizes are
//! an error that names them. [`RotationKind::RandomOrthogonal`] (QR of a seeded Gaussian) fits every size.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::linear::{Linear, LinearWeight};
use crate::model::llama::LlamaModel;
use crate::model::llava::Llava;
use crate::model::qwen2_vl::Qwen2Vl;
pub use crate::quant::spec::{RotationKind, RotationSpec};
use crate::rng::SplitMix64;

/// Whether `q` is an odd prime.
fn odd_prime(q: i64) -> bool {
    q > 2 && q % 2 == 1 && (3..).step_by(2).take_while(|d| d * d <= q).all(|d| q % d != 0)
}

/// Paley's construction I: a ±1 Hadamard matrix of order `q + 1` for a prime `q ≡ 3 (mod 4)`.
fn paley(q: i64) -> Vec<Vec<f64>> {
    let residues: std::collections::BTreeSet<i64> = (1..q).map(|x| x * x % q).collect();
    let chi = |a: i64| {
        let a = a.rem_euclid(q);
        if a == 0 {
            0.0
        } else if residues.contains(&a) {
            1.0
        } else {
            -1.0
        }
    };
    let n = (q + 1) as usize;
    let mut h = vec![vec![0.0; n]; n];
    for (i, row) in h.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let s = match (i, j) {
                (0, 0) => 0.0,
                (0, _) => 1.0,
                (_, 0) => -1.0,
                _ => chi(j as i64 - i as i64),
            };
            *v = s + if i == j { 1.0 } else { 0.0 };
        }
    }
    h
}

/// The odd-or-Paley factor `m` of a Hadamard order `n = m · 2^k` this module builds (`m` = 1, or
/// `q + 1` for a prime `q ≡ 3 mod 4`; the smallest such `m`), or `None`. LLaMA-7B's 11008 is
/// 5504 · 2 (q = 5503).
pub fn hadamard_factor(n: i64) -> Option<i64> {
    if n < 1 {
        return None;
    }
    let twos = i64::from(n.trailing_zeros());
    (0..=twos).rev().map(|k| n >> k).find(|&m| m == 1 || ((m - 1) % 4 == 3 && odd_prime(m - 1)))
}

/// A ±1 Hadamard matrix of order `n` (f64, unnormalised), or `None` when `n` is not
/// `m · 2^k` with `m` = 1 or a Paley order ([`hadamard_factor`]).
pub fn hadamard(n: i64) -> Option<Tensor> {
    let m = hadamard_factor(n)?;
    let base = if m == 1 {
        Tensor::ones([1, 1], (Kind::Double, tch::Device::Cpu))
    } else {
        let rows: Vec<f64> = paley(m - 1).into_iter().flatten().collect();
        Tensor::from_slice(&rows).reshape([m, m])
    };
    let mut h = base;
    let sylvester = Tensor::from_slice(&[1.0f64, 1.0, 1.0, -1.0]).reshape([2, 2]);
    while h.size()[0] < n {
        h = sylvester.kron(&h);
    }
    Some(h)
}

/// A seeded orthogonal `[n, n]` (f64, CPU) of the spec's kind. `what` names the matrix in errors.
pub fn orthogonal(n: i64, spec: &RotationSpec, stream: u64, what: &str) -> Result<Tensor> {
    let mut rng = SplitMix64::new(spec.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    match spec.kind {
        RotationKind::Hadamard => {
            let h = hadamard(n).ok_or_else(|| {
                Error::Invalid(format!(
                    "rotation of {what}: no Hadamard matrix of order {n} here (orders m·2^k, m = 1 \
                     or q+1 for a prime q ≡ 3 mod 4); use kind = \"random_orthogonal\""
                ))
            })?;
            let signs: Vec<f64> =
                (0..n).map(|_| if rng.next_u64() & 1 == 1 { 1.0 } else { -1.0 }).collect();
            Ok(h * Tensor::from_slice(&signs).unsqueeze(0) / (n as f64).sqrt())
        }
        RotationKind::RandomOrthogonal => {
            // Box–Muller on the seeded generator: the same matrix on every machine.
            let uniform =
                |rng: &mut SplitMix64| ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let gauss: Vec<f64> = (0..n * n)
                .map(|_| {
                    let (u, v) = (uniform(&mut rng), uniform(&mut rng));
                    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
                })
                .collect();
            let (q, r) = Tensor::linalg_qr(&Tensor::from_slice(&gauss).reshape([n, n]), "reduced");
            Ok(q * r.diagonal(0, 0, 1).sign().unsqueeze(0))
        }
    }
}

fn float_weight(linear: &Linear) -> Result<Tensor> {
    match &linear.weight {
        LinearWeight::Float(w) => Ok(w.to_kind(Kind::Double)),
        _ => Err(Error::Quant {
            layer: linear.id.to_string(),
            reason: "rotations are applied to float weights, before any packing".into(),
        }),
    }
}

fn set_weight(linear: &mut Linear, w: &Tensor, kind: Kind) {
    linear.weight = LinearWeight::Float(w.to_kind(kind));
}

/// `W ← W diag(g) R` for a linear reading a normed, rotated input.
fn fold_in(linear: &mut Linear, gain: &Tensor, r: &Tensor, kind: Kind) -> Result<()> {
    let w = float_weight(linear)? * gain.unsqueeze(0);
    set_weight(linear, &w.matmul(r), kind);
    Ok(())
}

/// `W ← Rᵀ w`, `b ← Rᵀ b` for a linear writing into a rotated stream, where `w` (f64) is its
/// weight, possibly already transformed on the input side: one f64 product, rounded once.
fn fold_out(linear: &mut Linear, w: &Tensor, r: &Tensor, kind: Kind) {
    set_weight(linear, &r.tr().matmul(w), kind);
    if let Some(b) = &linear.bias {
        linear.bias = Some(b.to_kind(Kind::Double).matmul(r).to_kind(b.kind()));
    }
}

/// Rotates the language model in place (see the module docs); the model records the spec
/// (`Llava::rotation`). The float function is unchanged up to rounding.
pub fn rotate(model: &mut Llava, spec: &RotationSpec) -> Result<()> {
    if let Some(done) = &model.rotation {
        return Err(Error::Invalid(format!("the model is already rotated ({done:?})")));
    }
    // The projector's last linear writes the image tokens into the residual stream.
    let writer = match &mut model.projector.linear_2 {
        Some(l2) => l2,
        None => &mut model.projector.linear_1,
    };
    rotate_decoder(&mut model.language_model, writer, spec)?;
    model.rotation = Some(*spec);
    Ok(())
}

/// Rotates a Qwen2-VL / Qwen2.5-VL language model in place as [`rotate`] does LLaVA's: the
/// patch merger's last linear (`mlp.2`) writes the image tokens into the residual stream. The
/// q/k/v biases stay (they are added after the rotated input's product); the vision tower is not
/// rotated. The model records the spec (`Qwen2Vl::rotation`).
pub fn rotate_qwen2_vl(model: &mut Qwen2Vl, spec: &RotationSpec) -> Result<()> {
    if let Some(done) = &model.rotation {
        return Err(Error::Invalid(format!("the model is already rotated ({done:?})")));
    }
    rotate_decoder(&mut model.language_model, &mut model.visual.merger.fc2, spec)?;
    model.rotation = Some(*spec);
    Ok(())
}

/// Steps 1–4 of the module docs on a LLaMA-style decoder whose residual stream also receives
/// `writer`'s outputs (the image tokens).
fn rotate_decoder(lm: &mut LlamaModel, writer: &mut Linear, spec: &RotationSpec) -> Result<()> {
    if lm.lm_head.is_none() {
        return Err(Error::Invalid(
            "rotation of a model with tied embeddings: the head would need untying (not \
             implemented)"
                .into(),
        ));
    }
    // Checked before anything changes, so a refused rotation leaves the model as it was.
    let linears = lm.layers.iter().flat_map(|l| l.linears());
    let linears = linears.chain(lm.lm_head.as_ref());
    if let Some(l) = linears
        .chain(std::iter::once(&*writer))
        .find(|l| !matches!(l.weight, LinearWeight::Float(_)))
    {
        return Err(Error::Quant {
            layer: l.id.to_string(),
            reason: "rotations are applied to float weights, before any packing".into(),
        });
    }
    let _guard = tch::no_grad_guard();
    let device = lm.embed_tokens.device();
    let kind = lm.embed_tokens.kind();
    let cfg = lm.cfg.clone();
    let (d, inter, head_dim) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let q = orthogonal(d, spec, 0, "the residual stream")?.to_device(device);
    let h_head = orthogonal(head_dim, spec, 1, "the attention heads")?.to_device(device);
    let h_down = orthogonal(inter, spec, 2, "down_proj's input")?.to_device(device);
    // One f32 copy shared by every layer (applied in f32 whatever the model's dtype).
    let h_down_f32 = h_down.to_kind(Kind::Float);
    let ones = Tensor::ones([d], (Kind::Double, device));

    lm.embed_tokens = lm.embed_tokens.to_kind(Kind::Double).matmul(&q).to_kind(kind);
    for layer in &mut lm.layers {
        let g = layer.input_layernorm.weight.to_kind(Kind::Double);
        let a = &mut layer.self_attn;
        for l in [&mut a.q_proj, &mut a.k_proj] {
            fold_in(l, &g, &q, kind)?;
        }
        layer.input_layernorm.weight = ones.to_kind(layer.input_layernorm.weight.kind());
        // v_proj's outputs and o_proj's inputs per head: v' = v H, W_v ← Hᵀ W_v diag(g) Q,
        // W_o ← W_o H (then Qᵀ), each chained in f64 and rounded once.
        let v = (float_weight(&a.v_proj)? * g.unsqueeze(0)).matmul(&q);
        let heads_v = v.size()[0] / head_dim;
        let v = h_head.tr().matmul(&v.view([heads_v, head_dim, -1]));
        set_weight(&mut a.v_proj, &v.reshape([heads_v * head_dim, -1]), kind);
        if let Some(b) = &a.v_proj.bias {
            let rotated = b.to_kind(Kind::Double).view([heads_v, head_dim]).matmul(&h_head);
            a.v_proj.bias = Some(rotated.reshape([-1]).to_kind(b.kind()));
        }
        // W_o ← Qᵀ (W_o · blockdiag(H)) in f64, rounded once.
        let o = float_weight(&a.o_proj)?;
        let (out, cols) = (o.size()[0], o.size()[1]);
        let o = o.view([out, cols / head_dim, head_dim]).matmul(&h_head).reshape([out, cols]);
        fold_out(&mut a.o_proj, &o, &q, kind);

        let g = layer.post_attention_layernorm.weight.to_kind(Kind::Double);
        fold_in(&mut layer.gate_proj, &g, &q, kind)?;
        fold_in(&mut layer.up_proj, &g, &q, kind)?;
        layer.post_attention_layernorm.weight =
            ones.to_kind(layer.post_attention_layernorm.weight.kind());
        // W ← Qᵀ (W H) in one f64 product, rounded to the model's dtype once.
        let w = float_weight(&layer.down_proj)?.matmul(&h_down);
        fold_out(&mut layer.down_proj, &w, &q, kind);
        layer.down_proj.input_rotation = Some(h_down_f32.shallow_clone());
    }
    let g = lm.norm.weight.to_kind(Kind::Double);
    if let Some(head) = &mut lm.lm_head {
        fold_in(head, &g, &q, kind)?;
    }
    lm.norm.weight = ones.to_kind(lm.norm.weight.kind());
    let w = float_weight(writer)?;
    fold_out(writer, &w, &q, kind);
    Ok(())
}

/// Checkpoint writers call this: no checkpoint format holds the online rotation before
/// `down_proj` (`Linear::input_rotation`), so a rotated model is refused rather than written
/// without it.
pub fn refuse_rotated(model: &Llava, what: &str) -> Result<()> {
    match &model.rotation {
        Some(r) => Err(Error::Invalid(format!(
            "{what}: the model is rotated ({r:?}); its online Hadamard before down_proj has no place \
             in this checkpoint format, so writing it would change the model"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_orders_and_orthogonality() -> Result<()> {
        for n in [1, 2, 4, 12, 20, 24, 48, 192, 384, 256] {
            let h = hadamard(n).unwrap_or_else(|| panic!("order {n}"));
            let eye = Tensor::eye(n, (Kind::Double, tch::Device::Cpu)) * n as f64;
            assert_eq!((h.matmul(&h.tr()) - eye).abs().max().double_value(&[]), 0.0, "{n}");
        }
        for n in [3, 36, 52] {
            assert!(hadamard(n).is_none(), "{n}");
        }
        // Without building them: LLaMA's widths.
        assert_eq!(hadamard_factor(4096), Some(1));
        assert_eq!(hadamard_factor(11008), Some(5504));
        assert_eq!(hadamard_factor(13824), Some(108));
        for kind in [RotationKind::Hadamard, RotationKind::RandomOrthogonal] {
            let spec = RotationSpec { kind, seed: 3 };
            let q = orthogonal(24, &spec, 0, "t")?;
            let eye = Tensor::eye(24, (Kind::Double, tch::Device::Cpu));
            assert!((q.matmul(&q.tr()) - eye).abs().max().double_value(&[]) < 1e-12, "{kind:?}");
            let again = orthogonal(24, &spec, 0, "t")?;
            assert_eq!((&q - again).abs().max().double_value(&[]), 0.0, "{kind:?}: seeded");
        }
        let err = orthogonal(36, &RotationSpec { kind: RotationKind::Hadamard, seed: 0 }, 0, "x");
        assert!(format!("{:?}", err).contains("order 36"));
        Ok(())
    }
}
