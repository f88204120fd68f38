//! A candidate for the third embedded variant: outlier channels the model was *trained* with
//! (`experiments train-tiny configs/train-tiny-trained-outliers.toml`).
//!
//! The planted variant ([`qvlm_core::model::outliers`]) is an exact reparameterization: channels
//! ×s in a norm, the matching weight columns ÷s. A per-channel rescaling (AWQ, SmoothQuant) undoes
//! it exactly, which real models do not allow: in an LLM the outlier features' weight columns are
//! not tiny (Dettmers et al. 2022, LLM.int8(); Sun et al. 2024, "Massive activations"). No
//! function-preserving change can produce that, so this is a short fine-tune of the plain tiny
//! LLaVA with the outliers held in place:
//!
//! - one channel set per tower (real LLMs' outlier dimensions are the same in every layer): the
//!   gains (and LayerNorm biases) of every norm that feeds linears — CLIP's layer_norm1/2, the
//!   decoder's input/post-attention RMSNorm — are multiplied by a factor that rises geometrically
//!   from 1 to the tower's scale over the first `ramp_fraction` of a stage's steps and is then
//!   held (not trained);
//! - the consumers' weight columns at those channels (q/k/v, fc1, gate/up) keep their original
//!   norms (they are trained in direction only, renormalized after every step), so the outliers
//!   are not absorbed by shrinking them — the planted variant's ÷s;
//! - the residual stream's writers at those channels (embeddings, CLIP's pre-layernorm,
//!   out_proj/fc2 and o_proj/down_proj rows, the projector's output rows) keep their norms too, so
//!   the residual channel is not emptied either;
//! - staged as the base model was trained ([`super::train`]): ① the vision tower alone on the
//!   image-level shape/color labels with its outliers rising, ② projector + decoder on the answers
//!   with the tower frozen and the decoder's outliers rising.
//!
//! Status (README "The embedded default", issue #17): the model it writes does not yet meet the
//! variant's requirements — float accuracy 4 points below the plain model's, and AWQ and
//! SmoothQuant still recover at W4A4 with per-token activations — so no model of it is committed
//! and no table uses it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qvlm_core::checkpoint::llava_hf::save_llava_hf;
use qvlm_core::hook::{LinearHook, NoHook};
use qvlm_core::io::image::ImageProcessorConfig;
use qvlm_core::io::prompt::Piece;
use qvlm_core::layer_id::{LayerId, Slot, Tower};
use qvlm_core::model::llava::{Llava, LlavaBundle, LoadOptions};
use qvlm_core::optim::{AdamW, AdamWConfig};
use qvlm_core::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::recipe::{begin_at, image_labels, lr_at, optimize, Begun, LabelHeads};
use super::train::{augment, last_two, load_pixels, with_answer, TEMPLATE};
use crate::eval::easy_vqa::{evaluate, Accuracy};
use crate::progress;

/// Which channels carry the outliers and how large they are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainedOutlierSpec {
    /// Outlier channels of the vision tower's residual stream (one set for every layer).
    pub vision_channels: usize,
    /// Outlier channels of the decoder's residual stream.
    pub language_channels: usize,
    /// The factor the vision norms' gains (and biases) at those channels end at.
    pub vision_scale: f64,
    /// The factor the decoder norms' gains at those channels end at.
    pub language_scale: f64,
    /// Seed of the channel choice.
    pub seed: u64,
}

