//! A linear layer with an identity and an optional quantized weight state: float runs and
//! quantized runs share this one definition.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::hook::LinearHook;
use crate::io::weights::{Init, VarBuilder};
use crate::layer_id::LayerId;
use crate::quant::bf16_own::Bf16Weight;
use crate::quant::packed::{PackedSpec, PackedWeight};

/// How a linear's weight is held.
#[derive(Debug)]
pub enum LinearWeight {
    /// The checkpoint's weight (or a fake-quantized copy of it: quantize → dequantize).
    Float(Tensor),
    /// Real low-bit storage, multiplied by a libtorch low-bit kernel where one applies.
    Packed(PackedWeight),
    /// bf16 weights multiplied by this crate's own AVX-512 kernel in f32
    /// ([`crate::quant::bf16_own`]; CPU only): the efficiency bench's memory-bound 16-bit
    /// baseline beside libtorch's bf16 linear.
    Bf16Own(Bf16Weight),
}

impl LinearWeight {
    /// `x Wᵀ` (no bias).
    pub fn matmul(&self, x: &Tensor) -> Tensor {
        match self {
            LinearWeight::Float(w) => x.linear(w, None::<Tensor>),
            LinearWeight::Packed(p) => p.matmul(x),
            LinearWeight::Bf16Own(w) => w.matmul_tensor(x),
        }
    }

    /// The float weight (dequantized when packed), `[out, in]`.
    pub fn float(&self) -> Tensor {
        match self {
            LinearWeight::Float(w) => w.shallow_clone(),
            LinearWeight::Packed(p) => p.dequantize().to_kind(p.kind()),
            LinearWeight::Bf16Own(w) => w.to_tensor(),
        }
    }

    /// The weight's bytes as held: `numel · element size`, or the packed storage's exact bytes.
    pub fn bytes(&self) -> i64 {
        match self {
            LinearWeight::Float(w) => w.numel() as i64 * w.kind().elt_size_in_bytes() as i64,
            LinearWeight::Packed(p) => p.bytes(),
            LinearWeight::Bf16Own(w) => w.bytes() as i64,
        }
    }
}

#[derive(Debug)]
pub struct Linear {
    pub id: LayerId,
    /// The canonical name it was loaded under (`language_model.layers.3.self_attn.q_proj`); its
    /// tensors are `<path>.weight` and `<path>.bias`.
    pub path: String,
    pub in_features: i64,
    pub out_features: i64,
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    /// An orthogonal `R` `[in, in]` (f32) applied to the input before everything else, the weight
    /// holding `W R` so that `(x R)(W R)ᵀ = x Wᵀ`: QuaRot's online Hadamard
    /// ([`crate::model::rotation`]). `None` for every checkpoint as loaded.
    pub input_rotation: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `[out, in]` and, when `bias`, `bias` `[out]` from `vb`; fresh weights are
    /// N(0, 0.02), transformers' default `initializer_range`.
    pub fn load(
        vb: &VarBuilder,
        id: LayerId,
        in_features: i64,
        out_features: i64,
        bias: bool,
    ) -> Result<Self> {
        Self::load_init(vb, id, in_features, out_features, bias, 0.02)
    }

    /// As [`Linear::load`], with fresh weights drawn from N(0, `std`).
    pub fn load_init(
        vb: &VarBuilder,
        id: LayerId,
        in_features: i64,
        out_features: i64,
        bias: bool,
        std: f64,
    ) -> Result<Self> {
        // A compressed-tensors checkpoint stores some linears packed (see io::compressed).
        let weight = match vb.compressed_linear(out_features, in_features, &id.to_string())? {
            Some(packed) => LinearWeight::Packed(packed),
            None => LinearWeight::Float(vb.get(
                "weight",
                &[out_features, in_features],
                Init::Normal { std },
            )?),
        };
        let bias = if bias { Some(vb.get("bias", &[out_features], Init::Zeros)?) } else { None };
        Ok(Self {
            id,
            path: vb.path(),
            in_features,
            out_features,
            weight,
            bias,
            input_rotation: None,
        })
    }

    /// Its tensors under their canonical names; a packed weight is dequantized.
    pub fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{}.weight", self.path), self.float_weight()));
        if let Some(b) = &self.bias {
            out.push((format!("{}.bias", self.path), b.shallow_clone()));
        }
    }

    /// `y = x Wᵀ + b`, after the hook has seen (and possibly replaced) `x` (rotated first when
    /// the layer has an input rotation: the hook sees what the weight multiplies).
    pub fn forward(&self, x: &Tensor, hook: &mut dyn LinearHook) -> Tensor {
        let x = hook.input(self.id, self.rotate_input(x));
        self.multiply(&x)
    }

    /// The layer without the hook.
    pub fn forward_raw(&self, x: &Tensor) -> Tensor {
        self.multiply(&self.rotate_input(x))
    }

    fn rotate_input(&self, x: &Tensor) -> Tensor {
        match &self.input_rotation {
            // In f32 whatever the activations' dtype (a bf16 copy of H is not orthogonal).
            Some(r) => x.to_kind(Kind::Float).matmul(&r.to_device(x.device())).to_kind(x.kind()),
            None => x.shallow_clone(),
        }
    }

    /// `x Wᵀ + b` of an input already rotated.
    fn multiply(&self, x: &Tensor) -> Tensor {
        match &self.weight {
            LinearWeight::Float(w) => x.linear(w, self.bias.as_ref()),
            LinearWeight::Packed(_) | LinearWeight::Bf16Own(_) => {
                let y = self.weight.matmul(x);
                match &self.bias {
                    Some(b) => {
                        let b = b.to_kind(y.kind());
                        y + b
                    }
                    None => y,
                }
            }
        }
    }

    /// The float weight (dequantized when packed), `[out, in]`.
    pub fn float_weight(&self) -> Tensor {
        self.weight.float()
    }

    /// The compute dtype of the layer.
    pub fn kind(&self) -> Kind {
        match &self.weight {
            LinearWeight::Float(w) => w.kind(),
            LinearWeight::Packed(p) => p.kind(),
            LinearWeight::Bf16Own(_) => Kind::BFloat16,
        }
    }
}

/// Replaces the weight of every linear that `spec_of` names a spec for by its packed form;
/// returns how many were packed. A linear keeps its dtype and device.
pub fn pack_linears<'a>(
    linears: impl IntoIterator<Item = &'a mut Linear>,
    mut spec_of: impl FnMut(LayerId) -> Option<PackedSpec>,
) -> Result<usize> {
    let _guard = tch::no_grad_guard();
    let mut packed = 0;
    for linear in linears {
        let Some(spec) = spec_of(linear.id) else { continue };
        let w = linear.float_weight();
        let p = PackedWeight::quantize(&w, spec, &linear.id.to_string())?;
        linear.weight = LinearWeight::Packed(p);
        packed += 1;
    }
    Ok(packed)
}
