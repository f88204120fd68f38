//! What a search needs of a vision-language model, LLaVA and Qwen2-VL / Qwen2.5-VL alike: its
//! quantizable linears, its sites and blocks in execution order, one block at a time over
//! calibration data (the walk every strategy shares, [`Pipeline`]: block inputs are cached at one
//! boundary at a time, as GPTQ and AWQ do, so peak memory is one block's activations rather than
//! the whole model's), and the whole forward pass VEO trains through. Strategies, plans and the
//! engine see a model only through [`SearchModel`].

use qvlm_core::hook::LinearHook;
use qvlm_core::io::prompt::Piece;
use qvlm_core::layer_id::{LayerId, Slot};
use qvlm_core::model::linear::Linear;
use qvlm_core::model::llama::DecoderContext;
use qvlm_core::model::llava::Llava;
use qvlm_core::model::qwen2_vl::{GridThw, Qwen2Vl, Qwen2VlPrompt, VisionMlp, VisionPass};
use qvlm_core::model::rotation::{rotate, rotate_qwen2_vl, RotationSpec};
use tch::{Device, Kind, Tensor};

use crate::calib::CalibrationSet;
use crate::error::{Result, SearchError};
use crate::site::{Block, Site};

/// The state one pass over a calibration set builds as it goes: the vision pass (Qwen2-VL's
/// rotary angles and attention chunks), then, once the projector block has run, the decoder's
/// context (mask, rotary) and its padding mask.
#[derive(Debug, Default)]
pub struct PassState {
    vision: Option<VisionPass>,
    pub(crate) decoder: Option<DecoderContext>,
    /// `[B, T]` 1 for real tokens of the decoder's input.
    pub(crate) mask: Option<Tensor>,
}

/// One calibration batch through the whole model ([`SearchModel::forward_hidden`]).
#[derive(Debug)]
pub struct WholePass {
    /// The decoder's final hidden states (before the final norm and head) `[B, T, hidden]`.
    pub hidden: Tensor,
    /// The vision tower's output (LLaVA: the selected layer's features; Qwen2-VL: the last
    /// block's patches), the reference of VEO's vision error term.
    pub vision: Tensor,
    /// `[B, T]` 1 for real tokens (left padding).
    pub mask: Tensor,
}