/// The fine-tune's schedule, staged as the base model's training (AdamW, warm-up then cosine):
/// ① the vision tower alone on the image-level shape/color labels, with its outliers rising;
/// ② projector + decoder on the answers with the tower frozen, with the decoder's rising.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRecipe {
    pub seed: i64,
    /// libtorch intra-op threads (0 = libtorch's default).
    pub threads: u16,
    pub batch_size: usize,
    pub vision_epochs: usize,
    pub vision_lr: f64,
    pub lm_epochs: usize,
    pub lm_lr: f64,
    pub weight_decay: f64,
    pub warmup_fraction: f64,
    /// Fraction of each stage's steps over which its gains rise from 1 to the scale
    /// (geometrically).
    pub ramp_fraction: f64,
    pub grad_clip: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainedOutliersConfig {
    /// The plain embedded model it starts from (llava-hf layout).
    pub base: PathBuf,
    /// Output directory (llava-hf layout).
    pub out: PathBuf,
    /// easy-VQA's `data` folder (default: inside the bootstrap's `.venv`).
    #[serde(default)]
    pub data: Option<PathBuf>,
    pub outliers: TrainedOutlierSpec,
    pub finetune: FinetuneRecipe,
    #[serde(skip)]
    pub file: PathBuf,
}

impl TrainedOutliersConfig {
    /// Every value in range before anything is read or written; errors name the file and key.
    pub fn check(&self) -> Result<()> {
        let f = self.file.display();
        let (o, t) = (&self.outliers, &self.finetune);
        for (key, v) in [
            ("outliers.vision_channels", o.vision_channels),
            ("outliers.language_channels", o.language_channels),
            ("finetune.batch_size", t.batch_size),
            ("finetune.vision_epochs", t.vision_epochs),
            ("finetune.lm_epochs", t.lm_epochs),
        ] {
            if v == 0 {
                bail!("{f}: key `{key}`: must be at least 1");
            }
        }
        for (key, v) in [
            ("outliers.vision_scale", o.vision_scale),
            ("outliers.language_scale", o.language_scale),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                bail!("{f}: key `{key}`: {v} is not a finite number ≥ 1");
            }
        }
        for (key, v, min_open) in [
            ("finetune.vision_lr", t.vision_lr, true),
            ("finetune.lm_lr", t.lm_lr, true),
            ("finetune.grad_clip", t.grad_clip, true),
            ("finetune.weight_decay", t.weight_decay, false),
        ] {
            let ok = v.is_finite() && if min_open { v > 0.0 } else { v >= 0.0 };
            if !ok {
                bail!(
                    "{f}: key `{key}`: {v} is not a finite number {} 0",
                    if min_open { ">" } else { "≥" }
                );
            }
        }
        for (key, v) in [
            ("finetune.warmup_fraction", t.warmup_fraction),
            ("finetune.ramp_fraction", t.ramp_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{f}: key `{key}`: {v} is not in [0, 1]");
            }
        }
        super::check_out(&self.out, &self.file)
    }

    /// `base` must hold a model (checked when training starts: paths are relative to where the
    /// command runs).
    fn check_base(&self) -> Result<()> {
        if !self.base.join("config.json").is_file() {
            bail!(
                "{}: key `base`: {} holds no config.json (the plain embedded model is models/tiny-llava)",
                self.file.display(),
                self.base.display()
            );
        }
        Ok(())
    }
}

/// What the fine-tune wrote beside the model (`training.json`).
#[derive(Debug, Serialize)]
pub struct TrainedOutliersRecord {
    pub config: TrainedOutliersConfig,
    pub vision_channels: Vec<i64>,
    pub language_channels: Vec<i64>,
    pub vision_steps: usize,
    pub lm_steps: usize,
    /// Stage ①'s shape and color accuracy on the test images (label heads).
    pub stage1_test_shape_accuracy: f64,
    pub stage1_test_color_accuracy: f64,
    pub train_seconds: f64,
    /// Test accuracy of the base model before and of this one after (full test split).
    pub base_test_accuracy: Accuracy,
    pub test_accuracy: Accuracy,
    /// Per consumer site: the outlier channels' largest |x| over the largest |x| of the median
    /// other channel, on the test images' first batch (after the fine-tune).
    pub outlier_ratios: Vec<(String, f64)>,
    pub torch_threads: i32,
    pub libtorch: String,
}

