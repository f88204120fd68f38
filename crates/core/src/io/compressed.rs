//! The compressed-tensors checkpoint format (the Python package `compressed-tensors`, which
//! llm-compressor writes and vLLM, SGLang and transformers load): the `quantization_config` block
//! of `config.json`, which linear a config group covers, and one linear's packed tensors.
//!
//! Followed exactly from compressed-tensors 0.20.1 (`quantization/quant_args.py`,
//! `quant_scheme.py`, `quant_config.py`, `utils/match.py::match_name`,
//! `compressors/quantized_compressors/pack_quantized.py::pack_to_int32`):
//! - `pack-quantized` (weight-only): `weight_packed` i32 `[N, ⌈K·b/32⌉]`, 32/b values per word,
//!   the lowest bits holding the lowest input index, each value stored as `q + 2^(b−1)`;
//!   `weight_scale` `[N, K/group]` (`[N, 1]` per channel) in the model dtype; `weight_shape` i64
//!   `[N, K]`; `weight_zero_point` (asymmetric only) i32 packed the same way along dim 0:
//!   `[⌈N·b/32⌉, K/group]`.
//! - `int-quantized` (W8A8): `weight` i8 `[N, K]`, `weight_scale` `[N, 1]`, and `input_scale`
//!   `[1]` for static per-tensor activations (none for dynamic per-token ones).
//! - Codes: `q = clamp(round(x/scale) + zp, −2^(b−1), 2^(b−1)−1)`, `x̂ = (q − zp)·scale`; a
//!   symmetric scale is `absmax / ((qmax − qmin)/2)`. This crate's grids use the same scales; its
//!   asymmetric codes are `q + 2^(b−1)` (range `[0, 2^b)`), so the stored words are the same
//!   and only the zero points shift by `2^(b−1)`.
//!
//! Reading is strict: every key of `quantization_config` must be one this reader knows, and a
//! value it cannot represent (float or block quantization, activation reordering, a KV-cache or
//! sparsity scheme, …) is an error naming the key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::naming::Naming;
use crate::quant::packed::{ActMode, PackedWeight};
use crate::quant::uniform::Grid;
use crate::quant::weight::QuantizedWeight;

/// `quantization_config.quant_method`.
pub const QUANT_METHOD: &str = "compressed-tensors";
/// The compressed-tensors release whose layout this module follows (written as `version`).
pub const LIBRARY_VERSION: &str = "0.20.1";
/// `format` of weight-only packed integer layers.
pub const PACK_QUANTIZED: &str = "pack-quantized";
/// `format` of int8 weights with quantized activations.
pub const INT_QUANTIZED: &str = "int-quantized";
/// `format` when config groups differ in format (each group names its own).
pub const MIXED: &str = "mixed-precision";

/// compressed-tensors' `QuantizationArgs`, with every field it defines (so reading is strict).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantArgs {
    pub num_bits: u8,
    #[serde(rename = "type", default = "int_type")]
    pub kind: String,
    #[serde(default = "yes")]
    pub symmetric: bool,
    #[serde(default)]
    pub group_size: Option<i64>,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_structure: Option<Value>,
    /// `true`, `false` or `"local"`.
    #[serde(default = "not_dynamic")]
    pub dynamic: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actorder: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_dtype: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zp_dtype: Option<Value>,
    /// Calibration settings of the writer; they do not change the stored tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observer: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observer_kwargs: Option<Value>,
}

fn int_type() -> String {
    "int".into()
}
fn yes() -> bool {
    true
}
fn not_dynamic() -> Value {
    Value::Bool(false)
}

/// compressed-tensors' `QuantizationScheme` (one config group).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantScheme {
    pub targets: Vec<String>,
    #[serde(default)]
    pub weights: Option<QuantArgs>,
    #[serde(default)]
    pub input_activations: Option<QuantArgs>,
    #[serde(default)]
    pub output_activations: Option<QuantArgs>,
    #[serde(default)]
    pub format: Option<String>,
}