/// A vision-language model as the searches see it.
pub trait SearchModel {
    /// `llava`, `qwen2_vl`: named in errors.
    fn family(&self) -> &'static str;
    fn device(&self) -> Device;
    fn kind(&self) -> Kind;
    /// Every quantizable linear in execution order (no `lm_head`).
    fn linears(&self) -> Vec<&Linear>;
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    /// The activation sites in execution order.
    fn sites(&self) -> Vec<Site>;
    /// The blocks in execution order.
    fn blocks(&self) -> Vec<Block>;
    /// Every weight under its canonical name (quantized layers: their dequantized weight).
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
    /// The identity of the weights (`weights_sha256` of the model).
    fn weights_sha256(&self) -> Result<String>;
    /// The rotation the weights carry, if any.
    fn rotation(&self) -> Option<&RotationSpec>;
    /// Rotates the model (QuaRot-style); an error where the family has no rotation.
    fn rotate(&mut self, spec: &RotationSpec) -> Result<()>;
    /// The first block's input for `calib`.
    fn begin_pass(&self, calib: &CalibrationSet, pass: &mut PassState) -> Result<Tensor>;
    /// Runs `block` on `input` (the previous block's output); the projector block returns the
    /// decoder's input embeddings and sets the pass's decoder context.
    fn run_block(
        &self,
        calib: &CalibrationSet,
        pass: &mut PassState,
        block: Block,
        input: &Tensor,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor>;
    /// `calib`'s images and `sequences` (one per sample, with its image slot) through the whole
    /// model; with `track_pixels` the pixels require grad, so that every activation is on the
    /// autograd graph.
    fn forward_hidden(
        &self,
        calib: &CalibrationSet,
        sequences: &[Vec<Piece>],
        hook: &mut dyn LinearHook,
        track_pixels: bool,
    ) -> Result<WholePass>;
    /// Final norm and head on hidden states.
    fn head(&self, hidden: &Tensor) -> Tensor;
}

/// A site: its consumers' slots in one block, the input width.
fn site(block: Block, slots: &[Slot], width: i64) -> Site {
    let tower = block.tower();
    let index = match block {
        Block::Vision(i) | Block::Language(i) => i as u32,
        Block::Projector => 0,
    };
    let consumers: Vec<LayerId> = slots.iter().map(|&s| LayerId::new(tower, index, s)).collect();
    Site { id: consumers[0], consumers, block, width }
}

/// Every family's blocks: `vision` vision blocks, the projector (or merger), `language` decoder
/// layers.
fn blocks(vision: usize, language: usize) -> Vec<Block> {
    let mut out: Vec<Block> = (0..vision).map(Block::Vision).collect();
    out.push(Block::Projector);
    out.extend((0..language).map(Block::Language));
    out
}

/// The LLaMA decoder's sites (LLaVA's and Qwen2's).
fn decoder_sites(cfg: &qvlm_core::io::config::LlamaConfig, layers: usize, out: &mut Vec<Site>) {
    for i in 0..layers {
        let b = Block::Language(i);
        out.push(site(b, &[Slot::QProj, Slot::KProj, Slot::VProj], cfg.hidden_size));
        out.push(site(b, &[Slot::OProj], cfg.num_attention_heads * cfg.head_dim));
        out.push(site(b, &[Slot::GateProj, Slot::UpProj], cfg.hidden_size));
        out.push(site(b, &[Slot::DownProj], cfg.intermediate_size));
    }
}

/// The calibration sequences with each sample's answer appended (VEO's L_reg).
pub fn with_answers(calib: &CalibrationSet) -> Vec<Vec<Piece>> {
    calib
        .prompts
        .iter()
        .zip(&calib.answers)
        .map(|(p, a)| {
            let mut p = p.clone();
            if !a.is_empty() {
                p.push(Piece::Tokens(a.clone()));
            }
            p
        })
        .collect()
}

impl SearchModel for Llava {
    fn family(&self) -> &'static str {
        "llava"
    }

    fn device(&self) -> Device {
        Llava::device(self)
    }

    fn kind(&self) -> Kind {
        Llava::kind(self)
    }

    fn linears(&self) -> Vec<&Linear> {
        Llava::linears(self)
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        Llava::linears_mut(self)
    }

    fn sites(&self) -> Vec<Site> {
        let mut out = Vec::new();
        let v = &self.cfg.vision;
        for i in 0..self.vision_tower.used_layers().len() {
            let b = Block::Vision(i);
            out.push(site(b, &[Slot::QProj, Slot::KProj, Slot::VProj], v.hidden_size));
            out.push(site(b, &[Slot::OutProj], v.hidden_size));
            out.push(site(b, &[Slot::Fc1], v.hidden_size));
            out.push(site(b, &[Slot::Fc2], v.intermediate_size));
        }
        out.push(site(Block::Projector, &[Slot::Linear1], v.hidden_size));
        if self.projector.linear_2.is_some() {
            out.push(site(Block::Projector, &[Slot::Linear2], self.cfg.text.hidden_size));
        }
        decoder_sites(&self.cfg.text, self.language_model.layers.len(), &mut out);
        out
    }

    fn blocks(&self) -> Vec<Block> {
        blocks(self.vision_tower.used_layers().len(), self.language_model.layers.len())
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        Llava::named_tensors(self)
    }

    fn weights_sha256(&self) -> Result<String> {
        Ok(Llava::weights_sha256(self)?)
    }

    fn rotation(&self) -> Option<&RotationSpec> {
        self.rotation.as_ref()
    }

    fn rotate(&mut self, spec: &RotationSpec) -> Result<()> {
        Ok(rotate(self, spec)?)
    }

    fn begin_pass(&self, calib: &CalibrationSet, _pass: &mut PassState) -> Result<Tensor> {
        square_images(calib, "llava")?;
        let pixels = calib.pixels.to_device(self.device()).to_kind(self.kind());
        Ok(self.vision_tower.embed(&pixels))
    }