/// A constraint re-imposed after every optimizer step.
enum Pin {
    /// Entries `channels` of dim 0 held at `base × factor` (the ramped norm gains and biases).
    Scaled { t: Tensor, channels: Tensor, base: Tensor },
    /// Entries held at their original values (writers' biases, CLIP's class embedding).
    Fixed { t: Tensor, channels: Tensor, base: Tensor },
    /// The slices at `channels` along `dim` keep their original L2 norms (taken over every other
    /// dimension): trained in direction only.
    Norm { t: Tensor, dim: i64, channels: Tensor, norms: Tensor },
}

fn slice_norms(t: &Tensor, dim: i64, channels: &Tensor) -> Tensor {
    let s = t.index_select(dim, channels);
    let s = if dim == 0 { s } else { s.transpose(0, dim) };
    s.flatten(1, -1).norm_scalaropt_dim(2.0, [1], false)
}

impl Pin {
    fn scaled(t: &Tensor, channels: &Tensor) -> Pin {
        let base = t.index_select(0, channels).detach().copy();
        Pin::Scaled { t: t.shallow_clone(), channels: channels.shallow_clone(), base }
    }

    fn fixed(t: &Tensor, channels: &Tensor) -> Pin {
        let base = t.index_select(0, channels).detach().copy();
        Pin::Fixed { t: t.shallow_clone(), channels: channels.shallow_clone(), base }
    }

    fn norm(t: &Tensor, dim: i64, channels: &Tensor) -> Pin {
        let norms = slice_norms(t, dim, channels).detach().copy();
        Pin::Norm { t: t.shallow_clone(), dim, channels: channels.shallow_clone(), norms }
    }

    fn apply(&mut self, factor: f64) {
        let _g = tch::no_grad_guard();
        match self {
            Pin::Scaled { t, channels, base } => {
                let _ = t.index_copy_(0, channels, &(&*base * factor));
            }
            Pin::Fixed { t, channels, base } => {
                let _ = t.index_copy_(0, channels, base);
            }
            Pin::Norm { t, dim, channels, norms } => {
                let now = slice_norms(t, *dim, channels).clamp_min(1e-12);
                let mut shape = vec![1i64; t.dim()];
                shape[*dim as usize] = -1;
                let rescale = (&*norms / now).view(shape.as_slice());
                let fixed = t.index_select(*dim, channels) * rescale;
                let _ = t.index_copy_(*dim, channels, &fixed);
            }
        }
    }
}

/// Picks `k` of `width` channels (sorted).
fn pick(rng: &mut SplitMix64, width: i64, k: usize, key: &str, file: &Path) -> Result<Vec<i64>> {
    if k as i64 >= width {
        bail!(
            "{}: key `{key}`: {k} outlier channels of a residual stream {width} wide (at most {})",
            file.display(),
            width - 1
        );
    }
    let mut all: Vec<i64> = (0..width).collect();
    rng.shuffle(&mut all);
    let mut chosen: Vec<i64> = all.into_iter().take(k).collect();
    chosen.sort_unstable();
    Ok(chosen)
}

/// The vision tower's pins (module docs): its norms' gains and biases, the consumers' columns
/// and the residual writers at the `vision` channels.
fn vision_pins(model: &Llava, vision: &Tensor) -> Vec<Pin> {
    let weight = |l: &qvlm_core::model::linear::Linear| l.float_weight();
    let mut out = Vec::new();
    let vt = &model.vision_tower;
    let e = &vt.embeddings;
    out.push(Pin::norm(&e.patch_embedding, 0, vision));
    out.push(Pin::fixed(&e.class_embedding, vision));
    out.push(Pin::norm(&e.position_embedding, 1, vision));
    out.push(Pin::fixed(&vt.pre_layrnorm.weight, vision));
    out.push(Pin::fixed(&vt.pre_layrnorm.bias, vision));
    for layer in vt.used_layers() {
        for norm in [&layer.layer_norm1, &layer.layer_norm2] {
            out.push(Pin::scaled(&norm.weight, vision));
            out.push(Pin::scaled(&norm.bias, vision));
        }
        let a = &layer.self_attn;
        for consumer in [&a.q_proj, &a.k_proj, &a.v_proj, &layer.fc1] {
            out.push(Pin::norm(&weight(consumer), 1, vision));
        }
        for writer in [&a.out_proj, &layer.fc2] {
            out.push(Pin::norm(&weight(writer), 0, vision));
            if let Some(b) = &writer.bias {
                out.push(Pin::fixed(b, vision));
            }
        }
    }
    out
}

