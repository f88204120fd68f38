//! What a checkpoint directory holds, as a short hash: a finished cell records the fingerprint of
//! the model it ran on, and every later use of it — a run that would skip it, the tables and
//! report, a Slurm submission — first checks the model is still the same.
//!
//! A cell's id hashes its settings, the model's *path* among them, not the weights: without this
//! check a model retrained or replaced at the same path (`experiments train-tiny --force`, a
//! re-downloaded checkpoint) would have its old cells skipped as done, and the tables would mix
//! results of two models under one name without a word.
//!
//! The hash covers the regular files directly in the directory, sorted by name — what the loader
//! may read; left out are hidden files, this project's lock and staging files, and its side files
//! that are not the model (`training.json`, the `transformers_reference.*` parity fixtures,
//! `*.md`): regenerating those does not change the model. Per file: its name, its size and its
//! content — whole up to [`WHOLE_FILE_LIMIT`], else three windows of [`WINDOW`] bytes at its
//! start, middle and end, so that a 7B checkpoint is read in a few MiB, not 13 GB. A full
//! retraining changes the bytes everywhere; a change confined to tensors that lie outside the
//! three windows of a large file (a projector-only or partial fine-tune saved in place) is not
//! seen. A model entry's separate CLIP folder (`clip = …`) is fingerprinted with it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::config::ModelEntry;

/// Files up to this size are hashed whole.
pub const WHOLE_FILE_LIMIT: u64 = 64 << 20;
/// The window hashed at a larger file's start, middle and end.
pub const WINDOW: u64 = 1 << 20;

/// The fingerprint of the checkpoint directory `dir` (16 hex digits).
pub fn checkpoint_fingerprint(dir: &Path) -> Result<String> {
    fingerprint_with(dir, WHOLE_FILE_LIMIT, WINDOW)
}

/// The fingerprint of a model entry: its directory, and its CLIP folder when it names one.
pub fn model_fingerprint(model: &ModelEntry) -> Result<String> {
    let main = checkpoint_fingerprint(&model.path)
        .with_context(|| format!("model `{}` (fingerprint)", model.name))?;
    match &model.clip {
        None => Ok(main),
        Some(clip) => {
            let clip = checkpoint_fingerprint(clip).with_context(|| {
                format!("model `{}`: its clip folder (fingerprint)", model.name)
            })?;
            let h = Sha256::digest(format!("{main}+{clip}").as_bytes());
            Ok(h.iter().take(8).map(|b| format!("{b:02x}")).collect())
        }
    }
}

/// Model fingerprints by model entry, each taken once per use.
#[derive(Default)]
pub struct Fingerprints {
    cache: BTreeMap<(PathBuf, Option<PathBuf>), String>,
}

impl Fingerprints {
    pub fn of(&mut self, model: &ModelEntry) -> Result<String> {
        let key = (model.path.clone(), model.clip.clone());
        if let Some(f) = self.cache.get(&key) {
            return Ok(f.clone());
        }
        let f = model_fingerprint(model)?;
        self.cache.insert(key, f.clone());
        Ok(f)
    }
}

/// This project's files in a model folder that are not the model.
fn is_side_file(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with(".lock")
        || name.contains(".tmp-")
        || name == "training.json"
        || name.starts_with("transformers_reference.")
        || name.ends_with(".md")
}

fn fingerprint_with(dir: &Path, whole_limit: u64, window: u64) -> Result<String> {
    debug_assert!(window <= whole_limit, "a window larger than a whole file");
    let mut names: Vec<OsString> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        if is_side_file(&name.to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        if path.is_file() {
            names.push(name);
        } else if path.is_symlink() {
            bail!("{}: a link to nothing (a checkpoint file missing?)", path.display());
        }
    }
    names.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; window.max(1) as usize];
    for name in &names {
        let path = dir.join(name);
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("reading {} (model fingerprint)", path.display()))?;
        let size = f.metadata().with_context(|| format!("reading {}", path.display()))?.len();
        let shown = name.to_string_lossy();
        h.update((shown.len() as u64).to_le_bytes());
        h.update(shown.as_bytes());
        h.update(size.to_le_bytes());
        let windows: Vec<(u64, u64)> = if size <= whole_limit {
            vec![(0, size)]
        } else {
            vec![(0, window), (size / 2 - window / 2, window), (size - window, window)]
        };
        for (start, len) in windows {
            f.seek(SeekFrom::Start(start))
                .with_context(|| format!("reading {}", path.display()))?;
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                f.read_exact(&mut buf[..n])
                    .with_context(|| format!("reading {} (model fingerprint)", path.display()))?;
                h.update(&buf[..n]);
                left -= n as u64;
            }
        }
    }
    Ok(h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_changed_byte_name_or_size_changes_it_and_nothing_else_does() {
        let dir = std::env::temp_dir().join(format!("qvlm-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("config.json"), b"{\"a\": 1}").expect("write");
        std::fs::write(dir.join("model.safetensors"), &big).expect("write");
        // Windows of 100 bytes for files over 1,000: start, middle (4950..5050) and end.
        let fp = |d: &Path| fingerprint_with(d, 1000, 100).expect("fingerprint");
        let base = fp(&dir);
        assert_eq!(base.len(), 16);
        assert_eq!(fp(&dir), base, "deterministic");
        // Lock and staging files, hidden files, side files and subfolders are not the model.
        std::fs::write(dir.join("model.lock"), b"x").expect("write");
        std::fs::write(dir.join(".hidden"), b"x").expect("write");
        std::fs::write(dir.join("training.json"), b"{}").expect("write");
        std::fs::write(dir.join("transformers_reference.safetensors"), b"x").expect("write");
        std::fs::create_dir_all(dir.join("sub")).expect("dir");
        assert_eq!(fp(&dir), base);
        let changed = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut b = big.clone();
            edit(&mut b);
            std::fs::write(dir.join("model.safetensors"), &b).expect("write");
            let f = fp(&dir);
            std::fs::write(dir.join("model.safetensors"), &big).expect("restore");
            f
        };
        for (what, at) in [("start", 3usize), ("middle", 5000), ("end", 9_990)] {
            assert_ne!(changed(&|b| b[at] ^= 1), base, "a byte at the {what}");
        }
        assert_ne!(changed(&|b| b.push(0)), base, "the size");
        // Outside the windows of a large file: not read (the documented trade).
        assert_eq!(changed(&|b| b[2000] ^= 1), base);
        std::fs::write(dir.join("config.json"), b"{\"a\": 2}").expect("write");
        assert_ne!(fp(&dir), base, "a small file whole");
        std::fs::write(dir.join("config.json"), b"{\"a\": 1}").expect("write");
        std::fs::rename(dir.join("config.json"), dir.join("config2.json")).expect("rename");
        assert_ne!(fp(&dir), base, "a name");
        std::os::unix::fs::symlink(dir.join("gone"), dir.join("weights.safetensors"))
            .expect("link");
        let err = fingerprint_with(&dir, 1000, 100).expect_err("broken link").to_string();
        assert!(err.contains("weights.safetensors"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
