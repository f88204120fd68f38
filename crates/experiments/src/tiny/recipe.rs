//! What both embedded models' training shares: the learning-rate schedule, the image-level
//! labels of stage ①, the training record and the staged output folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use qvlm_core::optim::AdamW;

use super::TrainTinyConfig;
use crate::data::easy_vqa::{EasyVqa, QuestionType, Split, COLORS, SHAPES};
use crate::eval::easy_vqa::Accuracy;
use crate::lock::Lock;

/// Linear warm-up then cosine decay to zero (a one-cycle schedule).
pub fn lr_at(step: usize, total: usize, peak: f64, warmup_fraction: f64) -> f64 {
    let warm = ((total as f64 * warmup_fraction) as usize).max(1);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (total - warm).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Image-level labels read off the questions (−100 where no question names them).
pub fn image_labels(data: &EasyVqa, index: &BTreeMap<u32, i64>) -> (Tensor, Tensor) {
    let n = index.len();
    let mut shape = vec![-100i64; n];
    let mut color = vec![-100i64; n];
    for q in &data.questions {
        let row = index[&q.image_id] as usize;
        match q.kind {
            QuestionType::Shape => {
                shape[row] = SHAPES.iter().position(|s| *s == q.answer).unwrap_or(0) as i64
            }
            QuestionType::Color => {
                color[row] = COLORS.iter().position(|s| *s == q.answer).unwrap_or(0) as i64
            }
            QuestionType::YesNo => {}
        }
    }
    (Tensor::from_slice(&shape), Tensor::from_slice(&color))
}

#[derive(Debug, Serialize)]
pub struct TrainRecord {
    pub config: TrainTinyConfig,
    pub parameters: i64,
    pub vocab_size: i64,
    pub stage1_seconds: f64,
    pub stage1_test_shape_accuracy: f64,
    pub stage1_test_color_accuracy: f64,
    pub stage2_seconds: f64,
    pub train_seconds: f64,
    pub test_accuracy: Accuracy,
    pub torch_threads: i32,
    pub libtorch: String,
}

/// The output folder written beside its place (`<out>.tmp-<pid>`) under a lock (`<out>.lock`) and
/// renamed into it only when training finished; an existing `out` is replaced only when asked
/// (`--force`), and then only once the new model is complete. Dropped before [`Staged::commit`],
/// the staging folder is removed and `out` is left as it was.
pub struct Staged {
    out: PathBuf,
    staging: PathBuf,
    force: bool,
    committed: bool,
    _lock: Lock,
}

impl Staged {
    pub fn begin(out: &Path, force: bool) -> Result<Self> {
        let name = out.file_name().and_then(|n| n.to_str()).context("out names no folder")?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let lock = Lock::acquire(&parent.join(format!("{name}.lock")))?;
        if out.exists() && !force {
            bail!(
                "{} exists (the committed embedded models live in models/); pass --force to replace it once the new model is trained, or set `out` to a new folder",
                out.display()
            );
        }
        let staging = parent.join(format!("{name}.tmp-{}", std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("removing {}", staging.display()))?;
        }
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        Ok(Self { out: out.to_path_buf(), staging, force, committed: false, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.staging
    }

    /// Puts the finished model in place (the previous one, with `--force`, removed after).
    pub fn commit(mut self) -> Result<()> {
        let old = self.staging.with_extension(format!("old-{}", std::process::id()));
        if self.out.exists() {
            if !self.force {
                bail!(
                    "{} appeared while training; the new model is in {}",
                    self.out.display(),
                    self.staging.display()
                );
            }
            std::fs::rename(&self.out, &old)
                .with_context(|| format!("moving {} aside", self.out.display()))?;
        }
        std::fs::rename(&self.staging, &self.out).with_context(|| {
            format!("renaming {} into {}", self.staging.display(), self.out.display())
        })?;
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Stage ①'s linear shape and color heads on an image's pooled vision features.
pub struct LabelHeads {
    pub shape: Tensor,
    pub color: Tensor,
}

impl LabelHeads {
    /// Small random heads for features of `width` (the shape head drawn first).
    pub fn new(width: i64) -> Self {
        let shape =
            (Tensor::randn([3, width], (Kind::Float, Device::Cpu)) * 0.02).set_requires_grad(true);
        let color =
            (Tensor::randn([8, width], (Kind::Float, Device::Cpu)) * 0.02).set_requires_grad(true);
        Self { shape, color }
    }

    /// The heads as optimizer parameters (both decayed).
    pub fn params(&self) -> [(Tensor, bool); 2] {
        [(self.shape.shallow_clone(), true), (self.color.shallow_clone(), true)]
    }

    /// Both heads' cross-entropy on features `f` `[B, width]` against rows `idx` of
    /// `labels` ([`image_labels`]; −100 is ignored).
    pub fn loss(&self, f: &Tensor, labels: &(Tensor, Tensor), idx: &Tensor) -> Tensor {
        let ce = |head: &Tensor, y: &Tensor| {
            f.linear(head, None::<Tensor>).cross_entropy_loss::<Tensor>(
                &y.index_select(0, idx),
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
        };
        ce(&self.shape, &labels.0) + ce(&self.color, &labels.1)
    }

    /// Shape and color accuracy (%) of features `f` against `labels` (rows labelled −100 left
    /// out).
    pub fn accuracy(&self, f: &Tensor, labels: &(Tensor, Tensor)) -> (f64, f64) {
        let acc = |head: &Tensor, y: &Tensor| {
            let known = y.ne(-100);
            let logits = f.linear(head, None::<Tensor>);
            let hit = logits.argmax(-1, false).eq_tensor(y).logical_and(&known);
            100.0 * hit.sum(Kind::Float).double_value(&[])
                / known.sum(Kind::Float).double_value(&[]).max(1.0)
        };
        (acc(&self.shape, &labels.0), acc(&self.color, &labels.1))
    }
}

/// One optimizer step on `loss` (gradients clipped to `grad_clip` in norm) at `lr`; the loss's
/// value.
pub fn optimize(opt: &mut AdamW, loss: &Tensor, grad_clip: f64, lr: f64) -> f64 {
    opt.zero_grad();
    loss.backward();
    opt.clip_grad_norm(grad_clip);
    opt.step(lr);
    loss.double_value(&[])
}

/// What both trainings start from: the checked config, the staged output folder, libtorch's
/// threads and seed set, easy-VQA's train and test splits.
pub struct Begun {
    pub staged: Staged,
    pub train_set: EasyVqa,
    pub test_set: EasyVqa,
}

pub fn begin(cfg: &TrainTinyConfig, force: bool) -> Result<Begun> {
    cfg.check()?;
    let t = &cfg.train;
    begin_at(&cfg.out, force, t.threads, t.seed, cfg.data.as_deref())
}

/// [`begin`] for any training that writes a model to `out` from easy-VQA (`data`, default the
/// bootstrap's copy) with libtorch's `threads` (0 = its default) and `seed`.
pub fn begin_at(
    out: &Path,
    force: bool,
    threads: u16,
    seed: i64,
    data: Option<&Path>,
) -> Result<Begun> {
    let staged = Staged::begin(out, force)?;
    if threads > 0 {
        tch::set_num_threads(i32::from(threads));
    }
    tch::manual_seed(seed);
    let root = match data {
        Some(p) => p.to_path_buf(),
        None => EasyVqa::default_root()?,
    };
    let train_set = EasyVqa::load(&root, Split::Train)?;
    let test_set = EasyVqa::load(&root, Split::Test)?;
    Ok(Begun { staged, train_set, test_set })
}