/// The decoder's pins at the `language` channels (the projector's output rows write its residual
/// stream for the image tokens).
fn language_pins(model: &Llava, language: &Tensor) -> Vec<Pin> {
    let weight = |l: &qvlm_core::model::linear::Linear| l.float_weight();
    let mut out = Vec::new();
    if let Some(l2) = &model.projector.linear_2 {
        out.push(Pin::norm(&weight(l2), 0, language));
        if let Some(b) = &l2.bias {
            out.push(Pin::fixed(b, language));
        }
    }
    let lm = &model.language_model;
    out.push(Pin::norm(&lm.embed_tokens, 1, language));
    for layer in &lm.layers {
        out.push(Pin::scaled(&layer.input_layernorm.weight, language));
        out.push(Pin::scaled(&layer.post_attention_layernorm.weight, language));
        let a = &layer.self_attn;
        for consumer in [&a.q_proj, &a.k_proj, &a.v_proj, &layer.gate_proj, &layer.up_proj] {
            out.push(Pin::norm(&weight(consumer), 1, language));
        }
        for writer in [&a.o_proj, &layer.down_proj] {
            out.push(Pin::norm(&weight(writer), 0, language));
        }
    }
    out
}

/// The factor of a stage's gains at `step`: rising geometrically from 1 to `scale` over
/// `ramp_steps`, then held.
fn ramp(scale: f64, step: usize, ramp_steps: usize) -> f64 {
    scale.powf((step as f64 / ramp_steps.max(1) as f64).min(1.0))
}

/// Records, per consumer site, the largest |x| of every input channel.
struct ChannelMax {
    sites: Vec<(LayerId, Tensor)>,
}

impl LinearHook for ChannelMax {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        let consumer = matches!(id.slot, Slot::QProj | Slot::Fc1 | Slot::GateProj);
        if consumer {
            let m = x.abs().flatten(0, -2).amax([0], false);
            self.sites.push((id, m));
        }
        x
    }
}

/// Outlier channels' largest |x| over the median channel's (other channels) per consumer site.
fn outlier_ratios(
    sites: &[(LayerId, Tensor)],
    vision: &[i64],
    language: &[i64],
) -> Result<Vec<(String, f64)>> {
    sites
        .iter()
        .map(|(id, m)| {
            let chosen = if id.tower == Tower::Vision { vision } else { language };
            let m = Vec::<f32>::try_from(m.to_kind(Kind::Float))
                .with_context(|| format!("{id}: reading its channel maxima"))?;
            let mut others: Vec<f32> = m
                .iter()
                .enumerate()
                .filter(|(i, _)| !chosen.contains(&(*i as i64)))
                .map(|(_, v)| *v)
                .collect();
            others.sort_by(f32::total_cmp);
            let median = others[others.len() / 2];
            let top = chosen.iter().map(|&c| m[c as usize]).fold(0f32, f32::max);
            Ok((id.to_string(), f64::from(top / median)))
        })
        .collect()
}

/// The config at `path` when it is a trained-outlier fine-tune's (it has `[finetune]`); `None`
/// for the base training's config.
pub fn load_if_finetune(path: &Path) -> Result<Option<TrainedOutliersConfig>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    crate::config::ConfigKind::TrainTiny.expect(&text, path)?;
    let table: toml::Table =
        text.parse().with_context(|| format!("{}: not valid TOML", path.display()))?;
    if !table.contains_key("finetune") {
        return Ok(None);
    }
    parse_config(&text, path).map(Some)
}

