//! A checkpoint's safetensors shards: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` lists, with the shard that holds each stored key. Keys are
//! unique across shards and every key the index names must be in the shard it says.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsFile;

/// A set of safetensors shards, with the shard that holds each stored key.
#[derive(Debug)]
pub struct ShardSet {
    files: Vec<SafetensorsFile>,
    owner: BTreeMap<String, usize>,
}

impl ShardSet {
    /// Loads `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(Error::io(
            single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json in the checkpoint directory \
                 (PyTorch .bin checkpoints: convert with python/convert_bin_to_safetensors.py)",
            ),
        ))
    }

    fn open_index(index: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let parsed: Index = serde_json::from_str(&text)
            .map_err(|cause| Error::Json { path: index.to_path_buf(), cause })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let shard_names: BTreeSet<&String> = parsed.weight_map.values().collect();
        let mut paths = Vec::new();
        for name in shard_names {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(Error::config(
                    index,
                    "weight_map",
                    format!("names shard `{name}`, which does not exist in {}", dir.display()),
                ));
            }
            paths.push(path);
        }
        let set = Self::open_files(&paths)?;
        for (key, shard) in &parsed.weight_map {
            let expected = dir.join(shard);
            match set.owner.get(key) {
                Some(&i) if set.files[i].path() == expected => {}
                _ => {
                    return Err(Error::config(
                        index,
                        "weight_map",
                        format!("says `{key}` is in `{shard}`, but that shard does not hold it"),
                    ))
                }
            }
        }
        Ok(set)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut owner = BTreeMap::new();
        for path in paths {
            let file = SafetensorsFile::open(path)?;
            for name in file.names() {
                if let Some(&prev) = owner.get(name) {
                    let prev: &SafetensorsFile = &files[prev];
                    return Err(Error::Safetensors {
                        file: path.clone(),
                        reason: format!("tensor `{name}` is also in {}", prev.path().display()),
                    });
                }
                owner.insert(name.to_string(), files.len());
            }
            files.push(file);
        }
        Ok(Self { files, owner })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.owner.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.owner.keys().map(String::as_str)
    }

    /// The file that holds `key`, or the first file (for error messages).
    pub fn file_of(&self, key: &str) -> PathBuf {
        let i = self.owner.get(key).copied().unwrap_or(0);
        self.files.get(i).map(|f| f.path().to_path_buf()).unwrap_or_default()
    }

    pub fn shape(&self, key: &str) -> Option<Vec<i64>> {
        let i = *self.owner.get(key)?;
        self.files[i].entry(key).map(|e| e.shape.clone())
    }

    pub fn read(&self, key: &str) -> Result<Tensor> {
        let i = self.owner.get(key).copied().unwrap_or(0);
        self.files[i].read(key)
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }
}
