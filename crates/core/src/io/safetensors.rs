//! A lazy, strict reader of safetensors files: the header is parsed and validated up front (so a
//! truncated or garbage file fails before any tensor is used), tensors are read one at a time.
//!
//! Format: 8-byte little-endian header length N, N bytes of JSON
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`, then the data.
//! <https://github.com/huggingface/safetensors/blob/v0.4.5/README.md#format>

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Header entries larger than this are certainly not a safetensors header.
const MAX_HEADER_BYTES: u64 = 100 << 20;

#[derive(Debug, Clone, Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: [u64; 2],
}

/// One tensor's place in a file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: String,
    pub shape: Vec<i64>,
    begin: u64,
    end: u64,
}

/// A safetensors file whose header has been read and checked.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    data_start: u64,
    entries: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

fn dtype_kind(dtype: &str) -> Option<(Kind, u64)> {
    Some(match dtype {
        "F32" => (Kind::Float, 4),
        "F16" => (Kind::Half, 2),
        "BF16" => (Kind::BFloat16, 2),
        "F64" => (Kind::Double, 8),
        "I64" => (Kind::Int64, 8),
        "I32" => (Kind::Int, 4),
        "I16" => (Kind::Int16, 2),
        "I8" => (Kind::Int8, 1),
        "U8" => (Kind::Uint8, 1),
        "BOOL" => (Kind::Bool, 1),
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Opens `path` and validates its header against the file's size.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Safetensors { file: path.to_path_buf(), reason };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < 8 {
            return Err(bad(format!(
                "file is {file_len} bytes, shorter than the 8-byte header length"
            )));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(|e| Error::io(path, e))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
            return Err(bad(format!(
                "header length {header_len} does not fit in a {file_len}-byte file (truncated or not safetensors)"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, value) in raw {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value)
                    .map_err(|e| bad(format!("`__metadata__` is not a string map: {e}")))?;
                continue;
            }
            let entry: RawEntry = serde_json::from_value(value)
                .map_err(|e| bad(format!("entry `{name}` is malformed: {e}")))?;
            let [begin, end] = entry.data_offsets;
            if begin > end || end > data_len {
                return Err(bad(format!(
                    "tensor `{name}` spans bytes {begin}..{end} but the data section holds {data_len} (truncated?)"
                )));
            }
            if entry.shape.iter().any(|&d| d < 0) {
                return Err(bad(format!(
                    "tensor `{name}` has a negative dimension {:?}",
                    entry.shape
                )));
            }
            if let Some((_, width)) = dtype_kind(&entry.dtype) {
                let numel: u64 = entry.shape.iter().map(|&d| d as u64).product();
                if numel * width != end - begin {
                    return Err(bad(format!(
                        "tensor `{name}` of dtype {} and shape {:?} needs {} bytes, the header gives {}",
                        entry.dtype,
                        entry.shape,
                        numel * width,
                        end - begin
                    )));
                }
            }
            entries
                .insert(name, TensorEntry { dtype: entry.dtype, shape: entry.shape, begin, end });
        }
        Ok(Self { path: path.to_path_buf(), data_start, entries, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }

    /// The free-form `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads one tensor into CPU memory with its stored dtype.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.path.clone(),
            expected: vec![],
        })?;
        let (kind, _) = dtype_kind(&entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
            name: name.to_string(),
            file: self.path.clone(),
            dtype: entry.dtype.clone(),
        })?;
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        file.seek(SeekFrom::Start(self.data_start + entry.begin))
            .map_err(|e| Error::io(&self.path, e))?;
        let mut bytes = vec![0u8; (entry.end - entry.begin) as usize];
        file.read_exact(&mut bytes).map_err(|e| Error::io(&self.path, e))?;
        Ok(Tensor::f_from_data_size(&bytes, &entry.shape, kind)?)
    }
}

/// Writes named tensors (any device, contiguous or not) with a `__metadata__` map.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
        let dtype = match tensor.kind() {
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Double => Dtype::F64,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Int16 => Dtype::I16,
            Kind::Int8 => Dtype::I8,
            Kind::Uint8 => Dtype::U8,
            Kind::Bool => Dtype::BOOL,
            other => {
                return Err(Error::Safetensors {
                    file: path.to_path_buf(),
                    reason: format!("cannot write tensor `{name}` of kind {other:?}"),
                })
            }
        };
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, numel)?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Safetensors { file: path.to_path_buf(), reason: e.to_string() })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: std::collections::HashMap<String, String> =
        metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let tmp = path.with_extension("safetensors.tmp");
    serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| Error::Safetensors { file: tmp.clone(), reason: e.to_string() })?;
    // safetensors writes through a NamedTempFile, created 0600: give the file the permissions
    // of any other file written here (checkpoints are shared with other users and tools).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
