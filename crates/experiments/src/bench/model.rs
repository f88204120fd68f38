//! The model a bench row times: LLaVA (CLIP tower, projector, LLaMA decoder) or Qwen2-VL (its ViT,
//! patch merger, Qwen2 decoder with M-RoPE), built with random weights. Both decode through the
//! same [`LlamaModel`] layers; what differs is how a prompt (with or without an image) reaches
//! them and where a decode step's positions come from.

use anyhow::{Context, Result};
use qvlm_core::hook::NoHook;
use qvlm_core::io::prompt::Piece;
use qvlm_core::model::linear::Linear;
use qvlm_core::model::llama::{KvCache, LlamaModel};
use qvlm_core::model::llava::{Llava, PreparedBatch};
use qvlm_core::model::qwen2_vl::{Qwen2Vl, Qwen2VlPrompt};
use tch::{Device, Kind, Tensor};

/// A built model of either family.
#[derive(Debug)]
pub enum BenchModel {
    Llava(Box<Llava>),
    Qwen2Vl(Box<Qwen2Vl>),
}

/// One image's tokens for the decoder, and where they go.
#[derive(Debug)]
pub struct ImageInput {
    /// LLaVA: projected features `[1, N, hidden]`; Qwen2-VL: merged tokens `[N, hidden]`.
    tokens: Tensor,
    /// Qwen2-VL: the image's grid (M-RoPE needs it).
    grid: Option<[i64; 3]>,
}

/// What a prefill left for decoding.
#[derive(Debug)]
pub struct Prefilled {
    /// Final hidden states `[1, T, hidden]` (before the final norm).
    pub hidden: Tensor,
    /// Positions the prefill ran through the decoder.
    pub positions: i64,
    /// `[1]`: the first decode step's position.
    pub next_position: Tensor,
}

impl BenchModel {
    pub fn language_model(&self) -> &LlamaModel {
        match self {
            BenchModel::Llava(m) => &m.language_model,
            BenchModel::Qwen2Vl(m) => &m.language_model,
        }
    }

    pub fn device(&self) -> Device {
        self.language_model().embed_tokens.device()
    }

    pub fn kind(&self) -> Kind {
        self.language_model().embed_tokens.kind()
    }

    /// Every linear of the vision side, the projector/merger and the decoder, then `lm_head`.
    pub fn linears_and_head(&self) -> Vec<&Linear> {
        match self {
            BenchModel::Llava(m) => m.linears_and_head(),
            BenchModel::Qwen2Vl(m) => m.linears_and_head(),
        }
    }

    pub fn linears_and_head_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            BenchModel::Llava(m) => m.linears_and_head_mut(),
            BenchModel::Qwen2Vl(m) => m.linears_and_head_mut(),
        }
    }

    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            BenchModel::Llava(m) => m.named_tensors(),
            BenchModel::Qwen2Vl(m) => m.named_tensors(),
        }
    }

    /// Token ids the prompt may hold: Qwen2-VL's image and video placeholders are not text.
    pub fn is_text_token(&self, id: i64) -> bool {
        match self {
            BenchModel::Llava(_) => true,
            BenchModel::Qwen2Vl(m) => id != m.cfg.image_token_id && id != m.cfg.video_token_id,
        }
    }

    /// One random image through the vision side: LLaVA's square image of the tower's size;
    /// Qwen2-VL's image of `image_side`² pixels, as the image processor's patches.
    pub fn random_image(&self, image_side: i64) -> Result<ImageInput> {
        let device = self.device();
        match self {
            BenchModel::Llava(m) => {
                let s = m.cfg.vision.image_size;
                let pixels = Tensor::randn([1, 3, s, s], (m.kind(), device));
                Ok(ImageInput { tokens: m.image_features(&pixels, &mut NoHook), grid: None })
            }
            BenchModel::Qwen2Vl(m) => {
                let side = image_side / m.cfg.vision.patch_size;
                let grid = [1, side, side];
                let pixels =
                    Tensor::randn([side * side, m.cfg.vision.patch_len()], (m.kind(), device));
                let tokens = m.image_tokens(&pixels, &[grid], &mut NoHook)?;
                Ok(ImageInput { tokens, grid: Some(grid) })
            }
        }
    }

    /// The prompt `ids` (with `image` between its halves) through the decoder into `cache`.
    pub fn prefill(
        &self,
        ids: &[i64],
        image: Option<&ImageInput>,
        cache: Option<&mut KvCache>,
    ) -> Result<Prefilled> {
        let half = ids.len() / 2;
        match self {
            BenchModel::Llava(m) => {
                let (pieces, images) = match image {
                    Some(img) => (
                        vec![
                            Piece::Tokens(ids[..half].to_vec()),
                            Piece::Image(0),
                            Piece::Tokens(ids[half..].to_vec()),
                        ],
                        vec![img.tokens.shallow_clone()],
                    ),
                    None => (vec![Piece::Tokens(ids.to_vec())], Vec::new()),
                };
                let batch = m.prepare(&[pieces], &images).context("preparing the prompt")?;
                let hidden = m.decode_hidden(&batch, cache, &mut NoHook);
                Ok(Prefilled {
                    positions: batch.embeds.size()[1],
                    next_position: batch.positions.select(1, -1) + 1,
                    hidden,
                })
            }
            BenchModel::Qwen2Vl(m) => {
                let mut prompt_ids = ids[..half].to_vec();
                let grids: Vec<[i64; 3]> = image.and_then(|i| i.grid).into_iter().collect();
                if let Some(img) = image {
                    let n = img.tokens.size()[0] as usize;
                    prompt_ids.extend(std::iter::repeat_n(m.cfg.image_token_id, n));
                }
                prompt_ids.extend_from_slice(&ids[half..]);
                let prompt = Qwen2VlPrompt {
                    ids: &prompt_ids,
                    grids: &grids,
                    image_tokens: image.map(|i| &i.tokens),
                };
                let batch = m.prepare(&[prompt]).context("preparing the prompt")?;
                let hidden = m.decode_hidden(
                    &batch.embeds,
                    &batch.mask,
                    &batch.positions,
                    cache,
                    &mut NoHook,
                )?;
                Ok(Prefilled {
                    positions: batch.embeds.size()[1],
                    next_position: batch.next_positions.shallow_clone(),
                    hidden,
                })
            }
        }
    }

    /// One decode step: token `next` `[1]` at `position` `[1]` → final hidden `[1, 1, hidden]`.
    pub fn decode(&self, next: &Tensor, position: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let device = self.device();
        let embeds = self.language_model().embed(&next.view([1, 1]));
        let mask = Tensor::ones([1, 1], (Kind::Int64, device));
        match self {
            BenchModel::Llava(m) => {
                let batch = PreparedBatch { embeds, mask, positions: position.view([1, 1]) };
                Ok(m.decode_hidden(&batch, Some(cache), &mut NoHook))
            }
            BenchModel::Qwen2Vl(m) => {
                // A generated token is text: the same position in all three M-RoPE components.
                let positions = position.view([1, 1, 1]).expand([3, 1, 1], true);
                Ok(m.decode_hidden(&embeds, &mask, &positions, Some(cache), &mut NoHook)?)
            }
        }
    }
}