/// The `quantization_config` block of `config.json` as compressed-tensors writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressedConfig {
    pub quant_method: String,
    pub format: String,
    pub quantization_status: String,
    pub config_groups: BTreeMap<String, QuantScheme>,
    #[serde(default)]
    pub ignore: Vec<String>,
    #[serde(default)]
    pub kv_cache_scheme: Option<Value>,
    #[serde(default)]
    pub sparsity_config: Option<Value>,
    #[serde(default)]
    pub transform_config: Option<Value>,
    #[serde(default)]
    pub global_compression_ratio: Option<Value>,
    #[serde(default)]
    pub moe_sparsity_config: Option<Value>,
    #[serde(default)]
    pub version: Option<String>,
}

/// A linear's weights as a compressed-tensors layer stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightFormat {
    pub bits: u8,
    pub symmetric: bool,
    /// Inputs per scale; `None`: one scale per output channel.
    pub group: Option<i64>,
}

/// What a layer does with its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// Float activations (`input_activations: null`).
    Float,
    /// Symmetric int8 per token, ranges measured on each input (`strategy: token, dynamic`).
    DynamicToken,
    /// Symmetric int8 with one calibrated scale per tensor (`input_scale`).
    StaticTensor,
}

/// One config group as this crate understands it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerFormat {
    pub weight: WeightFormat,
    pub input: InputFormat,
}

impl LayerFormat {
    /// `pack-quantized` for weight-only layers, `int-quantized` when activations are quantized.
    pub fn format_name(&self) -> &'static str {
        match self.input {
            InputFormat::Float => PACK_QUANTIZED,
            InputFormat::DynamicToken | InputFormat::StaticTensor => INT_QUANTIZED,
        }
    }

    /// The config group's `weights` and `input_activations`.
    pub fn to_args(&self) -> (QuantArgs, Option<QuantArgs>) {
        let w = self.weight;
        let weights = QuantArgs {
            num_bits: w.bits,
            kind: int_type(),
            symmetric: w.symmetric,
            group_size: w.group,
            strategy: Some(if w.group.is_some() { "group" } else { "channel" }.into()),
            block_structure: None,
            dynamic: not_dynamic(),
            actorder: None,
            scale_dtype: None,
            zp_dtype: None,
            observer: None,
            observer_kwargs: None,
        };
        let input = match self.input {
            InputFormat::Float => None,
            InputFormat::DynamicToken | InputFormat::StaticTensor => {
                let dynamic = self.input == InputFormat::DynamicToken;
                Some(QuantArgs {
                    num_bits: 8,
                    strategy: Some(if dynamic { "token" } else { "tensor" }.into()),
                    group_size: None,
                    symmetric: true,
                    dynamic: Value::Bool(dynamic),
                    ..weights.clone()
                })
            }
        };
        (weights, input)
    }
}

fn config_err(file: &Path, key: &str, reason: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: quantization_config.{key}: {reason}", file.display()))
}

fn null_or_empty(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.values().all(Value::is_null) || m.is_empty(),
        Some(_) => false,
    }
}

impl CompressedConfig {
    /// The `quantization_config` of `config.json` at `path`, if it has one; a config whose
    /// `quant_method` is not compressed-tensors is an error (no other quantized format is read).
    pub fn from_config_json(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        let Some(block) = json.get("quantization_config") else {
            return Ok(None);
        };
        let method = block.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != QUANT_METHOD {
            return Err(config_err(
                path,
                "quant_method",
                format!("`{method}` is not read here (only `{QUANT_METHOD}`)"),
            ));
        }
        let cfg: Self = serde_path_to_error(block, path)?;
        cfg.check(path)?;
        Ok(Some(cfg))
    }

    fn check(&self, file: &Path) -> Result<()> {
        if self.quantization_status != "compressed" {
            return Err(config_err(
                file,
                "quantization_status",
                format!(
                    "`{}`: only `compressed` checkpoints hold packed tensors",
                    self.quantization_status
                ),
            ));
        }
        for (key, v) in [
            ("kv_cache_scheme", &self.kv_cache_scheme),
            ("sparsity_config", &self.sparsity_config),
            ("transform_config", &self.transform_config),
            ("moe_sparsity_config", &self.moe_sparsity_config),
        ] {
            if !null_or_empty(v) {
                return Err(config_err(file, key, "is set; this reader supports none"));
            }
        }
        if ![PACK_QUANTIZED, INT_QUANTIZED, MIXED].contains(&self.format.as_str()) {
            return Err(config_err(
                file,
                "format",
                format!(
                    "`{}` is not one of {PACK_QUANTIZED}, {INT_QUANTIZED}, {MIXED}",
                    self.format
                ),
            ));
        }
        for name in self.config_groups.keys() {
            self.group_format(name, file)?;
        }
        Ok(())
    }

