//! Quantized checkpoints: every packed linear's storage (codes, scales, zero points or NF4
//! absmax) and every other model tensor in one safetensors file, with a manifest naming each
//! layer's scheme by its [`LayerId`]; reloading puts them back into the one model definition
//! (built from the float checkpoint's config), strictly: missing, extra and misshapen tensors are
//! errors.
//!
//! Files in the directory:
//! - `quantized.safetensors`: packed parts as `quantized.<layer id>.<part>` (e.g.
//!   `quantized.language.3.q_proj.codes`), other tensors under their canonical names
//!   (`language_model.embed_tokens.weight`, `…q_proj.bias`), in the model's dtype; the manifest
//!   as JSON in `__metadata__["qvlm.quantization"]` (the copy reloading reads);
//! - `quantization.json`: the same manifest, pretty-printed for people and reports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Error, Result};
use crate::io::config::LlavaConfig;
use crate::io::safetensors::{write_safetensors, SafetensorsFile};
use crate::layer_id::{LayerId, Slot, Tower};
use crate::model::linear::LinearWeight;
use crate::model::llava::{Llava, LoadOptions};
use crate::quant::packed::{Kernel, PackedSpec, PackedWeight};

/// The tensor file of a quantized checkpoint directory.
pub const TENSORS_FILE: &str = "quantized.safetensors";
/// The pretty-printed manifest next to it.
pub const MANIFEST_FILE: &str = "quantization.json";
/// The `__metadata__` key that holds the manifest.
pub const METADATA_KEY: &str = "qvlm.quantization";
/// Manifest format name and version (bumped when the layout changes). Version 2 (2026-12-03)
/// adds the static activation mode `{"int8_per_tensor": {"scale": …}}`; version 1 files read
/// unchanged.
pub const FORMAT: &str = "qvlm-packed";
pub const VERSION: u32 = 2;
/// The oldest version this reader reads.
pub const OLDEST_VERSION: u32 = 1;

const PACKED_PREFIX: &str = "quantized";

/// One packed layer as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub spec: PackedSpec,
    pub out_features: i64,
    pub in_features: i64,
    /// Exact storage bytes (the layer's parts).
    pub bytes: i64,
    /// The path the layer took when it was saved (reloading picks again for its device).
    pub kernel: Kernel,
}

/// Exact tensor bytes by part of the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteReport {
    /// Each tower's quantizable linears (see `Llava::linears`): packed storage or float weight,
    /// plus biases.
    pub vision: i64,
    pub projector: i64,
    pub language: i64,
    /// Everything else: embeddings, norms and vision layers past the feature layer (which never
    /// run) in the model's dtype, and `lm_head` as held (packed where it is).
    pub float_remainder: i64,
}

impl ByteReport {
    pub fn total(&self) -> i64 {
        self.vision + self.projector + self.language + self.float_remainder
    }

    fn tower_mut(&mut self, tower: Tower) -> &mut i64 {
        match tower {
            Tower::Vision => &mut self.vision,
            Tower::Projector => &mut self.projector,
            Tower::Language => &mut self.language,
        }
    }
}

/// What a quantized checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantManifest {
    pub format: String,
    pub version: u32,
    /// The model the checkpoint belongs to; reloading checks it.
    pub config: LlavaConfig,
    /// Packed layers by layer id (`language.3.q_proj`).
    pub layers: BTreeMap<String, LayerEntry>,
    /// Canonical names of the tensors kept in float.
    pub float_tensors: Vec<String>,
    pub bytes: ByteReport,
}

fn packed_name(id: &str, part: &str) -> String {
    format!("{PACKED_PREFIX}.{id}.{part}")
}

fn nbytes(t: &Tensor) -> i64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as i64
}

