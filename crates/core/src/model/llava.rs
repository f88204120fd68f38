//! LLaVA: CLIP vision tower → projector → image features spliced into the LLaMA decoder's input
//! embeddings at the `<image>` placeholder.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::device::DType;
use crate::error::{Error, Result};
use crate::hook::LinearHook;
use crate::io::compressed::CompressedConfig;
use crate::io::config::{
    detect_format, CheckpointFiles, CheckpointFormat, LlavaConfig, ProjectorKind,
};
use crate::io::image::{ImageProcessor, ImageProcessorConfig};
use crate::io::naming::Naming;
use crate::io::prompt::{ImageSplice, Piece, PromptTokenizer};
use crate::io::shards::ShardSet;
use crate::io::weights::VarBuilder;
use crate::layer_id::{LayerId, Slot};
use crate::model::clip::ClipVisionTower;
use crate::model::fused::{FusedCache, FusedDecoder};
use crate::model::linear::Linear;
use crate::model::llama::{DecoderContext, KvCache, LlamaModel};
use crate::model::projector::Projector;

/// How to load a checkpoint directory.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Original LLaVA: the CLIP directory (default: `mm_vision_tower` if it is a local directory).
    pub clip_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, clip_dir: None }
    }
}

#[derive(Debug)]
pub struct Llava {
    pub vision_tower: ClipVisionTower,
    pub projector: Projector,
    pub language_model: LlamaModel,
    pub cfg: LlavaConfig,
    /// The rotation applied to the language model, if any ([`crate::model::rotation::rotate`]).
    pub rotation: Option<crate::quant::spec::RotationSpec>,
}

/// A batch ready for the decoder: left-padded input embeddings and their mask.
#[derive(Debug)]
pub struct PreparedBatch {
    /// `[B, T, hidden]`.
    pub embeds: Tensor,
    /// `[B, T]` int64, 1 = real token.
    pub mask: Tensor,
    /// `[B, T]` int64 positions (cumulative count of real tokens − 1).
    pub positions: Tensor,
}

/// What greedy decoding produced.
#[derive(Debug)]
pub struct Generation {
    /// New tokens per row, EOS excluded.
    pub tokens: Vec<Vec<i64>>,
    /// `[B, vocab]` logits of the first generated position (the answer distribution).
    pub first_logits: Tensor,
}

/// Decides from a row's new tokens whether it is finished (e.g. a stop string appeared).
pub trait StopCriterion {
    fn should_stop(&self, new_tokens: &[i64]) -> bool;
}

/// The code that runs each decode step after the prefill (the prefill is always libtorch's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodePath {
    /// The decoder layers as libtorch operators: any batch, device, dtype and hook.
    #[default]
    Libtorch,
    /// The fused decode step ([`crate::model::fused`]): the same layers and weights as loops over
    /// f32 buffers, the linears on their own kernels. Batch 1 without padding, CPU, f32 or bf16,
    /// and no hook but [`crate::hook::NoHook`]; anything else is an error, not a fallback. Its
    /// tokens are the libtorch path's up to a summation order (tested on the parity fixtures).
    Fused,
}

impl DecodePath {
    pub fn name(self) -> &'static str {
        match self {
            DecodePath::Libtorch => "libtorch",
            DecodePath::Fused => "fused",
        }
    }

    /// Refuses a hook the path cannot call, before any work is done.
    pub(crate) fn check_hook(self, hook: &dyn LinearHook) -> Result<()> {
        if self == DecodePath::Fused && !hook.is_pass_through() {
            return Err(Error::Invalid(
                "the fused decode path runs the linears without hooks; generate with a hook on \
                 the libtorch decode path"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for DecodePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DecodePath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "libtorch" => Ok(DecodePath::Libtorch),
            "fused" => Ok(DecodePath::Fused),
            other => Err(Error::Invalid(format!(
                "decode path `{other}`: expected `libtorch` or `fused`"
            ))),
        }
    }
}

/// Greedy decoding options.
#[derive(Clone, Default)]
pub struct GenerateOptions<'a> {
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<i64>,
    /// Checked after every token; a row that meets it stops (its tokens are kept).
    pub stop: Option<&'a dyn StopCriterion>,
    /// Which code runs the decode steps.
    pub decode: DecodePath,
}