/// Parses and validates a fine-tune config; `path` names the file in errors.
pub fn parse_config(text: &str, path: &Path) -> Result<TrainedOutliersConfig> {
    let mut cfg: TrainedOutliersConfig = crate::config::parse_toml(text, path)?;
    cfg.file = path.to_path_buf();
    cfg.check()?;
    Ok(cfg)
}

/// Fine-tunes `cfg.base` into `cfg.out` (see the module docs).
pub fn train(cfg: &TrainedOutliersConfig, force: bool) -> Result<TrainedOutliersRecord> {
    cfg.check()?;
    cfg.check_base()?;
    let t = &cfg.finetune;
    let Begun { staged, train_set, test_set } =
        begin_at(&cfg.out, force, t.threads, t.seed, cfg.data.as_deref())?;
    let dir = staged.dir();

    let bundle = LlavaBundle::load(&cfg.base, &LoadOptions::default())
        .with_context(|| format!("loading the base model {}", cfg.base.display()))?;
    let pb = progress::bar(test_set.questions.len() as u64, "base test eval");
    let base_eval =
        evaluate(&bundle, &test_set, &test_set.questions, TEMPLATE, 128, &mut NoHook, &pb)?;
    pb.finish_and_clear();
    let base_test_accuracy = base_eval.accuracy();
    tracing::info!(overall = base_test_accuracy.overall, "base model on the test split");
    let LlavaBundle { model, tokenizer: ptok, images: proc, .. } = bundle;
    std::fs::copy(cfg.base.join("tokenizer.json"), dir.join("tokenizer.json"))
        .with_context(|| format!("copying tokenizer.json from {}", cfg.base.display()))?;

    let mut rng = SplitMix64::new(cfg.outliers.seed);
    let o = &cfg.outliers;
    let vision_channels = pick(
        &mut rng,
        model.cfg.vision.hidden_size,
        o.vision_channels,
        "outliers.vision_channels",
        &cfg.file,
    )?;
    let language_channels = pick(
        &mut rng,
        model.cfg.text.hidden_size,
        o.language_channels,
        "outliers.language_channels",
        &cfg.file,
    )?;
    tracing::info!(?vision_channels, ?language_channels, "outlier channels");
    let vision = Tensor::from_slice(&vision_channels);
    let language = Tensor::from_slice(&language_channels);

    let (train_px, train_idx) = load_pixels(&train_set, &proc)?;
    let (test_px, test_idx) = load_pixels(&test_set, &proc)?;
    let decays = |name: &str, v: &Tensor| v.dim() >= 2 && !name.contains("embedding");
    let named = model.named_tensors();
    let start = Instant::now();

    // ① The vision tower alone (CLIP's last layer and post-layernorm are unused by LLaVA's
    // features and stay as they are), its outliers rising.
    let used = model.cfg.vision_layers_used();
    let unused = |name: &str| {
        name.contains("post_layernorm")
            || (used..model.cfg.vision.num_hidden_layers)
                .any(|i| name.contains(&format!("encoder.layers.{i}.")))
    };
    let heads = LabelHeads::new(model.cfg.vision.hidden_size);
    let mut params: Vec<(Tensor, bool)> = named
        .iter()
        .filter(|(n, _)| n.starts_with("vision_tower.") && !unused(n))
        .map(|(n, v)| (v.shallow_clone().set_requires_grad(true), decays(n, v)))
        .collect();
    params.extend(heads.params());
    let mut opt =
        AdamW::new(params, AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() });
    let mut pins = vision_pins(&model, &vision);
    let labels = image_labels(&train_set, &train_idx);
    let n_img = train_px.size()[0] as usize;
    let vision_steps = t.vision_epochs * n_img.div_ceil(t.batch_size);
    let ramp1 = (vision_steps as f64 * t.ramp_fraction) as usize;
    let scale_v = cfg.outliers.vision_scale;
    let mut shuffle = SplitMix64::new(t.seed as u64);
    let pool =
        |px: &Tensor| model.vision_tower.forward(px, &mut NoHook).mean_dim(1, false, Kind::Float);
    let pb = progress::bar(vision_steps as u64, "① vision, outliers rising");
    let mut step = 0;
    for epoch in 0..t.vision_epochs {
        let mut epoch_loss = 0.0;
        let mut order: Vec<i64> = (0..n_img as i64).collect();
        shuffle.shuffle(&mut order);
        for chunk in order.chunks(t.batch_size) {
            for p in &mut pins {
                p.apply(ramp(scale_v, step, ramp1));
            }
            let idx = Tensor::from_slice(chunk);
            let f = pool(&augment(&train_px.index_select(0, &idx), &mut shuffle));
            let loss = heads.loss(&f, &labels, &idx);
            let lr = lr_at(step, vision_steps, t.vision_lr, t.warmup_fraction);
            let l = optimize(&mut opt, &loss, t.grad_clip, lr);
            step += 1;
            epoch_loss += l * chunk.len() as f64 / n_img as f64;
            pb.set_message(format!("loss {l:.3} ×{:.1}", ramp(scale_v, step, ramp1)));
            pb.inc(1);
        }
        tracing::info!(epoch, loss = epoch_loss, "stage ① epoch");
    }
    for p in &mut pins {
        p.apply(scale_v);
    }
    pb.finish_and_clear();
    let (shape_acc, color_acc) = {
        let _g = tch::no_grad_guard();
        heads.accuracy(&pool(&test_px), &image_labels(&test_set, &test_idx))
    };
    tracing::info!(shape_acc, color_acc, "stage ① done (test image labels)");
    for (n, v) in &named {
        if n.starts_with("vision_tower.") {
            let _ = v.shallow_clone().set_requires_grad(false);
        }
    }

    // ② Projector + decoder on the answers, the tower frozen (its features precomputed), the
    // decoder's outliers rising.
    let train_feats = {
        let _g = tch::no_grad_guard();
        let chunks: Vec<Tensor> = (0..n_img as i64)
            .step_by(256)
            .map(|s| {
                model
                    .vision_tower
                    .forward(&train_px.narrow(0, s, 256.min(n_img as i64 - s)), &mut NoHook)
            })
            .collect();
        Tensor::cat(&chunks, 0)
    };
    let mut opt = AdamW::new(
        named
            .iter()
            .filter(|(n, _)| !n.starts_with("vision_tower."))
            .map(|(n, v)| (v.shallow_clone().set_requires_grad(true), decays(n, v)))
            .collect(),
        AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() },
    );
    let mut pins = language_pins(&model, &language);
    let prompts: Vec<Vec<Piece>> =
        train_set.questions.iter().map(|q| with_answer(&ptok, q)).collect::<Result<_>>()?;
    let vocab = model.cfg.text.vocab_size;
    let n_q = train_set.questions.len();
    let lm_steps = t.lm_epochs * n_q.div_ceil(t.batch_size);
    let ramp2 = (lm_steps as f64 * t.ramp_fraction) as usize;
    let scale_l = cfg.outliers.language_scale;
    let pb = progress::bar(lm_steps as u64, "② language, outliers rising");
    let mut step = 0;
    for epoch in 0..t.lm_epochs {
        let mut epoch_loss = 0.0;
        let mut order: Vec<usize> = (0..n_q).collect();
        shuffle.shuffle(&mut order);
        for chunk in order.chunks(t.batch_size) {
            for p in &mut pins {
                p.apply(ramp(scale_l, step, ramp2));
            }
            let rows: Vec<i64> =
                chunk.iter().map(|&i| train_idx[&train_set.questions[i].image_id]).collect();
            let feats = model
                .projector
                .forward(&train_feats.index_select(0, &Tensor::from_slice(&rows)), &mut NoHook);
            let seqs: Vec<Vec<Piece>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let images: Vec<Tensor> =
                (0..chunk.len() as i64).map(|b| feats.narrow(0, b, 1)).collect();
            let batch = model.prepare(&seqs, &images)?;
            let h = model.decode_hidden(&batch, None, &mut NoHook);
            let tlen = h.size()[1];
            let logits = model.language_model.head(&h.narrow(1, tlen - 3, 2));
            let targets: Vec<i64> = seqs.iter().flat_map(|s| last_two(s)).collect();
            let loss =
                logits.reshape([-1, vocab]).cross_entropy_for_logits(&Tensor::from_slice(&targets));
            let lr = lr_at(step, lm_steps, t.lm_lr, t.warmup_fraction);
            let l = optimize(&mut opt, &loss, t.grad_clip, lr);
            step += 1;
            epoch_loss += l * chunk.len() as f64 / n_q as f64;
            pb.set_message(format!("loss {l:.4} ×{:.1}", ramp(scale_l, step, ramp2)));
            pb.inc(1);
            if step % 100 == 0 {
                tracing::info!(epoch, step, steps = lm_steps, loss = l, "stage ②");
            }
        }
        tracing::info!(epoch, loss = epoch_loss, "stage ② epoch");
    }
    for p in &mut pins {
        p.apply(scale_l);
    }
    pb.finish_and_clear();
    let train_seconds = start.elapsed().as_secs_f64();
    for (_, v) in &named {
        let _ = v.shallow_clone().set_requires_grad(false);
    }

    let proc_cfg: ImageProcessorConfig = proc.cfg.clone();
    save_llava_hf(&model, &proc_cfg, dir)?;
    drop(model);
    let bundle = LlavaBundle::load(dir, &LoadOptions::default())?;
    let mut probe = ChannelMax { sites: Vec::new() };
    {
        let _g = tch::no_grad_guard();
        // The first 32 test questions with their own images.
        let questions = &test_set.questions[..32.min(test_set.questions.len())];
        let rows: Vec<i64> = questions.iter().map(|q| test_idx[&q.image_id]).collect();
        let feats = bundle
            .model
            .image_features(&test_px.index_select(0, &Tensor::from_slice(&rows)), &mut probe);
        let q: Vec<Vec<Piece>> =
            questions.iter().map(|q| with_answer(&bundle.tokenizer, q)).collect::<Result<_>>()?;
        let images: Vec<Tensor> = (0..q.len() as i64).map(|b| feats.narrow(0, b, 1)).collect();
        let batch = bundle.model.prepare(&q, &images)?;
        let _ = bundle.model.decode_hidden(&batch, None, &mut probe);
    }
    let outlier_ratios = outlier_ratios(&probe.sites, &vision_channels, &language_channels)?;
    let pb = progress::bar(test_set.questions.len() as u64, "test eval");
    let out = evaluate(&bundle, &test_set, &test_set.questions, TEMPLATE, 128, &mut NoHook, &pb)?;
    pb.finish_and_clear();
    let record = TrainedOutliersRecord {
        config: cfg.clone(),
        vision_channels,
        language_channels,
        vision_steps,
        lm_steps,
        stage1_test_shape_accuracy: shape_acc,
        stage1_test_color_accuracy: color_acc,
        train_seconds,
        base_test_accuracy,
        test_accuracy: out.accuracy(),
        outlier_ratios,
        torch_threads: tch::get_num_threads(),
        libtorch: qvlm_core::device::libtorch_version(),
    };
    let path = dir.join("training.json");
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    drop(bundle);
    staged.commit()?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norms(t: &Tensor, dim: i64, channels: &[i64]) -> Vec<f32> {
        Vec::<f32>::try_from(slice_norms(t, dim, &Tensor::from_slice(channels))).expect("f32")
    }

    #[test]
    fn pins_restore_gains_and_norms_and_leave_the_rest() {
        let c = Tensor::from_slice(&[1i64, 3]);
        let gain = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let w = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]) + 1.0;
        let rows = Tensor::arange(8, (Kind::Float, tch::Device::Cpu)).view([4, 2]) + 1.0;
        let (cols_before, rows_before) = (norms(&w, 1, &[1, 3]), norms(&rows, 0, &[1, 3]));
        let mut pins = vec![Pin::scaled(&gain, &c), Pin::norm(&w, 1, &c), Pin::norm(&rows, 0, &c)];
        // An optimizer step shrank everything (weight decay would).
        let _ = tch::no_grad(|| {
            let _ = gain.shallow_clone().g_mul_scalar_(0.5);
            let _ = w.shallow_clone().g_mul_scalar_(0.5);
            rows.shallow_clone().g_mul_scalar_(0.5)
        });
        for p in &mut pins {
            p.apply(10.0);
        }
        assert_eq!(Vec::<f32>::try_from(&gain).expect("f32"), vec![0.5, 20.0, 1.5, 40.0]);
        for (got, want) in norms(&w, 1, &[1, 3]).iter().zip(&cols_before) {
            assert!((got - want).abs() < 1e-4 * want, "column norm {got} vs {want}");
        }
        for (got, want) in norms(&rows, 0, &[1, 3]).iter().zip(&rows_before) {
            assert!((got - want).abs() < 1e-4 * want, "row norm {got} vs {want}");
        }
        // Unpinned columns and rows keep what the step did to them.
        assert_eq!(w.double_value(&[0, 0]), 0.5);
        assert_eq!(rows.double_value(&[0, 0]), 0.5);
        // Direction is free: a pinned column keeps the direction the step gave it.
        let col = w.select(1, 1);
        let ratio = col.double_value(&[1]) / col.double_value(&[0]);
        assert!((ratio - 6.0 / 2.0).abs() < 1e-6, "{ratio}");
    }

    fn config(text: &str) -> Result<TrainedOutliersConfig> {
        parse_config(text, Path::new("ft.toml"))
    }

    const GOOD: &str = r#"