    fn run_block(
        &self,
        calib: &CalibrationSet,
        pass: &mut PassState,
        block: Block,
        input: &Tensor,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        Ok(match block {
            Block::Vision(i) => self.vision_tower.used_layers()[i].forward(input, hook),
            Block::Projector => {
                let features = self.projector.forward(&self.vision_tower.select(input), hook);
                let images: Vec<Tensor> =
                    (0..features.size()[0]).map(|b| features.narrow(0, b, 1)).collect();
                let batch = self.prepare(&calib.prompts, &images)?;
                if pass.decoder.is_none() {
                    pass.decoder = Some(DecoderContext::new(
                        &self.language_model.cfg,
                        &batch.positions,
                        &batch.mask,
                        0,
                        self.kind(),
                    ));
                    pass.mask = Some(batch.mask.shallow_clone());
                }
                batch.embeds
            }
            Block::Language(i) => {
                let ctx = decoder_context(pass)?;
                self.language_model.layers[i].forward(input, ctx, None, hook)
            }
        })
    }

    fn forward_hidden(
        &self,
        calib: &CalibrationSet,
        sequences: &[Vec<Piece>],
        hook: &mut dyn LinearHook,
        track_pixels: bool,
    ) -> Result<WholePass> {
        square_images(calib, "llava")?;
        let pixels = calib.pixels.to_device(self.device()).to_kind(self.kind());
        let pixels = if track_pixels { pixels.detach().set_requires_grad(true) } else { pixels };
        let vision = self.vision_tower.forward(&pixels, hook);
        let features = self.projector.forward(&vision, hook);
        let images: Vec<Tensor> =
            (0..features.size()[0]).map(|b| features.narrow(0, b, 1)).collect();
        let batch = self.prepare(sequences, &images)?;
        let hidden = self.decode_hidden(&batch, None, hook);
        Ok(WholePass { hidden, vision, mask: batch.mask })
    }

    fn head(&self, hidden: &Tensor) -> Tensor {
        self.language_model.head(hidden)
    }
}

fn decoder_context(pass: &PassState) -> Result<&DecoderContext> {
    pass.decoder
        .as_ref()
        .ok_or_else(|| SearchError::Calibration("language block run before the projector".into()))
}

/// An error unless `calib` holds square images `[N, 3, H, W]` (LLaVA's), not patches.
fn square_images(calib: &CalibrationSet, family: &str) -> Result<()> {
    if !calib.grids.is_empty() || calib.pixels.dim() != 4 {
        return Err(SearchError::Calibration(format!(
            "{family} takes images [N, 3, H, W]; the calibration set holds {:?} pixels with {} \
             patch grids (a Qwen2-VL set)",
            calib.pixels.size(),
            calib.grids.len()
        )));
    }
    Ok(())
}