impl std::fmt::Debug for GenerateOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateOptions")
            .field("max_new_tokens", &self.max_new_tokens)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("stop", &self.stop.is_some())
            .field("decode", &self.decode)
            .finish()
    }
}

impl Llava {
    /// Builds the model from named weights (checkpoint or fresh variables).
    pub fn build(vb: &VarBuilder, cfg: &LlavaConfig) -> Result<Self> {
        let model = Self {
            vision_tower: ClipVisionTower::load(&vb.pp("vision_tower"), cfg)?,
            projector: Projector::load(&vb.pp("multi_modal_projector"), cfg)?,
            language_model: LlamaModel::load(&vb.pp("language_model"), vb, &cfg.text)?,
            cfg: cfg.clone(),
            rotation: None,
        };
        vb.finish()?;
        Ok(model)
    }

    /// Loads a llava-hf or an original-LLaVA checkpoint directory, strictly.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let files = CheckpointFiles::in_dir(dir);
        let kind = opts.dtype.kind();
        match detect_format(&files.config)? {
            CheckpointFormat::LlavaHf => {
                let cfg = LlavaConfig::from_hf_json(&files.config)?;
                let shards = ShardSet::open_dir(dir)?;
                let naming = Naming::detect_hf(&shards, &shards.file_of(""))?;
                let compressed = CompressedConfig::from_config_json(&files.config)?
                    .map(|c| (c, files.config.clone()));
                let vb = VarBuilder::from_compressed_checkpoint(
                    vec![shards],
                    naming,
                    compressed,
                    opts.device,
                    kind,
                );
                Self::build(&vb, &cfg)
            }
            CheckpointFormat::Original => {
                let clip_dir = original_clip_dir(dir, &files.config, opts.clip_dir.as_deref())?;
                let cfg =
                    LlavaConfig::from_original_json(&files.config, &clip_dir.join("config.json"))?;
                let llm = ShardSet::open_dir(dir)?;
                let clip = ShardSet::open_dir(&clip_dir)?;
                let naming =
                    Naming::Original { linear_projector: cfg.projector == ProjectorKind::Linear };
                let vb = VarBuilder::from_checkpoint(vec![llm, clip], naming, opts.device, kind);
                Self::build(&vb, &cfg)
            }
        }
    }

    pub fn device(&self) -> Device {
        self.language_model.embed_tokens.device()
    }

    /// SHA-256 over every tensor (canonical name, dtype, shape, then its bytes), in name order:
    /// the identity of the weights, whatever file layout they came from.
    pub fn weights_sha256(&self) -> Result<String> {
        super::weights_sha256(self.named_tensors())
    }

    pub fn kind(&self) -> Kind {
        self.language_model.embed_tokens.kind()
    }

    /// Every quantizable linear, in execution order (vision layers that reach the features,
    /// projector, decoder layers).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = Vec::new();
        for layer in self.vision_tower.used_layers() {
            out.extend(layer.linears());
        }
        out.extend(self.projector.linears());
        for layer in &self.language_model.layers {
            out.extend(layer.linears());
        }
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = self.linears_and_head_mut();
        if out.last().is_some_and(|l| l.id.slot == Slot::LmHead) {
            out.pop();
        }
        out
    }

    /// Every weight under its canonical name (the names the loaders asked `VarBuilder` for,
    /// which each module keeps), for saving. Quantized layers contribute their float
    /// (dequantized) weight.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.vision_tower.named_tensors(&mut out);
        self.projector.named_tensors(&mut out);
        self.language_model.named_tensors(&mut out);
        out
    }

    /// [`Llava::linears`] and, when untied, `lm_head` (last): every linear a checkpoint may
    /// hold packed.
    pub fn linears_and_head(&self) -> Vec<&Linear> {
        let mut out = self.linears();
        out.extend(self.language_model.lm_head.as_ref());
        out
    }

    pub fn linears_and_head_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for layer in self.vision_tower.used_layers_mut() {
            out.extend(layer.linears_mut());
        }
        out.extend(self.projector.linears_mut());
        for layer in &mut self.language_model.layers {
            out.extend(layer.linears_mut());
        }
        out.extend(self.language_model.lm_head.as_mut());
        out
    }

    pub fn layer_ids(&self) -> Vec<LayerId> {
        self.linears().iter().map(|l| l.id).collect()
    }

    pub fn linear(&self, id: LayerId) -> Option<&Linear> {
        self.linears().into_iter().find(|l| l.id == id)
    }

    /// `[B, 3, H, W]` pixels → projected image features `[B, N, text_hidden]`.
    pub fn image_features(&self, pixels: &Tensor, hook: &mut dyn LinearHook) -> Tensor {
        let pixels = pixels.to_device(self.device()).to_kind(self.kind());
        let features = self.vision_tower.forward(&pixels, hook);
        self.projector.forward(&features, hook)
    }

    /// Splices image features into token embeddings and left-pads the batch.
    /// `images[b]` holds sequence b's image features `[n_images_b, N, hidden]` (or is empty).
    pub fn prepare(&self, sequences: &[Vec<Piece>], images: &[Tensor]) -> Result<PreparedBatch> {
        let device = self.device();
        let mut rows = Vec::with_capacity(sequences.len());
        for (b, pieces) in sequences.iter().enumerate() {
            let mut parts = Vec::new();
            for piece in pieces {
                match piece {
                    Piece::Tokens(ids) => {
                        let vocab = self.cfg.text.vocab_size;
                        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= vocab) {
                            return Err(Error::Prompt(format!(
                                "token id {bad} is outside the vocabulary of {vocab}"
                            )));
                        }
                        let ids = Tensor::from_slice(ids).to_device(device);
                        parts.push(self.language_model.embed(&ids));
                    }
                    Piece::Image(i) => {
                        let feats = images
                            .get(b)
                            .filter(|t| (*i as i64) < t.size()[0])
                            .ok_or_else(|| {
                                Error::Prompt(format!(
                                    "sequence {b} names image {i} but has no such image features"
                                ))
                            })?;
                        parts.push(feats.get(*i as i64).to_kind(self.kind()));
                    }
                }
            }
            if parts.is_empty() {
                return Err(Error::Prompt(format!("sequence {b} is empty")));
            }
            rows.push(Tensor::cat(&parts, 0));
        }
        Ok(left_pad(&rows, self.cfg.text.hidden_size, self.kind(), device))
    }

    /// Runs the decoder over a prepared batch; returns the final hidden states `[B, T, hidden]`
    /// (before the final norm). With a cache, keys and values are appended to it.
    pub fn decode_hidden(
        &self,
        batch: &PreparedBatch,
        mut cache: Option<&mut KvCache>,
        hook: &mut dyn LinearHook,
    ) -> Tensor {
        let past = cache.as_ref().map_or(0, |c| c.len());
        let key_mask = match cache.as_mut() {
            Some(c) => c.extend_mask(&batch.mask),
            None => batch.mask.shallow_clone(),
        };
        let ctx = DecoderContext::new(
            &self.language_model.cfg,
            &batch.positions,
            &key_mask,
            past,
            self.kind(),
        );
        let mut h = batch.embeds.shallow_clone();
        for layer in &self.language_model.layers {
            h = layer.forward(&h, &ctx, cache.as_deref_mut(), hook);
        }
        h
    }

    /// Logits `[B, T, vocab]` of every position of a prepared batch.
    pub fn logits(&self, batch: &PreparedBatch, hook: &mut dyn LinearHook) -> Tensor {
        let h = self.decode_hidden(batch, None, hook);
        self.language_model.head(&h)
    }

    /// Greedy decoding: prefill, then one token at a time with the KV cache (on `opts.decode`'s
    /// path), until every row produced an EOS, met the stop criterion, or `max_new_tokens` were
    /// generated. Returns the new tokens per row (without EOS) and the logits of the first step.
    pub fn generate(
        &self,
        batch: &PreparedBatch,
        opts: &GenerateOptions,
        hook: &mut dyn LinearHook,
    ) -> Result<Generation> {
        self.generate_after(KvCache::new(self.language_model.layers.len()), batch, opts, hook)
    }

    /// [`Llava::generate`] continuing `cache`: `batch` holds each row's tokens after the cached
    /// positions (its `positions` counting on from them), e.g. the questions after a shared
    /// image prefix whose keys and values were computed once ([`KvCache::select_rows`]).
    pub fn generate_after(
        &self,
        mut cache: KvCache,
        batch: &PreparedBatch,
        opts: &GenerateOptions,
        hook: &mut dyn LinearHook,
    ) -> Result<Generation> {
        opts.decode.check_hook(hook)?;
        let b = batch.embeds.size()[0];
        let lm = &self.language_model;
        let h = self.decode_hidden(batch, Some(&mut cache), hook);
        let first_logits = lm.head(&h.select(1, -1));
        let mut next_pos = batch.positions.select(1, -1) + 1;
        match opts.decode {
            DecodePath::Libtorch => greedy_decode(first_logits, opts, |next| {
                let step = PreparedBatch {
                    embeds: lm.embed(&next.view([b, 1])),
                    mask: Tensor::ones([b, 1], (Kind::Int64, self.device())),
                    positions: next_pos.view([b, 1]),
                };
                let h = self.decode_hidden(&step, Some(&mut cache), hook);
                next_pos += 1;
                Ok(lm.head(&h.select(1, -1)))
            }),
            DecodePath::Fused => greedy_decode_fused(lm, cache, first_logits, next_pos, opts),
        }
    }
}