    /// The layer format config group `name` stands for, or an error naming what it cannot be.
    pub fn group_format(&self, name: &str, file: &Path) -> Result<LayerFormat> {
        let g = &self.config_groups[name];
        let key = |k: &str| format!("config_groups.{name}.{k}");
        let err = |k: &str, reason: String| config_err(file, &key(k), reason);
        let w =
            g.weights.as_ref().ok_or_else(|| err("weights", "is null: nothing to load".into()))?;
        if g.output_activations.is_some() {
            return Err(err("output_activations", "quantized outputs are not supported".into()));
        }
        let weight = weight_format(w).map_err(|r| err("weights", r))?;
        let input = match &g.input_activations {
            None => InputFormat::Float,
            Some(a) => input_format(a).map_err(|r| err("input_activations", r))?,
        };
        let layer = LayerFormat { weight, input };
        let format = g.format.as_deref().unwrap_or(&self.format);
        if format != layer.format_name() {
            return Err(err(
                "format",
                format!(
                    "`{format}` for these settings; this reader knows them as `{}`",
                    layer.format_name()
                ),
            ));
        }
        if layer.input != InputFormat::Float && (weight.bits != 8 || weight.group.is_some()) {
            return Err(err(
                "weights",
                "int-quantized layers are read with 8-bit per-channel weights only".into(),
            ));
        }
        Ok(layer)
    }