impl SearchModel for Qwen2Vl {
    fn family(&self) -> &'static str {
        "qwen2_vl"
    }

    fn device(&self) -> Device {
        Qwen2Vl::device(self)
    }

    fn kind(&self) -> Kind {
        Qwen2Vl::kind(self)
    }

    fn linears(&self) -> Vec<&Linear> {
        Qwen2Vl::linears(self)
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        Qwen2Vl::linears_mut(self)
    }

    /// Per vision block: `qkv`, `proj`, then `fc1`, `fc2` (Qwen2-VL) or `gate_proj` + `up_proj`,
    /// `down_proj` (Qwen2.5-VL); the merger's two linears (`projector.0.linear_1/2`, its first
    /// input is `merge²` patches side by side); the decoder's four per layer.
    fn sites(&self) -> Vec<Site> {
        let mut out = Vec::new();
        let v = &self.cfg.vision;
        for (i, b) in self.visual.blocks.iter().enumerate() {
            let block = Block::Vision(i);
            out.push(site(block, &[Slot::Qkv], v.embed_dim));
            out.push(site(block, &[Slot::Proj], v.embed_dim));
            match &b.mlp {
                VisionMlp::Plain { .. } => {
                    out.push(site(block, &[Slot::Fc1], v.embed_dim));
                    out.push(site(block, &[Slot::Fc2], v.intermediate_size));
                }
                VisionMlp::Gated { .. } => {
                    out.push(site(block, &[Slot::GateProj, Slot::UpProj], v.embed_dim));
                    out.push(site(block, &[Slot::DownProj], v.intermediate_size));
                }
            }
        }
        let merged = v.embed_dim * v.spatial_merge_size * v.spatial_merge_size;
        out.push(site(Block::Projector, &[Slot::Linear1], merged));
        out.push(site(Block::Projector, &[Slot::Linear2], merged));
        decoder_sites(&self.cfg.text, self.language_model.layers.len(), &mut out);
        out
    }

    fn blocks(&self) -> Vec<Block> {
        blocks(self.visual.blocks.len(), self.language_model.layers.len())
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        Qwen2Vl::named_tensors(self)
    }

    fn weights_sha256(&self) -> Result<String> {
        Ok(Qwen2Vl::weights_sha256(self)?)
    }

    fn rotation(&self) -> Option<&RotationSpec> {
        self.rotation.as_ref()
    }

    fn rotate(&mut self, spec: &RotationSpec) -> Result<()> {
        Ok(rotate_qwen2_vl(self, spec)?)
    }

    fn begin_pass(&self, calib: &CalibrationSet, pass: &mut PassState) -> Result<Tensor> {
        let pixels = qwen_pixels(self, calib)?;
        let (x, vision) = self.visual.begin(&pixels, &calib.grids)?;
        pass.vision = Some(vision);
        Ok(x)
    }

    fn run_block(
        &self,
        calib: &CalibrationSet,
        pass: &mut PassState,
        block: Block,
        input: &Tensor,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        let vision = || {
            pass.vision.as_ref().ok_or_else(|| {
                SearchError::Calibration("a vision block run before the pass began".into())
            })
        };
        Ok(match block {
            Block::Vision(i) => self.visual.run_block(i, input, vision()?, hook),
            Block::Projector => {
                let merged = self.visual.finish(input, vision()?, hook).merged;
                let (embeds, ctx, mask) = qwen_prepare(self, calib, &calib.prompts, &merged)?;
                if pass.decoder.is_none() {
                    pass.decoder = Some(ctx);
                    pass.mask = Some(mask);
                }
                embeds
            }
            Block::Language(i) => {
                let ctx = decoder_context(pass)?;
                self.language_model.layers[i].forward(input, ctx, None, hook)
            }
        })
    }

    fn forward_hidden(
        &self,
        calib: &CalibrationSet,
        sequences: &[Vec<Piece>],
        hook: &mut dyn LinearHook,
        track_pixels: bool,
    ) -> Result<WholePass> {
        let pixels = qwen_pixels(self, calib)?;
        let pixels = if track_pixels { pixels.detach().set_requires_grad(true) } else { pixels };
        let out = self.visual.forward(&pixels, &calib.grids, hook)?;
        let (embeds, ctx, mask) = qwen_prepare(self, calib, sequences, &out.merged)?;
        let mut h = embeds;
        for layer in &self.language_model.layers {
            h = layer.forward(&h, &ctx, None, hook);
        }
        Ok(WholePass { hidden: h, vision: out.hidden, mask })
    }

    fn head(&self, hidden: &Tensor) -> Tensor {
        self.language_model.head(hidden)
    }
}

/// `calib`'s patches on the model's device and dtype; an error unless they are patches with one
/// grid per sample.
fn qwen_pixels(model: &Qwen2Vl, calib: &CalibrationSet) -> Result<Tensor> {
    if calib.grids.len() != calib.len() || calib.pixels.dim() != 2 {
        return Err(SearchError::Calibration(format!(
            "Qwen2-VL takes each sample's patches [patches, {}] with its grid; the calibration \
             set holds {:?} pixels with {} grids for {} samples (a LLaVA set?)",
            model.cfg.vision.patch_len(),
            calib.pixels.size(),
            calib.grids.len(),
            calib.len()
        )));
    }
    Ok(calib.pixels.to_device(model.device()).to_kind(model.kind()))
}

