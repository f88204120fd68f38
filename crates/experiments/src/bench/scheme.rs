//! Weight schemes the bench compares, and how one is put into a built model: the linears of the
//! configured parts (`model.packed_parts`: the decoder, and optionally the vision tower, the
//! projector and `lm_head`) get the scheme's weight; everything else (embeddings, norms, biases,
//! the parts not listed) keeps the model's float dtype.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use qvlm_core::layer_id::{LayerId, Slot, Tower};
use qvlm_core::model::linear::{Linear, LinearWeight};
use qvlm_core::quant::bf16_own::{self, Bf16Weight};
use qvlm_core::quant::int4_vnni;
use qvlm_core::quant::packed::{Kernel, PackedSpec, PackedWeight};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::model::BenchModel;

/// A group of weights a packed scheme can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// q/k/v/o and gate/up/down of every decoder layer.
    Decoder,
    /// Every linear of the vision tower (CLIP's; Qwen2-VL's ViT) (the paper's Q-VLM also
    /// quantizes CLIP, Table 4).
    Vision,
    /// The multimodal projector's linears (Qwen2-VL: the patch merger's).
    Projector,
    /// The language-model head (when not tied to the embeddings).
    LmHead,
}

impl Part {
    pub fn key(self) -> &'static str {
        match self {
            Part::Decoder => "decoder",
            Part::Vision => "vision",
            Part::Projector => "projector",
            Part::LmHead => "lm_head",
        }
    }
}

/// One row of the efficiency table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// Dense f32 weights and activations.
    Fp32,
    /// Dense bf16 weights and activations through libtorch's `linear` (the FP16-class
    /// reference; compute-bound on the CPUs seen).
    Bf16,
    /// The same bf16 weights through this crate's own AVX-512 kernel
    /// ([`qvlm_core::quant::bf16_own`], f32 arithmetic): the memory-bound 16-bit baseline.
    Bf16Own,
    /// int8 weights per output channel, bf16 activations (`_weight_int8pack_mm`).
    W8a16,
    /// int8 weights per output channel, int8 activations per token (`_int_mm`).
    W8a8,
    /// Asymmetric 4-bit weights in groups, bf16 activations: the crate's own AVX-512 kernel on
    /// CPUs with AVX-512F+BW, libtorch's int4 kernels elsewhere.
    W4a16,
    /// The same weights through libtorch's `_weight_int4pack_mm_for_cpu` (to compare kernels).
    W4a16Libtorch,
    /// The same weights through the own VNNI kernel ([`qvlm_core::quant::int4_vnni`]), which puts
    /// the activation row on an int8 grid per group of inputs on the fly (llama.cpp's Q4_0 × Q8_0
    /// route): a different numeric from the exact W4A16 row, named by its own label.
    W4a16Vnni,
    /// The same weights with dynamic symmetric per-token int8 activations, on the VNNI kernel.
    W4a8,
    /// The same weights with dynamic symmetric per-token int4 activations (the paper's Table 4
    /// setting is W4A4), on the VNNI kernel.
    W4a4,
    /// A `[[checkpoint]]` as loaded from its directory (its own formats and kernels); not a
    /// scheme a shape can be given.
    Stored,
}

impl Scheme {
    pub const ALL: [Scheme; 10] = [
        Scheme::Fp32,
        Scheme::Bf16,
        Scheme::Bf16Own,
        Scheme::W8a16,
        Scheme::W8a8,
        Scheme::W4a16Libtorch,
        Scheme::W4a16,
        Scheme::W4a16Vnni,
        Scheme::W4a8,
        Scheme::W4a4,
    ];

