//! Calibration data, and the hook that captures site inputs as the block-by-block pipeline
//! ([`crate::model::Pipeline`]) runs.

use std::collections::BTreeMap;

use qvlm_core::hook::LinearHook;
use qvlm_core::io::prompt::Piece;
use qvlm_core::layer_id::LayerId;
use qvlm_core::model::qwen2_vl::GridThw;
use tch::{Kind, Tensor};

use crate::error::{Result, SearchError};

/// Calibration pairs: images, prompts (with the image placeholder) and, for objectives that need
/// them (VEO's L_reg), the answer tokens that follow each prompt.
#[derive(Debug)]
pub struct CalibrationSet {
    /// Preprocessed pixels, one image per sample: `[N, 3, H, W]` for LLaVA; for Qwen2-VL the
    /// samples' patches one after the other, `[Σ patches, patch_len]`, with `grids`.
    pub pixels: Tensor,
    /// Qwen2-VL: each sample's patch grid `(t, h, w)`; empty for LLaVA.
    pub grids: Vec<GridThw>,
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
        let n = if self.grids.is_empty() {
            self.pixels.size().first().copied().unwrap_or(0) as usize
        } else {
            let patches: i64 = self.grids.iter().map(|g| g.iter().product::<i64>()).sum();
            let have = self.pixels.size().first().copied().unwrap_or(0);
            if have != patches {
                return Err(SearchError::Calibration(format!(
                    "the grids hold {patches} patches but the pixels {have}"
                )));
            }
            self.grids.len()
        };
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
            grids: self.grids.clone(),
            prompts: self.prompts.clone(),
            answers: self.answers.clone(),
        }
    }

    /// Samples `range` as a new set (shallow tensor views).
    pub fn slice(&self, start: usize, len: usize) -> CalibrationSet {
        let patches = |g: &[GridThw]| g.iter().map(|g| g.iter().product::<i64>()).sum::<i64>();
        let pixels = if self.grids.is_empty() {
            self.pixels.narrow(0, start as i64, len as i64)
        } else {
            let first = patches(&self.grids[..start]);
            self.pixels.narrow(0, first, patches(&self.grids[start..start + len]))
        };
        CalibrationSet {
            pixels,
            grids: if self.grids.is_empty() {
                vec![]
            } else {
                self.grids[start..start + len].to_vec()
            },
            prompts: self.prompts[start..start + len].to_vec(),
            answers: self.answers[start..start + len].to_vec(),
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