base = "../../models/tiny-llava"
out = "/tmp/qvlm-unit-trained-outliers/out"
[outliers]
vision_channels = 2
language_channels = 3
vision_scale = 50.0
language_scale = 100.0
seed = 0
[finetune]
seed = 0
threads = 2
batch_size = 64
vision_epochs = 30
vision_lr = 2e-3
lm_epochs = 2
lm_lr = 1e-3
weight_decay = 0.01
warmup_fraction = 0.05
ramp_fraction = 0.5
grad_clip = 1.0
"#;

    #[test]
    fn config_errors_name_the_file_and_key() {
        config(GOOD).expect("the shipped shape parses");
        for (from, to, key) in [
            ("vision_scale = 50.0", "vision_scale = 0.5", "outliers.vision_scale"),
            ("language_scale = 100.0", "language_scale = nan", "outliers.language_scale"),
            ("vision_channels = 2", "vision_channels = 0", "outliers.vision_channels"),
            ("lm_epochs = 2", "lm_epochs = 0", "finetune.lm_epochs"),
            ("ramp_fraction = 0.5", "ramp_fraction = 1.5", "finetune.ramp_fraction"),
            ("lm_lr = 1e-3", "lm_lr = -1.0", "finetune.lm_lr"),
        ] {
            let err = config(&GOOD.replace(from, to)).expect_err(to).to_string();
            assert!(err.contains("ft.toml") && err.contains(&format!("`{key}`")), "{to}: {err}");
        }
        let err = config(&GOOD.replace("seed = 0\n[finetune]", "seed = 0\nsede = 1\n[finetune]"))
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("sede"), "{err}");
        let missing = config(&GOOD.replace("../../models/tiny-llava", "/nonexistent/tiny"))
            .expect("parses")
            .check_base()
            .expect_err("no model there")
            .to_string();
        assert!(missing.contains("ft.toml") && missing.contains("`base`"), "{missing}");
    }
}