    /// The config key.
    pub fn key(self) -> &'static str {
        match self {
            Scheme::Fp32 => "fp32",
            Scheme::Bf16 => "bf16",
            Scheme::Bf16Own => "bf16_own",
            Scheme::W8a16 => "w8a16",
            Scheme::W8a8 => "w8a8",
            Scheme::W4a16 => "w4a16",
            Scheme::W4a16Libtorch => "w4a16_libtorch",
            Scheme::W4a16Vnni => "w4a16_vnni",
            Scheme::W4a8 => "w4a8",
            Scheme::W4a4 => "w4a4",
            Scheme::Stored => "stored",
        }
    }

    /// The table label (`group` is W4A16's group size).
    pub fn label(self, group: i64) -> String {
        match self {
            Scheme::Fp32 => "FP32".into(),
            Scheme::Bf16 => "BF16".into(),
            Scheme::Bf16Own => "BF16 own".into(),
            Scheme::W8a16 => "W8A16".into(),
            Scheme::W8a8 => "W8A8".into(),
            Scheme::W4a16 => format!("W4A16 g{group}"),
            Scheme::W4a16Libtorch => format!("W4A16 g{group} libtorch"),
            Scheme::W4a16Vnni => format!("W4A16 g{group} q8"),
            Scheme::W4a8 => format!("W4A8 g{group}"),
            Scheme::W4a4 => format!("W4A4 g{group}"),
            Scheme::Stored => "as stored".into(),
        }
    }

    /// Whether the scheme holds 4-bit weights in groups of `w4_group`.
    pub fn is_w4(self) -> bool {
        matches!(
            self,
            Scheme::W4a16 | Scheme::W4a16Libtorch | Scheme::W4a16Vnni | Scheme::W4a8 | Scheme::W4a4
        )
    }

    /// Why the scheme cannot run on `device` of this machine, if it cannot (the own bf16 kernel
    /// needs an AVX-512 CPU); the bench lists it under "Not run" instead of failing.
    pub fn not_here(self, device: Device) -> Option<String> {
        match self {
            Scheme::Bf16Own if device != Device::Cpu => {
                Some(format!("the own bf16 kernel runs on the CPU, not {device:?}"))
            }
            Scheme::Bf16Own if !bf16_own::available() => {
                Some("the own bf16 kernel needs AVX-512F + AVX-512BW or AVX2 + FMA, which this CPU lacks".into())
            }
            // Without the VNNI kernel the integer-activation rows would dequantize every weight
            // on every call: a number about that fallback, not about the scheme.
            s if s.on_vnni() && device != Device::Cpu => {
                Some(format!("the own VNNI kernel runs on the CPU, not {device:?}"))
            }
            s if s.on_vnni() && !int4_vnni::available() => Some(
                "the own VNNI kernel (int4_vnni) needs AVX-512F + AVX-512BW + AVX-512 VNNI, which \
                 this CPU lacks"
                    .into(),
            ),
            _ => None,
        }
    }

    /// The dtype of the model's float parts (and of the activations around packed linears).
    pub fn float_kind(self) -> Kind {
        match self {
            Scheme::Fp32 => Kind::Float,
            _ => Kind::BFloat16,
        }
    }

    /// The kernel the scheme insists on; `None`: the fastest that applies.
    pub fn kernel(self) -> Option<Kernel> {
        match self {
            Scheme::W4a16Libtorch => Some(Kernel::Int4Cpu),
            Scheme::W4a16Vnni | Scheme::W4a8 | Scheme::W4a4 => Some(Kernel::Int4Vnni),
            _ => None,
        }
    }

    /// Whether the scheme runs on the own VNNI kernel (its shape rules and CPU features apply).
    pub fn on_vnni(self) -> bool {
        self.kernel() == Some(Kernel::Int4Vnni)
    }

    /// The packed storage of the decoder linears; `None` for the dense schemes.
    pub fn packed_spec(self, group: i64) -> Result<Option<PackedSpec>> {
        Ok(match self {
            Scheme::Fp32 | Scheme::Bf16 | Scheme::Bf16Own => None,
            Scheme::W8a16 => Some(PackedSpec::w8a16()),
            Scheme::W8a8 => Some(PackedSpec::w8a8()),
            Scheme::W4a16 | Scheme::W4a16Libtorch | Scheme::W4a16Vnni => {
                Some(PackedSpec::w4a16(group)?)
            }
            Scheme::W4a8 => Some(PackedSpec::w4a8(group)?),
            Scheme::W4a4 => Some(PackedSpec::w4a4(group)?),
            Scheme::Stored => bail!("a checkpoint's weights are loaded as stored, not packed"),
        })
    }
}

/// Every decoder linear of `model`, in execution order.
pub fn decoder_linears(model: &BenchModel) -> Vec<&Linear> {
    model.language_model().layers.iter().flat_map(|l| l.linears()).collect()
}

/// The part a linear belongs to.
fn part_of(id: LayerId) -> Part {
    match (id.tower, id.slot) {
        (_, Slot::LmHead) => Part::LmHead,
        (Tower::Vision, _) => Part::Vision,
        (Tower::Projector, _) => Part::Projector,
        (Tower::Language, _) => Part::Decoder,
    }
}

/// Bytes of every weight a scheme can pack (all linears and `lm_head`) as they are held now:
/// float `numel · size` or the packed storage's exact bytes. Biases, embeddings and norms stay
/// float in every scheme and are not counted.
pub fn packable_bytes(model: &BenchModel) -> i64 {
    model.linears_and_head().iter().map(|l| l.weight.bytes()).sum()
}

/// How many weights [`apply`] packs for `parts`.
pub fn packed_count(model: &BenchModel, parts: &[Part]) -> usize {
    model.linears_and_head().iter().filter(|l| parts.contains(&part_of(l.id))).count()
}