/// Writes `model` (packed and float layers alike) to `dir`; returns the manifest written.
pub fn save_quantized(model: &Llava, dir: &Path) -> Result<QuantManifest> {
    crate::model::rotation::refuse_rotated(model, "qvlm-packed export")?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let _guard = tch::no_grad_guard();
    let mut bytes = ByteReport::default();
    let mut layers = BTreeMap::new();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    // Names covered by the quantizable linears: packed weights are replaced by their parts.
    let mut linear_names: BTreeMap<String, Tower> = BTreeMap::new();
    let mut packed_weights: BTreeSet<String> = BTreeSet::new();
    for linear in model.linears_and_head() {
        let prefix = &linear.path;
        // lm_head is not a tower's quantizable linear: its bytes count in the remainder.
        if linear.id.slot != Slot::LmHead {
            linear_names.insert(format!("{prefix}.weight"), linear.id.tower);
            linear_names.insert(format!("{prefix}.bias"), linear.id.tower);
        }
        if let LinearWeight::Packed(p) = &linear.weight {
            let id = linear.id.to_string();
            for (part, t) in p.parts() {
                tensors.push((packed_name(&id, part), t));
            }
            let [out_features, in_features] = p.shape();
            let entry = LayerEntry {
                spec: p.spec(),
                out_features,
                in_features,
                bytes: p.bytes(),
                kernel: p.kernel(),
            };
            match linear.id.slot {
                Slot::LmHead => bytes.float_remainder += entry.bytes,
                _ => *bytes.tower_mut(linear.id.tower) += entry.bytes,
            }
            layers.insert(id, entry);
            packed_weights.insert(format!("{prefix}.weight"));
        }
    }
    // (`named_tensors` dequantizes packed weights too; those copies are dropped unused.)
    let named = model.named_tensors();
    let names: BTreeSet<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(missing) = packed_weights.iter().find(|n| !names.contains(n.as_str())) {
        return Err(Error::Invalid(format!(
            "packed layer weight `{missing}` is not a model tensor"
        )));
    }
    let mut float_tensors = Vec::new();
    for (name, t) in named {
        if packed_weights.contains(&name) {
            continue;
        }
        let t = t.detach();
        match linear_names.get(&name) {
            Some(&tower) => *bytes.tower_mut(tower) += nbytes(&t),
            None => bytes.float_remainder += nbytes(&t),
        }
        float_tensors.push(name.clone());
        tensors.push((name, t));
    }
    float_tensors.sort();
    let manifest = QuantManifest {
        format: FORMAT.to_string(),
        version: VERSION,
        config: model.cfg.clone(),
        layers,
        float_tensors,
        bytes,
    };
    let json = serde_json::to_string(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (METADATA_KEY.to_string(), json),
    ]);
    write_safetensors(&dir.join(TENSORS_FILE), &tensors, &meta)?;
    let pretty =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    let path = dir.join(MANIFEST_FILE);
    std::fs::write(&path, pretty + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(manifest)
}

/// Reads the manifest of the quantized checkpoint in `dir` (from the tensor file's metadata).
pub fn read_manifest(dir: &Path) -> Result<(SafetensorsFile, QuantManifest)> {
    let path = dir.join(TENSORS_FILE);
    let file = SafetensorsFile::open(&path)?;
    let bad = |reason: String| Error::Safetensors { file: path.clone(), reason };
    let json = file
        .metadata()
        .get(METADATA_KEY)
        .ok_or_else(|| bad(format!("no `{METADATA_KEY}` metadata: not a quantized checkpoint")))?;
    let manifest: QuantManifest = serde_json::from_str(json)
        .map_err(|e| bad(format!("`{METADATA_KEY}` metadata is not a manifest: {e}")))?;
    if manifest.format != FORMAT || !(OLDEST_VERSION..=VERSION).contains(&manifest.version) {
        return Err(bad(format!(
            "manifest is {} v{}, this reader knows {FORMAT} v{OLDEST_VERSION} to v{VERSION}",
            manifest.format, manifest.version
        )));
    }
    Ok((file, manifest))
}