/// Each sample's pieces as ids (its image slot expanded to one `<|image_pad|>` per merged
/// token), its image tokens at the placeholders, M-RoPE positions, left padding: the decoder's
/// input embeddings, its context and its mask.
fn qwen_prepare(
    model: &Qwen2Vl,
    calib: &CalibrationSet,
    sequences: &[Vec<Piece>],
    merged: &Tensor,
) -> Result<(Tensor, DecoderContext, Tensor)> {
    let m2 = model.cfg.vision.spatial_merge_size * model.cfg.vision.spatial_merge_size;
    let counts: Vec<i64> = calib.grids.iter().map(|g| g.iter().product::<i64>() / m2).collect();
    let mut ids = Vec::with_capacity(sequences.len());
    for (b, pieces) in sequences.iter().enumerate() {
        let mut row = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Tokens(t) => row.extend_from_slice(t),
                Piece::Image(0) => {
                    row.extend(std::iter::repeat_n(model.cfg.image_token_id, counts[b] as usize))
                }
                Piece::Image(k) => {
                    return Err(SearchError::Calibration(format!(
                        "sample {b}: image slot {k}; a calibration sample holds one image"
                    )))
                }
            }
        }
        ids.push(row);
    }
    let mut tokens = Vec::with_capacity(counts.len());
    let mut start = 0;
    for &n in &counts {
        tokens.push(merged.narrow(0, start, n));
        start += n;
    }
    let grids: Vec<[GridThw; 1]> = calib.grids.iter().map(|g| [*g]).collect();
    let prompts: Vec<Qwen2VlPrompt<'_>> = ids
        .iter()
        .zip(&grids)
        .zip(&tokens)
        .map(|((ids, grid), t)| Qwen2VlPrompt { ids, grids: grid, image_tokens: Some(t) })
        .collect();
    let batch = model.prepare(&prompts)?;
    let ctx = DecoderContext::multimodal(
        &model.language_model.cfg,
        &batch.positions,
        &batch.mask,
        0,
        model.kind(),
    )?;
    Ok((batch.embeds, ctx, batch.mask))
}

/// Runs a model one block at a time on calibration data. The model is passed to each call (the
/// searches swap quantized weights in and out between runs).
pub struct Pipeline<'c> {
    calib: &'c CalibrationSet,
    /// Built as the blocks run (the vision pass, then the decoder's context once the projector
    /// block has run: it depends on the prompt lengths only).
    pass: PassState,
}

impl std::fmt::Debug for Pipeline<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pipeline({} samples)", self.calib.len())
    }
}

impl<'c> Pipeline<'c> {
    pub fn new(calib: &'c CalibrationSet) -> Result<Self> {
        calib.validate()?;
        Ok(Self { calib, pass: PassState::default() })
    }

    pub fn calib(&self) -> &CalibrationSet {
        self.calib
    }

    /// The input of the first block (LLaVA: embeddings + pre-layernorm of the images; Qwen2-VL:
    /// the patch embedding).
    pub fn initial_input(&mut self, model: &dyn SearchModel) -> Result<Tensor> {
        model.begin_pass(self.calib, &mut self.pass)
    }

    /// Runs `block` on `input` (the previous block's output) with `hook`; the projector block
    /// returns the decoder's input embeddings.
    pub fn run_block(
        &mut self,
        model: &dyn SearchModel,
        block: Block,
        input: &Tensor,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        model.run_block(self.calib, &mut self.pass, block, input, hook)
    }

    /// The decoder context (mask, RoPE) once the projector block has run.
    pub fn decoder_context(&self) -> Option<&DecoderContext> {
        self.pass.decoder.as_ref()
    }

    /// Flat indices of the real (non-padding) rows of a `[B, T, C]` decoder input.
    pub fn real_rows(&self, block: Block) -> Option<Tensor> {
        match block {
            Block::Language(_) => {
                self.pass.mask.as_ref().map(|m| m.reshape([-1]).nonzero().squeeze_dim(1))
            }
            _ => None,
        }
    }
}