    /// Which config group quantizes the linear whose module names (across transformers'
    /// layouts) are `names`: `None` when no group targets it or `ignore` lists it; two groups
    /// is an error.
    pub fn group_of(&self, names: &[String], file: &Path) -> Result<Option<String>> {
        let hits = |patterns: &[String]| -> Result<bool> {
            for p in patterns {
                for n in names {
                    if target_matches(p, n).map_err(|e| config_err(file, "targets", e))? {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        };
        if hits(&self.ignore)? {
            return Ok(None);
        }
        let mut found: Option<String> = None;
        for (group, scheme) in &self.config_groups {
            if hits(&scheme.targets)? {
                if let Some(first) = &found {
                    return Err(config_err(
                        file,
                        "config_groups",
                        format!("`{}` is targeted by both {first} and {group}", names[0]),
                    ));
                }
                found = Some(group.clone());
            }
        }
        Ok(found)
    }
}

fn serde_path_to_error(block: &Value, path: &Path) -> Result<CompressedConfig> {
    CompressedConfig::deserialize(block)
        .map_err(|e| Error::Invalid(format!("{}: quantization_config: {e}", path.display())))
}

fn weight_format(a: &QuantArgs) -> std::result::Result<WeightFormat, String> {
    common_args(a)?;
    if a.dynamic != Value::Bool(false) {
        return Err(format!("dynamic = {} (weights are static)", a.dynamic));
    }
    if a.num_bits != 4 && a.num_bits != 8 {
        return Err(format!("num_bits = {}: only 4 and 8 are read", a.num_bits));
    }
    let group = match (a.strategy.as_deref(), a.group_size) {
        (Some("channel"), None | Some(-1)) => None,
        (Some("group"), Some(g)) if g > 0 => Some(g),
        (s, g) => {
            return Err(format!(
            "strategy {s:?} with group_size {g:?}: only `channel` and `group` (size > 0) are read"
        ))
        }
    };
    Ok(WeightFormat { bits: a.num_bits, symmetric: a.symmetric, group })
}

fn input_format(a: &QuantArgs) -> std::result::Result<InputFormat, String> {
    common_args(a)?;
    if a.num_bits != 8 || !a.symmetric {
        return Err("only symmetric 8-bit activations are read".into());
    }
    match (a.strategy.as_deref(), &a.dynamic) {
        (Some("token"), Value::Bool(true)) => Ok(InputFormat::DynamicToken),
        (Some("tensor"), Value::Bool(false)) => Ok(InputFormat::StaticTensor),
        (s, d) => Err(format!(
            "strategy {s:?} with dynamic {d}: only dynamic `token` and static `tensor` are read"
        )),
    }
}

fn common_args(a: &QuantArgs) -> std::result::Result<(), String> {
    if a.kind != "int" {
        return Err(format!("type `{}`: only `int` is read", a.kind));
    }
    for (key, v) in [
        ("block_structure", &a.block_structure),
        ("actorder", &a.actorder),
        ("scale_dtype", &a.scale_dtype),
        ("zp_dtype", &a.zp_dtype),
    ] {
        if !matches!(v, None | Some(Value::Null) | Some(Value::Bool(false))) {
            return Err(format!("{key} = {} is not supported", v.as_ref().unwrap_or(&Value::Null)));
        }
    }
    Ok(())
}

/// compressed-tensors' `match_name` + `_match_class` for a `Linear`: `"Linear"` (the class) and
/// `"re:<pattern>"` (Python's `re.match`: anchored at the start only) and exact names.
pub fn target_matches(target: &str, name: &str) -> std::result::Result<bool, String> {
    if target == "Linear" {
        return Ok(true);
    }
    match target.strip_prefix("re:") {
        Some(pattern) => {
            let re = regex::Regex::new(&format!("^(?:{pattern})"))
                .map_err(|e| format!("pattern `{pattern}`: {e}"))?;
            Ok(re.is_match(name))
        }
        None => Ok(target == name),
    }
}

/// The module names a linear has had in transformers' LLaVA (`canonical` is this crate's name,
/// e.g. `language_model.layers.3.self_attn.q_proj`, `lm_head`): the 5.x runtime names
/// (`model.<canonical>`, `lm_head`) and the stored keys of every llava-hf layout (4.x, ≥ 4.52,
/// 5.x files), which are the module names of the versions that wrote them.
pub fn module_names(canonical: &str) -> Vec<String> {
    let mut names = vec![if canonical == "lm_head" {
        canonical.to_string()
    } else {
        format!("model.{canonical}")
    }];
    for naming in [Naming::HfFlatVision, Naming::HfModelPrefixed, Naming::HfLegacy] {
        let key = naming.stored_key(&format!("{canonical}.weight")).1;
        let name = key.trim_end_matches(".weight").to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// A regex target that matches exactly the linear `canonical` in every layout of
/// [`module_names`] (what the exporter writes in `targets` and `ignore`).
pub fn exact_target(canonical: &str) -> String {
    let alternatives: Vec<String> =
        module_names(canonical).iter().map(|n| regex::escape(n)).collect();
    format!("re:^(?:{})$", alternatives.join("|"))
}

/// Values of `bits` each (`bits` ∈ {4, 8}), `[rows, cols]` in `0..2^bits`, packed into i32 words
/// along dim 1, the lowest bits holding the lowest index (compressed-tensors' `pack_to_int32`
/// with `packed_dim = 1`).
pub fn pack_rows(values: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<i32> {
    let per = 32 / bits as usize;
    let words = cols.div_ceil(per);
    let mut out = vec![0i32; rows * words];
    for r in 0..rows {
        for c in 0..cols {
            let v = values[r * cols + c] as u32;
            let w = &mut out[r * words + c / per];
            *w = (*w as u32 | (v << (bits as usize * (c % per)))) as i32;
        }
    }
    out
}

/// Inverse of [`pack_rows`]: `[rows, ⌈cols·bits/32⌉]` words → `[rows, cols]` values.
pub fn unpack_rows(words: &[i32], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let per = 32 / bits as usize;
    let per_row = cols.div_ceil(per);
    let mask = (1u32 << bits) - 1;
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let w = words[r * per_row + c / per] as u32;
            out[r * cols + c] = ((w >> (bits as usize * (c % per))) & mask) as u8;
        }
    }
    out
}

/// [`pack_rows`] along dim 0 (`packed_dim = 0`, how zero points are stored): `[rows, cols]` →
/// `[⌈rows·bits/32⌉, cols]`.
pub fn pack_cols(values: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<i32> {
    let t = transpose(values, rows, cols);
    let packed = pack_rows(&t, cols, rows, bits);
    transpose(&packed, cols, rows.div_ceil(32 / bits as usize))
}

/// Inverse of [`pack_cols`].
pub fn unpack_cols(words: &[i32], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let packed_rows = rows.div_ceil(32 / bits as usize);
    let t = transpose(words, packed_rows, cols);
    transpose(&unpack_rows(&t, cols, rows, bits), cols, rows)
}

fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// Reads one linear's compressed-tensors tensors (by suffix: `weight_packed`, `weight_scale`, …)
/// and packs them for this crate's kernels; `read` returns a stored tensor in its stored dtype
/// (and marks it used), `None` when absent. Every dtype and shape is checked.
pub fn read_layer(
    format: LayerFormat,
    out: i64,
    inp: i64,
    read: &mut dyn FnMut(&str) -> Result<Option<Tensor>>,
    kind: Kind,
    device: Device,
    layer: &str,
    file: &Path,
) -> Result<PackedWeight> {
    let bad = |reason: String| Error::Quant { layer: layer.to_string(), reason };
    let mut need = |suffix: &str, kinds: &[Kind], shape: &[i64]| -> Result<Tensor> {
        let t = read(suffix)?.ok_or_else(|| Error::MissingTensor {
            name: format!("{layer}.{suffix}"),
            file: file.to_path_buf(),
            expected: shape.to_vec(),
        })?;
        if t.size() != shape {
            return Err(Error::ShapeMismatch {
                name: format!("{layer}.{suffix}"),
                file: file.to_path_buf(),
                expected: shape.to_vec(),
                found: t.size(),
            });
        }
        if !kinds.contains(&t.kind()) {
            return Err(bad(format!("`{suffix}` is {:?}, expected one of {kinds:?}", t.kind())));
        }
        Ok(t.to_device(Device::Cpu))
    };
    let w = format.weight;
    let bits = w.bits;
    let group = w.group.unwrap_or(inp);
    if group <= 0 || inp % group != 0 {
        return Err(bad(format!("group {group} does not divide the {inp} inputs")));
    }
    let groups = inp / group;
    let floats = [Kind::Float, Kind::BFloat16, Kind::Half];
    let (rows, cols) = (out as usize, inp as usize);
    let offset = 1i64 << (bits - 1);
    let codes: Vec<u8> = match format.input {
        InputFormat::Float => {
            let per = 32 / bits as i64;
            let packed = need("weight_packed", &[Kind::Int], &[out, (inp + per - 1) / per])?;
            let shape = need("weight_shape", &[Kind::Int64, Kind::Int], &[2])?;
            let shape = Vec::<i64>::try_from(&shape.to_kind(Kind::Int64))?;
            if shape != [out, inp] {
                return Err(bad(format!("weight_shape is {shape:?}, the layer is [{out}, {inp}]")));
            }
            let words = Vec::<i32>::try_from(&packed.reshape([-1]))?;
            unpack_rows(&words, rows, cols, bits)
        }
        InputFormat::DynamicToken | InputFormat::StaticTensor => {
            let q = need("weight", &[Kind::Int8], &[out, inp])?;
            let q = Vec::<i8>::try_from(&q.reshape([-1]))?;
            q.iter().map(|&v| (v as i16 + offset as i16) as u8).collect()
        }
    };
    let scale = need("weight_scale", &floats, &[out, groups])?.to_kind(Kind::Float);
    let grid = Grid { bits, symmetric: w.symmetric };
    let zero_point = if w.symmetric {
        if read("weight_zero_point")?.is_some() {
            return Err(bad("a symmetric layer stores `weight_zero_point`".into()));
        }
        Tensor::zeros([out, groups], (Kind::Float, Device::Cpu))
    } else {
        if format.input != InputFormat::Float {
            return Err(bad("asymmetric int-quantized weights are not read".into()));
        }
        let per = 32 / bits as i64;
        let z = need("weight_zero_point", &[Kind::Int], &[(out + per - 1) / per, groups])?;
        let words = Vec::<i32>::try_from(&z.reshape([-1]))?;
        let zp = unpack_cols(&words, rows, groups as usize, bits);
        Tensor::from_slice(&zp).reshape([out, groups]).to_kind(Kind::Float)
    };
    let act = match format.input {
        InputFormat::Float => ActMode::Float,
        InputFormat::DynamicToken => ActMode::Int8PerToken,
        // One number in the model dtype (`[1]`, as the library writes the `tensor` strategy;
        // `[]` as some older writers do, which vLLM also reads); checked positive and finite
        // when the weight is packed.
        InputFormat::StaticTensor => {
            let t = read("input_scale")?.ok_or_else(|| Error::MissingTensor {
                name: format!("{layer}.input_scale"),
                file: file.to_path_buf(),
                expected: vec![1],
            })?;
            if t.numel() != 1 || t.dim() > 1 || !floats.contains(&t.kind()) {
                return Err(bad(format!(
                    "`input_scale` is {:?} {:?}, expected one float ([1] or [])",
                    t.kind(),
                    t.size()
                )));
            }
            // A symmetric grid's zero point, where a writer stores it, must be 0.
            if let Some(z) = read("input_zero_point")? {
                if z.numel() != 1 || z.to_kind(Kind::Float).abs().double_value(&[]) != 0.0 {
                    return Err(bad(format!(
                        "`input_zero_point` {:?} is not 0 on symmetric activations",
                        z.size()
                    )));
                }
            }
            ActMode::Int8PerTensor {
                scale: t.to_kind(Kind::Float).reshape([1]).double_value(&[0]) as f32,
            }
        }
    };
    let codes = Tensor::from_slice(&codes).reshape([out, inp]);
    let q = QuantizedWeight::Uniform { grid, group, codes, scale, zero_point };
    PackedWeight::from_quantized(&q, act, kind, device, layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// compressed-tensors 0.20.1 `pack_to_int32` on these values (run by hand, int4 and int8).
    #[test]
    fn packing_matches_the_library_words() {
        // int4 [-8, -7, -1, 0, 1, 2, 6, 7, 3] stored + 8.
        let q4: Vec<u8> = [-8i32, -7, -1, 0, 1, 2, 6, 7, 3].iter().map(|v| (v + 8) as u8).collect();
        let w = pack_rows(&q4, 1, 9, 4);
        assert_eq!(w, vec![0xfea98710u32 as i32, 0x0000000b]);
        assert_eq!(unpack_rows(&w, 1, 9, 4), q4);
        // int8 [-128, -1, 0, 127, 5] stored + 128.
        let q8: Vec<u8> = [-128i32, -1, 0, 127, 5].iter().map(|v| (v + 128) as u8).collect();
        let w = pack_rows(&q8, 1, 5, 8);
        assert_eq!(w, vec![0xff807f00u32 as i32, 0x00000085]);
        assert_eq!(unpack_rows(&w, 1, 5, 8), q8);
    }

    #[test]
    fn column_packing_is_row_packing_of_the_transpose() {
        let v: Vec<u8> = (0..9 * 3).map(|i| (i * 7 % 16) as u8).collect();
        let w = pack_cols(&v, 9, 3, 4);
        assert_eq!(w.len(), 2 * 3);
        // Column 0 holds rows 0..8 in word 0, row 8 in word 1 (lowest bits first).
        let col0: Vec<u8> = (0..9).map(|r| v[r * 3]).collect();
        assert_eq!(w[0], pack_rows(&col0[..8], 1, 8, 4)[0]);
        assert_eq!(w[3], col0[8] as i32);
        assert_eq!(unpack_cols(&w, 9, 3, 4), v);
    }

    #[test]
    fn targets_follow_python_re_match_and_exact_names() {
        let names = module_names("language_model.layers.3.self_attn.q_proj");
        assert!(names.contains(&"model.language_model.layers.3.self_attn.q_proj".to_string()));
        assert!(names.contains(&"language_model.model.layers.3.self_attn.q_proj".to_string()));
        let exact = exact_target("language_model.layers.3.self_attn.q_proj");
        assert!(names.iter().all(|n| target_matches(&exact, n) == Ok(true)));
        let other = module_names("language_model.layers.13.self_attn.q_proj");
        assert!(other.iter().all(|n| target_matches(&exact, n) == Ok(false)));
        // re.match anchors at the start only.
        assert_eq!(target_matches("re:.*vision_tower", "model.vision_tower.encoder.x"), Ok(true));
        assert_eq!(target_matches("re:vision_tower", "model.vision_tower"), Ok(false));
        assert_eq!(target_matches("lm_head", "lm_head"), Ok(true));
        assert_eq!(target_matches("Linear", "anything"), Ok(true));
        assert!(target_matches("re:(", "x").is_err());
        let vision = module_names("vision_tower.encoder.layers.0.mlp.fc1");
        assert!(vision.contains(&"vision_tower.vision_model.encoder.layers.0.mlp.fc1".to_string()));
        assert_eq!(module_names("lm_head")[0], "lm_head");
    }
}