/// Replaces `model`'s weights by those of the quantized checkpoint in `dir`: packed layers become
/// [`LinearWeight::Packed`] on the model's device (kernels chosen for it), every other tensor is
/// overwritten in place. `model` must have the checkpoint's config.
pub fn apply_quantized(model: &mut Llava, dir: &Path) -> Result<QuantManifest> {
    let (file, manifest) = read_manifest(dir)?;
    let path = file.path().to_path_buf();
    if manifest.config != model.cfg {
        return Err(Error::Invalid(format!(
            "{}: the quantized checkpoint was made from a model with another config",
            path.display()
        )));
    }
    let _guard = tch::no_grad_guard();
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut packed: BTreeMap<LayerId, &LayerEntry> = BTreeMap::new();
    for (id, entry) in &manifest.layers {
        packed.insert(id.parse::<LayerId>()?, entry);
    }
    let mut packed_weights: BTreeSet<String> = BTreeSet::new();
    for id in packed.keys() {
        let linear =
            model.linears_and_head().into_iter().find(|l| l.id == *id).ok_or_else(|| {
                Error::Quant {
                    layer: id.to_string(),
                    reason: format!("{}: the model has no such linear", path.display()),
                }
            })?;
        packed_weights.insert(format!("{}.weight", linear.path));
    }

    // Float tensors: overwrite the model's in place (the named tensors share its storage).
    for (name, mut t) in model.named_tensors() {
        if packed_weights.contains(&name) {
            continue;
        }
        let entry = file.entry(&name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            file: path.clone(),
            expected: t.size(),
        })?;
        if entry.shape != t.size() {
            return Err(Error::ShapeMismatch {
                name,
                file: path.clone(),
                expected: t.size(),
                found: entry.shape.clone(),
            });
        }
        let stored = file.read(&name)?;
        t.f_copy_(&stored.to_device(t.device()).to_kind(t.kind()))?;
        used.insert(name);
    }

    // Packed layers.
    let device = model.device();
    let mut linears = model.linears_and_head_mut();
    for (id, entry) in &packed {
        let layer = id.to_string();
        let linear = linears.iter_mut().find(|l| l.id == *id).ok_or_else(|| Error::Quant {
            layer: layer.clone(),
            reason: "the model has no such linear".into(),
        })?;
        if [linear.out_features, linear.in_features] != [entry.out_features, entry.in_features] {
            return Err(Error::ShapeMismatch {
                name: layer,
                file: path.clone(),
                expected: vec![linear.out_features, linear.in_features],
                found: vec![entry.out_features, entry.in_features],
            });
        }
        let mut read = |part: &str| -> Result<Tensor> {
            let name = packed_name(&layer, part);
            let t = file.read(&name)?;
            used.insert(name);
            Ok(t)
        };
        let p = PackedWeight::from_parts(
            entry.spec,
            entry.out_features,
            entry.in_features,
            &mut read,
            linear.kind(),
            device,
            &layer,
        )?;
        if p.bytes() != entry.bytes {
            return Err(Error::Quant {
                layer,
                reason: format!("{} bytes stored, the manifest says {}", p.bytes(), entry.bytes),
            });
        }
        linear.weight = LinearWeight::Packed(p);
    }

    let unused: Vec<&str> = file.names().filter(|n| !used.contains(*n)).collect();
    if !unused.is_empty() {
        return Err(Error::UnusedTensors {
            file: path,
            count: unused.len(),
            names: unused.iter().take(20).copied().collect::<Vec<_>>().join(", "),
        });
    }
    Ok(manifest)
}

/// Loads the float checkpoint `float_dir` (for its config and model definition), then the
/// quantized checkpoint in `quant_dir` over it.
pub fn load_quantized(
    float_dir: &Path,
    quant_dir: &Path,
    opts: &LoadOptions,
) -> Result<(Llava, QuantManifest)> {
    let mut model = Llava::load(float_dir, opts)?;
    let manifest = apply_quantized(&mut model, quant_dir)?;
    Ok((model, manifest))
}