/// Puts `scheme` into the weights of `parts` of a model built with float weights. A packed weight
/// replaces the previous weight one linear at a time, so two configurations' packed parts are
/// never resident together. Codes are random (speed and bytes do not depend on their values); a
/// scheme with the same storage as the one in place (W8A8 after W8A16, W4A16 after its libtorch
/// twin) takes over its codes.
pub fn apply(
    model: &mut BenchModel,
    scheme: Scheme,
    group: i64,
    parts: &[Part],
    bar: &ProgressBar,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let Some(spec) = scheme.packed_spec(group)? else {
        let float = model.linears_and_head().iter().all(|l| match l.weight {
            LinearWeight::Float(_) => true,
            LinearWeight::Bf16Own(_) => scheme == Scheme::Bf16Own,
            LinearWeight::Packed(_) => false,
        });
        if !float {
            bail!("{} needs the float model, but it was already packed", scheme.label(group));
        }
        if scheme == Scheme::Bf16Own {
            own_bf16(model, parts, bar)?;
        }
        return Ok(());
    };
    let device = model.device();
    for linear in model.linears_and_head_mut() {
        if !parts.contains(&part_of(linear.id)) {
            continue;
        }
        let (out, inp) = (linear.out_features, linear.in_features);
        pack(&mut linear.weight, scheme, spec, group, [out, inp], device, &linear.id.to_string())?;
        bar.inc(1);
    }
    Ok(())
}

/// Puts the linears of `parts` on the own bf16 kernel (their weights as they are, in bf16).
fn own_bf16(model: &mut BenchModel, parts: &[Part], bar: &ProgressBar) -> Result<()> {
    for linear in model.linears_and_head_mut() {
        if !parts.contains(&part_of(linear.id)) {
            continue;
        }
        if let LinearWeight::Float(w) = &linear.weight {
            let name = linear.id.to_string();
            let own = Bf16Weight::from_tensor(w, &name)
                .with_context(|| format!("putting {name} on the own bf16 kernel"))?;
            linear.weight = LinearWeight::Bf16Own(own);
        }
        bar.inc(1);
    }
    Ok(())
}

/// Replaces `weight` `[out, in]` by its packed form under `scheme`.
fn pack(
    weight: &mut LinearWeight,
    scheme: Scheme,
    spec: PackedSpec,
    group: i64,
    [out, inp]: [i64; 2],
    device: Device,
    name: &str,
) -> Result<()> {
    let kind = match weight {
        LinearWeight::Float(w) => w.kind(),
        LinearWeight::Packed(p) => p.kind(),
        LinearWeight::Bf16Own(_) => Kind::BFloat16,
    };
    let mut parts = match weight {
        LinearWeight::Packed(p) if p.spec().format == spec.format => {
            p.parts().into_iter().map(|(n, t)| (n.to_string(), t)).collect()
        }
        _ => random_parts(spec, out, inp, group)?,
    };
    let mut read = |part: &str| {
        parts
            .remove(part)
            .ok_or_else(|| qvlm_core::error::Error::Invalid(format!("no random part `{part}`")))
    };
    let packed = PackedWeight::from_parts(spec, out, inp, &mut read, kind, device, name)
        .and_then(|p| match scheme.kernel() {
            Some(kernel) => p.with_kernel(kernel),
            None => Ok(p),
        })
        .with_context(|| format!("packing {name} as {}", scheme.label(group)))?;
    // Assigning drops the previous weight (float or packed).
    *weight = LinearWeight::Packed(packed);
    Ok(())
}

/// Random stored parts of a packed weight `[out, in]`: uniform codes, scales of a weight with
/// standard deviation ≈ 0.02 (as the random float weights), zero points mid-grid.
fn random_parts(
    spec: PackedSpec,
    out: i64,
    inp: i64,
    group: i64,
) -> Result<BTreeMap<String, Tensor>> {
    let cpu = Device::Cpu;
    let mut parts = BTreeMap::new();
    match spec {
        s if s.format == PackedSpec::w8a16().format => {
            parts.insert(
                "codes".into(),
                Tensor::randint_low(-127, 128, [out, inp], (Kind::Int8, cpu)),
            );
            parts.insert("scale".into(), Tensor::full([out, 1], 0.1 / 127.0, (Kind::Float, cpu)));
        }
        s if s.format == PackedSpec::w4a16(group)?.format => {
            let groups = inp / group;
            parts.insert(
                "codes".into(),
                Tensor::randint_low(0, 256, [out, (inp + 1) / 2], (Kind::Uint8, cpu)),
            );
            parts.insert(
                "scale".into(),
                Tensor::full([out, groups], 0.1 / 15.0, (Kind::Float, cpu)),
            );
            parts.insert("zero_point".into(), Tensor::full([out, groups], 8, (Kind::Uint8, cpu)));
        }
        other => bail!("no random parts for {other:?}"),
    }
    Ok(parts)
}
