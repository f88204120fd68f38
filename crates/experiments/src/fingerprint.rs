//! What a checkpoint directory holds, as a short hash: a finished cell records the fingerprint of
//! the model it ran on, and a later run that would skip it checks the model is still the same.
//!
//! A cell's id hashes its settings, the model's *path* among them, not the weights: without this
//! check a model retrained or replaced at the same path (`experiments train-tiny --force`, a
//! re-downloaded checkpoint) would have its old cells skipped as done, and the tables would mix
//! results of two models under one name without a word.
//!
//! The hash covers every regular file directly in the directory (sorted by name; hidden files
//! and this project's lock/staging files left out): its name, its size and its content — whole up
//! to [`WHOLE_FILE_LIMIT`], else three windows of [`WINDOW`] bytes at its start, middle and end
//! (any retraining changes the bytes everywhere; a 7B checkpoint is read in a few MiB, not
//! 13 GB). Files outside the directory (an original LLaVA's separate CLIP folder) are not
//! covered.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Files up to this size are hashed whole.
pub const WHOLE_FILE_LIMIT: u64 = 64 << 20;
/// The window hashed at a larger file's start, middle and end.
pub const WINDOW: u64 = 1 << 20;

/// The fingerprint of the checkpoint directory `dir` (16 hex digits).
pub fn checkpoint_fingerprint(dir: &Path) -> Result<String> {
    fingerprint_with(dir, WHOLE_FILE_LIMIT, WINDOW)
}

fn fingerprint_with(dir: &Path, whole_limit: u64, window: u64) -> Result<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let skipped = name.starts_with('.') || name.ends_with(".lock") || name.contains(".tmp-");
        if !skipped && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; window.min(whole_limit).max(1) as usize];
    for name in &names {
        let path = dir.join(name);
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("reading {} (model fingerprint)", path.display()))?;
        let size = f.metadata().with_context(|| format!("reading {}", path.display()))?.len();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
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
        // Lock and staging files, hidden files and subfolders are not the model.
        std::fs::write(dir.join("model.lock"), b"x").expect("write");
        std::fs::write(dir.join(".hidden"), b"x").expect("write");
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
