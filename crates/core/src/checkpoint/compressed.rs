//! Writing a model with packed linears as a compressed-tensors llava-hf directory (the format
//! vLLM, SGLang and transformers load; see [`crate::io::compressed`] for the layout): the tensor
//! keys transformers 5.x writes, `config.json` with a `quantization_config` block whose config
//! groups target each quantized linear by an exact pattern (valid for every transformers and
//! vLLM module naming of LLaVA), float linears listed in `ignore`.
//!
//! What compressed-tensors cannot represent is an error naming the layer and the reason: NF4,
//! bit widths other than 4 and 8, quantized activations other than symmetric int8 per token
//! (dynamic) or per tensor (static), and quantized activations with weights other than int8 per
//! channel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::checkpoint::llava_hf::{hf_config_json, preprocessor_json, write_json};
use crate::error::{Error, Result};
use crate::io::compressed::{
    exact_target, pack_cols, pack_rows, InputFormat, LayerFormat, WeightFormat, LIBRARY_VERSION,
    MIXED, QUANT_METHOD,
};
use crate::io::image::ImageProcessorConfig;
use crate::io::naming::Naming;
use crate::io::safetensors::write_safetensors;
use crate::layer_id::LayerId;
use crate::model::linear::{Linear, LinearWeight};
use crate::model::llava::Llava;
use crate::quant::packed::{ActMode, PackedFormat, PackedWeight};

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompressedExport {
    /// Quantized linears by layer id, with their format name.
    pub quantized: BTreeMap<String, String>,
    /// Linears kept in float (in `ignore`).
    pub ignored: Vec<String>,
    /// Bytes of `model.safetensors`.
    pub tensor_bytes: u64,
    /// The same model's parameters at 2 bytes each (an fp16 checkpoint's tensor bytes).
    pub fp16_bytes: u64,
    /// Weight-only layers outside vLLM's fast (Marlin) kernel rules — group size in
    /// {channel, 32, 64, 128}, out features divisible by 64, in features by 128 — which vLLM then
    /// runs on a slower path or refuses; empty when every layer fits.
    pub vllm_marlin_misfits: Vec<String>,
}

/// Why a weight-only layer misses vLLM's Marlin rules (`None` when it fits).
fn marlin_misfit(format: LayerFormat, out: i64, inp: i64) -> Option<String> {
    if format.input != InputFormat::Float {
        return None;
    }
    let mut why = Vec::new();
    if let Some(g) = format.weight.group {
        if ![32, 64, 128].contains(&g) {
            why.push(format!("group {g}"));
        }
    }
    if out % 64 != 0 {
        why.push(format!("out {out} % 64 != 0"));
    }
    if inp % 128 != 0 {
        why.push(format!("in {inp} % 128 != 0"));
    }
    (!why.is_empty()).then(|| why.join(", "))
}

fn unsupported(layer: LayerId, reason: impl std::fmt::Display) -> Error {
    Error::Quant {
        layer: layer.to_string(),
        reason: format!(
            "{reason}: compressed-tensors cannot represent it (export --format qvlm keeps every \
             packed setting; --format llava-hf writes the dequantized weights)"
        ),
    }
}

/// The compressed-tensors form of one packed linear (a static per-tensor activation scale is
/// `input_scale`).
pub fn layer_format(id: LayerId, p: &PackedWeight) -> Result<LayerFormat> {
    let spec = p.spec();
    let PackedFormat::Uniform { grid, .. } = spec.format else {
        return Err(unsupported(id, "NF4 weights"));
    };
    if grid.bits != 4 && grid.bits != 8 {
        return Err(unsupported(id, format!("{}-bit weights (4 and 8 only)", grid.bits)));
    }
    let (_, group, ..) = p.uniform_codes().ok_or_else(|| unsupported(id, "a non-uniform grid"))?;
    let [_, inp] = p.shape();
    let weight = WeightFormat {
        bits: grid.bits,
        symmetric: grid.symmetric,
        group: (group != inp).then_some(group),
    };
    let input = match spec.act {
        ActMode::Float => InputFormat::Float,
        ActMode::Int8PerTensor { .. } => InputFormat::StaticTensor,
        ActMode::Int8PerToken => InputFormat::DynamicToken,
        ActMode::Int4PerToken => {
            return Err(unsupported(
                id,
                "4-bit per-token activations (W4A4) are not exported; export W4A16 or W8A8",
            ))
        }
    };
    if input != InputFormat::Float
        && (weight.bits != 8 || !weight.symmetric || weight.group.is_some())
    {
        return Err(unsupported(
            id,
            "quantized activations with weights other than symmetric int8 per channel",
        ));
    }
    Ok(LayerFormat { weight, input })
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    match kind {
        Kind::Float => Ok("float32"),
        Kind::BFloat16 => Ok("bfloat16"),
        Kind::Half => Ok("float16"),
        k => Err(Error::Invalid(format!("no llava-hf dtype for {k:?}"))),
    }
}

