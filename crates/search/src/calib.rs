//! Calibration data and the block-by-block pipeline the searches run on: block inputs are
//! cached at one boundary at a time (as GPTQ and AWQ do), so peak memory is one block's
//! activations rather than the whole model's.

use std::collections::BTreeMap;

use qvlm_core::hook::LinearHook;
use qvlm_core::io::prompt::Piece;
use qvlm_core::layer_id::LayerId;
use qvlm_core::model::llama::DecoderContext;
use qvlm_core::model::llava::Llava;
use tch::{Kind, Tensor};

use crate::error::{Result, SearchError};
use crate::site::Block;

/// Calibration pairs: images, prompts (with the image placeholder) and, for objectives that need
/// them (VEO's L_reg), the answer tokens that follow each prompt.
#[derive(Debug)]
pub struct CalibrationSet {
    /// `[N, 3, H, W]` preprocessed pixels, one image per sample.
    pub pixels: Tensor,
    /// Prompt pieces per sample (one image slot each).
    pub prompts: Vec<Vec<Piece>>,
    /// Answer tokens per sample (appended after the prompt for L_reg), possibly empty.
    pub answers: Vec<Vec<i64>>,
}

impl CalibrationSet {
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.pixels.size().first().copied().unwrap_or(0) as usize;
        if self.is_empty() {
            return Err(SearchError::Calibration("no calibration samples".into()));
        }
        if n != self.prompts.len() || n != self.answers.len() {
            return Err(SearchError::Calibration(format!(
                "{n} images but {} prompts and {} answers",
                self.prompts.len(),
                self.answers.len()
            )));
        }
        Ok(())
    }

    /// Non-finite pixel values (NaN, ±inf), replaced by [`CalibrationSet::sanitized`].
    pub fn nonfinite_pixels(&self) -> u64 {
        self.pixels.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]) as u64
    }

    /// The set with non-finite pixels replaced (NaN → 0, ±inf → ±f32::MAX, then clamped to
    /// ±1e4 so one bad pixel cannot dominate a range).
    pub fn sanitized(&self) -> CalibrationSet {
        CalibrationSet {
            pixels: qvlm_core::quant::uniform::finite(&self.pixels).clamp(-1e4, 1e4),
            prompts: self.prompts.clone(),
            answers: self.answers.clone(),
        }
    }

    /// Samples `range` as a new set (shallow tensor views).
    pub fn slice(&self, start: usize, len: usize) -> CalibrationSet {
        CalibrationSet {
            pixels: self.pixels.narrow(0, start as i64, len as i64),
            prompts: self.prompts[start..start + len].to_vec(),
            answers: self.answers[start..start + len].to_vec(),
        }
    }
}

/// Runs a model one block at a time on calibration data. The model is passed to each call (the
/// searches swap quantized weights in and out between runs).
pub struct Pipeline<'c> {
    calib: &'c CalibrationSet,
    /// Built when the projector block first runs (depends on the prompt lengths only).
    ctx: Option<DecoderContext>,
    /// `[B, T]` 1 for real tokens of the decoder's input (padding excluded from statistics).
    mask: Option<Tensor>,
}

impl std::fmt::Debug for Pipeline<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pipeline({} samples)", self.calib.len())
    }
}

impl<'c> Pipeline<'c> {
    pub fn new(calib: &'c CalibrationSet) -> Result<Self> {
        calib.validate()?;
        Ok(Self { calib, ctx: None, mask: None })
    }

    pub fn calib(&self) -> &CalibrationSet {
        self.calib
    }

    /// The input of the first block: embeddings + pre-layernorm of the images.
    pub fn initial_input(&self, model: &Llava) -> Tensor {
        let pixels = self.calib.pixels.to_device(model.device()).to_kind(model.kind());
        model.vision_tower.embed(&pixels)
    }

    /// Runs `block` on `input` (the previous block's output) with `hook`; the projector block
    /// returns the decoder's input embeddings.
    pub fn run_block(
        &mut self,
        model: &Llava,
        block: Block,
        input: &Tensor,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        Ok(match block {
            Block::Vision(i) => model.vision_tower.used_layers()[i].forward(input, hook),
            Block::Projector => {
                let features = model.projector.forward(&model.vision_tower.select(input), hook);
                let images: Vec<Tensor> =
                    (0..features.size()[0]).map(|b| features.narrow(0, b, 1)).collect();
                let batch = model.prepare(&self.calib.prompts, &images)?;
                if self.ctx.is_none() {
                    self.ctx = Some(DecoderContext::new(
                        &model.language_model.cfg,
                        &batch.positions,
                        &batch.mask,
                        0,
                        model.kind(),
                    ));
                    self.mask = Some(batch.mask.shallow_clone());
                }
                batch.embeds
            }
            Block::Language(i) => {
                let ctx = self.ctx.as_ref().ok_or_else(|| {
                    SearchError::Calibration("language block run before the projector".into())
                })?;
                model.language_model.layers[i].forward(input, ctx, None, hook)
            }
        })
    }

    /// The decoder context (mask, RoPE) once the projector block has run.
    pub fn decoder_context(&self) -> Option<&DecoderContext> {
        self.ctx.as_ref()
    }

    /// Flat indices of the real (non-padding) rows of a `[B, T, C]` decoder input.
    pub fn real_rows(&self, block: Block) -> Option<Tensor> {
        match block {
            Block::Language(_) => {
                self.mask.as_ref().map(|m| m.reshape([-1]).nonzero().squeeze_dim(1))
            }
            _ => None,
        }
    }
}

/// A hook that records the (pre-quantization) input of chosen layers and then passes the input
/// to an inner hook. Non-finite values in a captured input are counted and replaced (NaN → 0,
/// ±inf → ±f32::MAX) in the copy the search sees, so statistics and objectives stay finite.
pub struct Capture<'h> {
    pub inner: &'h mut dyn LinearHook,
    pub wanted: Vec<LayerId>,
    pub captured: BTreeMap<LayerId, Tensor>,
    pub nonfinite: u64,
}

impl<'h> Capture<'h> {
    pub fn new(inner: &'h mut dyn LinearHook, wanted: Vec<LayerId>) -> Self {
        Self { inner, wanted, captured: BTreeMap::new(), nonfinite: 0 }
    }
}

impl LinearHook for Capture<'_> {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        if self.wanted.contains(&id) {
            let bad = x.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
            let copy = if bad > 0 {
                self.nonfinite += bad as u64;
                qvlm_core::quant::uniform::finite(&x.detach()).to_kind(x.kind())
            } else {
                x.detach()
            };
            self.captured.insert(id, copy);
        }
        self.inner.input(id, x)
    }
}

/// Rows `[N, C]` of a site input `[.., C]` (f32).
pub fn rows(x: &Tensor) -> Tensor {
    let c = *x.size().last().unwrap_or(&1);
    x.reshape([-1, c]).to_kind(Kind::Float)
}