/// [`greedy_decode`] on the fused decode step ([`DecodePath::Fused`]), continuing the libtorch
/// prefill's `cache` (converted once, then dropped) from each row's `next_pos` `[1]`.
pub(crate) fn greedy_decode_fused(
    lm: &LlamaModel,
    cache: KvCache,
    first_logits: Tensor,
    mut next_pos: Tensor,
    opts: &GenerateOptions,
) -> Result<Generation> {
    let decoder = FusedDecoder::new(lm)?;
    let mut fused = FusedCache::from_kv(&cache, lm.layers.len(), lm.embed_tokens.kind())?;
    drop(cache);
    greedy_decode(first_logits, opts, |next| {
        let h = decoder.step_token(next, &next_pos, &mut fused)?;
        next_pos += 1;
        Ok(lm.head(&h.select(1, -1)))
    })
}

/// Greedy token choice, shared by LLaVA and Qwen2-VL: from the prefill's last logits
/// `[B, vocab]`, `step(next)` runs the decoder on the chosen tokens `[B]` (each row's next
/// position) and returns their logits `[B, vocab]`. A finished row's later tokens are computed
/// (the batch stays rectangular) and dropped.
pub(crate) fn greedy_decode(
    first_logits: Tensor,
    opts: &GenerateOptions,
    mut step: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Generation> {
    let b = first_logits.size()[0] as usize;
    let mut last_logits = first_logits.shallow_clone();
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for _ in 0..opts.max_new_tokens {
        let next = last_logits.argmax(-1, false);
        let ids = Vec::<i64>::try_from(&next.to_device(Device::Cpu))?;
        for (row, &id) in ids.iter().enumerate() {
            if done[row] {
                continue;
            }
            if opts.eos_token_ids.contains(&id) {
                done[row] = true;
            } else {
                out[row].push(id);
                done[row] = opts.stop.is_some_and(|s| s.should_stop(&out[row]));
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        last_logits = step(&next)?;
    }
    Ok(Generation { tokens: out, first_logits })
}

/// Left-pads `[T_b, H]` rows to `[B, T, H]` with a mask and positions.
pub fn left_pad(rows: &[Tensor], hidden: i64, kind: Kind, device: Device) -> PreparedBatch {
    let t = rows.iter().map(|r| r.size()[0]).max().unwrap_or(0);
    let b = rows.len() as i64;
    let embeds = Tensor::zeros([b, t, hidden], (kind, device));
    let mask = Tensor::zeros([b, t], (Kind::Int64, device));
    let mut padded = Vec::with_capacity(rows.len());
    let mut masks = Vec::with_capacity(rows.len());
    for r in rows {
        let len = r.size()[0];
        let pad = Tensor::zeros([t - len, hidden], (kind, device));
        padded.push(Tensor::cat(&[pad, r.to_kind(kind)], 0));
        let m = Tensor::cat(
            &[
                Tensor::zeros([t - len], (Kind::Int64, device)),
                Tensor::ones([len], (Kind::Int64, device)),
            ],
            0,
        );
        masks.push(m);
    }
    let (embeds, mask) = if rows.is_empty() {
        (embeds, mask)
    } else {
        (Tensor::stack(&padded, 0), Tensor::stack(&masks, 0))
    };
    let positions = (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    PreparedBatch { embeds, mask, positions }
}

/// Where the CLIP weights of an original LLaVA checkpoint are.
fn original_clip_dir(dir: &Path, config: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let root = crate::io::config::read_json_object(config)?;
    let source =
        root.get("mm_vision_tower").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    for candidate in [PathBuf::from(&source), dir.join(&source), dir.join("clip")] {
        if candidate.join("config.json").is_file() {
            return Ok(candidate);
        }
    }
    Err(Error::config(
        config,
        "mm_vision_tower",
        format!("`{source}` is not a local CLIP directory; pass its path (--clip DIR / clip_dir)"),
    ))
}

/// A loaded checkpoint with its tokenizer and image processor: everything `generate` needs.
#[derive(Debug)]
pub struct LlavaBundle {
    pub model: Llava,
    pub tokenizer: PromptTokenizer,
    pub images: ImageProcessor,
    pub dir: PathBuf,
}

impl LlavaBundle {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let model = Llava::load(dir, opts)?;
        let files = CheckpointFiles::in_dir(dir);
        let splice = match model.cfg.image_token_id {
            Some(id) => ImageSplice::Token { id, expanded_len: model.cfg.image_feature_len() },
            None => ImageSplice::SplitText,
        };
        let tokenizer =
            PromptTokenizer::from_file(&files.tokenizer, splice, model.cfg.text.bos_token_id)?;
        let images = if files.preprocessor.is_file() {
            ImageProcessor::new(ImageProcessorConfig::from_json(&files.preprocessor)?)
        } else if model.cfg.format == CheckpointFormat::Original {
            // Original LLaVA takes CLIP's processor from the CLIP directory.
            let clip = opts.clip_dir.clone().map(|d| d.join("preprocessor_config.json"));
            match clip.filter(|p| p.is_file()) {
                Some(p) => ImageProcessor::new(ImageProcessorConfig::from_json(&p)?),
                None => ImageProcessor::new(ImageProcessorConfig::clip_default(
                    model.cfg.vision.image_size as u32,
                )),
            }
        } else {
            return Err(Error::io(
                &files.preprocessor,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "preprocessor_config.json is missing",
                ),
            ));
        };
        Ok(Self { model, tokenizer, images, dir: dir.to_path_buf() })
    }

    /// Stops a row once its decoded text contains one of `strings` (LLaVA's
    /// `KeywordsStoppingCriteria`); see [`StopStrings::trim`] for the answer text.
    pub fn stop_strings(&self, strings: Vec<String>) -> StopStrings<'_> {
        StopStrings { tokenizer: &self.tokenizer, strings }
    }

    /// End-of-sequence ids: the config's, else the tokenizer's `</s>`.
    pub fn eos_ids(&self) -> Vec<i64> {
        let mut ids = self.model.cfg.text.eos_token_ids.clone();
        if ids.is_empty() {
            ids.extend(self.tokenizer.token_id("</s>"));
        }
        ids
    }
}

/// Stop strings checked on the decoded new tokens.
pub struct StopStrings<'a> {
    tokenizer: &'a PromptTokenizer,
    pub strings: Vec<String>,
}

impl<'a> StopStrings<'a> {
    pub fn new(tokenizer: &'a PromptTokenizer, strings: Vec<String>) -> Self {
        Self { tokenizer, strings }
    }
}

impl StopStrings<'_> {
    /// The answer text: decoded, cut at the first stop string, trimmed.
    pub fn trim(&self, text: &str) -> String {
        let cut =
            self.strings.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
        text[..cut].trim().to_string()
    }
}

impl StopCriterion for StopStrings<'_> {
    fn should_stop(&self, new_tokens: &[i64]) -> bool {
        if self.strings.is_empty() {
            return false;
        }
        let text = self.tokenizer.decode(new_tokens, false).unwrap_or_default();
        self.strings.iter().any(|s| text.contains(s.as_str()))
    }
}