/// The tensors (by suffix) of one quantized linear in compressed-tensors form.
fn layer_tensors(
    id: LayerId,
    p: &PackedWeight,
    format: LayerFormat,
) -> Result<Vec<(&'static str, Tensor)>> {
    let (grid, group, codes, scale, zero_point) =
        p.uniform_codes().ok_or_else(|| unsupported(id, "a non-uniform grid"))?;
    let [out, inp] = p.shape();
    let kind = p.kind();
    let bits = grid.bits;
    let (rows, cols) = (out as usize, inp as usize);
    let values = Vec::<u8>::try_from(&codes.contiguous().reshape([-1]))?;
    let mut parts = Vec::new();
    match format.input {
        InputFormat::Float => {
            let per = 32 / bits as i64;
            let words = pack_rows(&values, rows, cols, bits);
            parts.push((
                "weight_packed",
                Tensor::from_slice(&words).reshape([out, (inp + per - 1) / per]),
            ));
            parts.push(("weight_shape", Tensor::from_slice(&[out, inp])));
        }
        InputFormat::DynamicToken | InputFormat::StaticTensor => {
            // q = u + qmin, i8.
            let (qmin, _) = grid.range();
            let q: Vec<i8> = values.iter().map(|&u| (u as i64 + qmin) as i8).collect();
            parts.push(("weight", Tensor::from_slice(&q).reshape([out, inp])));
        }
    }
    parts.push(("weight_scale", scale.reshape([out, inp / group]).to_kind(kind)));
    if let Some(z) = zero_point {
        let groups = (inp / group) as usize;
        let zp = Vec::<u8>::try_from(&z.contiguous().reshape([-1]))?;
        let per = 32 / bits as i64;
        let words = pack_cols(&zp, rows, groups, bits);
        parts.push((
            "weight_zero_point",
            Tensor::from_slice(&words).reshape([(out + per - 1) / per, inp / group]),
        ));
    }
    if let ActMode::Int8PerTensor { scale } = p.spec().act {
        parts.push(("input_scale", Tensor::from_slice(&[scale]).to_kind(kind)));
    }
    Ok(parts)
}

/// Writes `model` to `dir` as a compressed-tensors llava-hf directory: `config.json`,
/// `model.safetensors`, `preprocessor_config.json` (the tokenizer is the caller's to place).
/// Packed linears are written in compressed-tensors form (with `input_scale` where their
/// activations are quantized statically per tensor).
pub fn save_compressed(
    model: &Llava,
    images: &ImageProcessorConfig,
    dir: &Path,
) -> Result<CompressedExport> {
    crate::model::rotation::refuse_rotated(model, "compressed-tensors export")?;
    let _guard = tch::no_grad_guard();
    let naming = Naming::HfFlatVision;
    let stored = |canonical: &str| naming.stored_key(canonical).1;
    let linears: Vec<&Linear> = model.linears_and_head();
    let mut groups: Vec<(LayerFormat, Vec<String>)> = Vec::new();
    let mut ignore = Vec::new();
    let mut report = CompressedExport {
        quantized: BTreeMap::new(),
        ignored: Vec::new(),
        tensor_bytes: 0,
        fp16_bytes: 0,
        vllm_marlin_misfits: Vec::new(),
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut packed_names: BTreeSet<String> = BTreeSet::new();
    for linear in &linears {
        match &linear.weight {
            LinearWeight::Packed(p) => {
                let format = layer_format(linear.id, p)?;
                for (suffix, t) in layer_tensors(linear.id, p, format)? {
                    tensors.push((stored(&format!("{}.{suffix}", linear.path)), t));
                }
                packed_names.insert(format!("{}.weight", linear.path));
                let target = exact_target(&linear.path);
                match groups.iter_mut().find(|(f, _)| *f == format) {
                    Some((_, targets)) => targets.push(target),
                    None => groups.push((format, vec![target])),
                }
                report.quantized.insert(linear.id.to_string(), format.format_name().to_string());
                let [out, inp] = p.shape();
                if let Some(why) = marlin_misfit(format, out, inp) {
                    report.vllm_marlin_misfits.push(format!("{}: {why}", linear.id));
                }
            }
            // A bf16 weight on the own kernel is a dense weight to every other tool.
            LinearWeight::Float(_) | LinearWeight::Bf16Own(_) => {
                ignore.push(exact_target(&linear.path));
                report.ignored.push(linear.id.to_string());
            }
        }
    }
    if groups.is_empty() {
        return Err(Error::Invalid(
            "no packed linear: nothing for a compressed-tensors checkpoint to hold".into(),
        ));
    }
    let mut kinds = BTreeSet::new();
    for (name, t) in model.named_tensors() {
        report.fp16_bytes += 2 * t.numel() as u64;
        if packed_names.contains(&name) {
            continue;
        }
        kinds.insert(dtype_name(t.kind())?);
        tensors.push((stored(&name), t.detach()));
    }
    let dtype = match kinds.len() {
        1 => kinds.into_iter().next().unwrap_or("float32"),
        _ => return Err(Error::Invalid(format!("tensors of several dtypes: {kinds:?}"))),
    };

    let formats: BTreeSet<&str> = groups.iter().map(|(f, _)| f.format_name()).collect();
    let format = if formats.len() == 1 { groups[0].0.format_name() } else { MIXED };
    let mut config_groups = serde_json::Map::new();
    for (i, (f, targets)) in groups.iter().enumerate() {
        let (weights, input) = f.to_args();
        config_groups.insert(
            format!("group_{i}"),
            json!({
                "targets": targets,
                "weights": weights,
                "input_activations": input,
                "output_activations": null,
                "format": f.format_name(),
            }),
        );
    }
    let quantization_config = json!({
        "quant_method": QUANT_METHOD,
        "format": format,
        "quantization_status": "compressed",
        "config_groups": Value::Object(config_groups),
        "ignore": ignore,
        "kv_cache_scheme": null,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": null,
        "version": LIBRARY_VERSION,
    });

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file = dir.join("model.safetensors");
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&file, &tensors, &meta)?;
    report.tensor_bytes = std::fs::metadata(&file).map_err(|e| Error::io(&file, e))?.len();
    let mut config = hf_config_json(&model.cfg)?;
    config["dtype"] = json!(dtype);
    config["quantization_config"] = quantization_config;
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("preprocessor_config.json"), &preprocessor_json(images))?;
    Ok(report)
}
