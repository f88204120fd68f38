//! Shared helpers: fixture paths and named tolerances.

use std::path::PathBuf;

use qvlm_core::model::llava::LlavaBundle;
use tch::Tensor;

/// Fixtures written by python/gen_llava_fixtures.py (see its docstring).
pub fn llava_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join("llava")
}

/// The fixture image `image_rgb.png` through `bundle`'s image processor, as a batch of one.
pub fn fixture_pixels(bundle: &LlavaBundle) -> Tensor {
    bundle
        .images
        .preprocess_file(&llava_fixtures().join("image_rgb.png"))
        .expect("preprocess image_rgb.png")
        .unsqueeze(0)
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(tch::Kind::Float) - b.to_kind(tch::Kind::Float)).abs().max().double_value(&[])
}

/// A scratch directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "qvlm-test-{tag}-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Copies a directory tree.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}
