//! Qwen2-VL and Qwen2.5-VL as transformers 5.24 runs them
//! (`models/qwen2_vl/modeling_qwen2_vl.py`, `models/qwen2_5_vl/modeling_qwen2_5_vl.py`,
//! <https://github.com/huggingface/transformers/blob/v5.0.0/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py>).
//!
//! The vision tower: patches of `temporal_patch_size × patch_size²` pixels embedded by one linear
//! map (the checkpoint's `Conv3d` with stride = kernel, the same products), pre-norm ViT blocks
//! with a fused `qkv` linear and a 2-D ("axial") rotary position on every query and key, no class
//! token and no absolute position embedding; then the merger concatenates each
//! `spatial_merge_size²` neighbouring patches (adjacent in the image processor's patch order) and
//! maps them to the language model's width. Qwen2-VL's blocks use LayerNorm, `fc1 → act → fc2` and
//! attend within each image; Qwen2.5-VL's use RMSNorm, a SwiGLU MLP, and attend within windows of
//! merge blocks except in its full-attention blocks (the merge blocks are put in window order
//! first and back in order at the end, [`window_order`]).
//!
//! The number of patches varies with the image (dynamic resolution): `forward` takes the image
//! processor's flattened patches of any number of images and each image's `(t, h, w)` grid.
//!
//! The patches come from [`crate::io::qwen2_image::Qwen2ImageProcessor`]. The whole model,
//! [`Qwen2Vl`] (either generation), places the merged image tokens at the prompt's
//! `<|image_pad|>` placeholders and runs the Qwen2 language model (the LLaMA decoder of
//! [`crate::model::llama`] with a q/k/v bias and M-RoPE) with a KV cache; [`Qwen2VlBundle`] adds
//! the tokenizer, the checkpoint's chat template and the image processor, for `generate`. Not here
//! yet (issue #22): videos, and this model's place in the search.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::hook::LinearHook;
use crate::io::chat_template::ChatTemplate;
use crate::io::config::{
    read_json_object, Activation, Qwen2VisionConfig, Qwen2VisionKind, Qwen2VlConfig,
};
use crate::io::image::Rgb8;
use crate::io::naming::Naming;
use crate::io::prompt::{Piece, PromptTokenizer};
use crate::io::qwen2_image::{Qwen2ImageConfig, Qwen2ImageProcessor};
use crate::io::shards::ShardSet;
use crate::io::weights::{Init, VarBuilder};
use crate::layer_id::{LayerId, Slot, Tower};
use crate::model::clip::activate;
use crate::model::linear::Linear;
use crate::model::llama::{DecoderContext, KvCache, LlamaModel};
use crate::model::llava::{
    greedy_decode, greedy_decode_fused, DecodePath, GenerateOptions, Generation, LoadOptions,
};
use crate::model::norm::{LayerNorm, RmsNorm};

/// transformers' `eps=1e-6` of the blocks' and the merger's norms (LayerNorm in Qwen2-VL,
/// RMSNorm in Qwen2.5-VL).
const NORM_EPS: f64 = 1e-6;

pub use crate::io::qwen2_image::GridThw;

/// A vision norm: Qwen2-VL's LayerNorm or Qwen2.5-VL's RMSNorm.
#[derive(Debug)]
pub enum VisionNorm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl VisionNorm {
    fn load(vb: &VarBuilder, cfg: &Qwen2VisionConfig, size: i64) -> Result<Self> {
        Ok(match cfg.kind {
            Qwen2VisionKind::Qwen2Vl => VisionNorm::Layer(LayerNorm::load(vb, size, NORM_EPS)?),
            Qwen2VisionKind::Qwen25Vl { .. } => VisionNorm::Rms(RmsNorm::load(vb, size, NORM_EPS)?),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            VisionNorm::Layer(n) => n.forward(x),
            VisionNorm::Rms(n) => n.forward(x),
        }
    }

    fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        match self {
            VisionNorm::Layer(n) => n.named_tensors(out),
            VisionNorm::Rms(n) => n.named_tensors(out),
        }
    }
}

/// A vision block's MLP: Qwen2-VL's `fc2(act(fc1 x))` or Qwen2.5-VL's SwiGLU
/// `down(act(gate x) · up x)`, every linear with a bias.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per block, never moved in a hot path: no box needed
pub enum VisionMlp {
    Plain { fc1: Linear, fc2: Linear },
    Gated { gate_proj: Linear, up_proj: Linear, down_proj: Linear },
}

/// One pre-norm block: `x + proj(attn(norm1 x))`, then `x + mlp(norm2 x)`.
#[derive(Debug)]
pub struct Qwen2VisionBlock {
    pub norm1: VisionNorm,
    pub norm2: VisionNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub mlp: VisionMlp,
    act: Activation,
    heads: i64,
    head_dim: i64,
    /// Attends within windows (Qwen2.5-VL's blocks outside `fullatt_block_indexes`), else within
    /// each image.
    pub windowed: bool,
}

impl Qwen2VisionBlock {
    fn load(vb: &VarBuilder, cfg: &Qwen2VisionConfig, block: u32) -> Result<Self> {
        let (d, hidden) = (cfg.embed_dim, cfg.intermediate_size);
        let id = |slot| LayerId::new(Tower::Vision, block, slot);
        let (attn, m) = (vb.pp("attn"), vb.pp("mlp"));
        let (mlp, windowed) = match &cfg.kind {
            Qwen2VisionKind::Qwen2Vl => (
                VisionMlp::Plain {
                    fc1: Linear::load(&m.pp("fc1"), id(Slot::Fc1), d, hidden, true)?,
                    fc2: Linear::load(&m.pp("fc2"), id(Slot::Fc2), hidden, d, true)?,
                },
                false,
            ),
            Qwen2VisionKind::Qwen25Vl { fullatt_block_indexes, .. } => (
                VisionMlp::Gated {
                    gate_proj: Linear::load(
                        &m.pp("gate_proj"),
                        id(Slot::GateProj),
                        d,
                        hidden,
                        true,
                    )?,
                    up_proj: Linear::load(&m.pp("up_proj"), id(Slot::UpProj), d, hidden, true)?,
                    down_proj: Linear::load(
                        &m.pp("down_proj"),
                        id(Slot::DownProj),
                        hidden,
                        d,
                        true,
                    )?,
                },
                !fullatt_block_indexes.contains(&i64::from(block)),
            ),
        };
        Ok(Self {
            norm1: VisionNorm::load(&vb.pp("norm1"), cfg, d)?,
            norm2: VisionNorm::load(&vb.pp("norm2"), cfg, d)?,
            qkv: Linear::load(&attn.pp("qkv"), id(Slot::Qkv), d, 3 * d, true)?,
            proj: Linear::load(&attn.pp("proj"), id(Slot::Proj), d, d, true)?,
            mlp,
            act: cfg.hidden_act,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
            windowed,
        })
    }

    /// `x` `[N, embed]` (the patches of every image, image after image), `rope` the cos and sin
    /// `[N, head_dim]` of each patch, `lengths` the patches of each attention chunk (an image, or a
    /// window).
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        lengths: &[i64],
        hook: &mut dyn LinearHook,
    ) -> Tensor {
        let x = x + self.attention(&self.norm1.forward(x), rope, lengths, hook);
        let h = self.norm2.forward(&x);
        let out = match &self.mlp {
            VisionMlp::Plain { fc1, fc2 } => {
                fc2.forward(&activate(self.act, &fc1.forward(&h, hook)), hook)
            }
            VisionMlp::Gated { gate_proj, up_proj, down_proj } => {
                let gate = activate(self.act, &gate_proj.forward(&h, hook));
                down_proj.forward(&(gate * up_proj.forward(&h, hook)), hook)
            }
        };
        &x + out
    }

    /// transformers' `VisionAttention.forward` with its eager attention per chunk.
    fn attention(
        &self,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        lengths: &[i64],
        hook: &mut dyn LinearHook,
    ) -> Tensor {
        let n = x.size()[0];
        let (h, d) = (self.heads, self.head_dim);
        // [N, 3, heads, d] → three [N, heads, d].
        let qkv = self.qkv.forward(x, hook).reshape([n, 3, h, d]);
        let (q, k, v) = (qkv.select(1, 0), qkv.select(1, 1), qkv.select(1, 2));
        let (q, k) = (rotate(&q, cos, sin), rotate(&k, cos, sin));
        let scale = (d as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(lengths.len());
        let mut start = 0;
        for &len in lengths {
            // [heads, len, d] for one chunk.
            let part = |t: &Tensor| t.narrow(0, start, len).transpose(0, 1);
            let (qi, ki, vi) = (part(&q), part(&k), part(&v));
            let scores = qi.matmul(&ki.transpose(-1, -2)) * scale;
            let probs = scores.softmax(-1, Kind::Float).to_kind(qi.kind());
            outs.push(probs.matmul(&vi).transpose(0, 1).reshape([len, h * d]));
            start += len;
        }
        self.proj.forward(&Tensor::cat(&outs, 0), hook)
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.qkv, &self.proj];
        match &self.mlp {
            VisionMlp::Plain { fc1, fc2 } => out.extend([fc1, fc2]),
            VisionMlp::Gated { gate_proj, up_proj, down_proj } => {
                out.extend([gate_proj, up_proj, down_proj])
            }
        }
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.qkv, &mut self.proj];
        match &mut self.mlp {
            VisionMlp::Plain { fc1, fc2 } => out.extend([fc1, fc2]),
            VisionMlp::Gated { gate_proj, up_proj, down_proj } => {
                out.extend([gate_proj, up_proj, down_proj])
            }
        }
        out
    }

    fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        self.norm1.named_tensors(out);
        self.norm2.named_tensors(out);
        for l in self.linears() {
            l.named_tensors(out);
        }
    }
}

/// transformers' `apply_rotary_pos_emb_vision` on `x` `[N, heads, d]`: in f32, `x·cos +
/// rotate_half(x)·sin` with `rotate_half(x) = [−x₂, x₁]` (the two halves of the head), back in
/// `x`'s dtype.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let half = xf.size()[2] / 2;
    let rotated = Tensor::cat(&[-xf.narrow(2, half, half), xf.narrow(2, 0, half)], 2);
    (&xf * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to_kind(kind)
}

/// `ln_q`, then each `merge²` consecutive patches as one row, `mlp.0`, exact GELU, `mlp.2`.
#[derive(Debug)]
pub struct Qwen2PatchMerger {
    pub ln_q: VisionNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    /// `embed_dim · spatial_merge_size²`.
    merged_width: i64,
}

impl Qwen2PatchMerger {
    fn load(vb: &VarBuilder, cfg: &Qwen2VisionConfig) -> Result<Self> {
        let width = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let id = |slot| LayerId::new(Tower::Projector, 0, slot);
        let mlp = vb.pp("mlp");
        Ok(Self {
            ln_q: VisionNorm::load(&vb.pp("ln_q"), cfg, cfg.embed_dim)?,
            fc1: Linear::load(&mlp.pp(0), id(Slot::Linear1), width, width, true)?,
            fc2: Linear::load(&mlp.pp(2), id(Slot::Linear2), width, cfg.hidden_size, true)?,
            merged_width: width,
        })
    }

    pub fn forward(&self, x: &Tensor, hook: &mut dyn LinearHook) -> Tensor {
        let rows = self.ln_q.forward(x).reshape([-1, self.merged_width]);
        let h = self.fc1.forward(&rows, hook).gelu("none");
        self.fc2.forward(&h, hook)
    }
}

/// The tower's two outputs.
#[derive(Debug)]
pub struct VisionOutput {
    /// The last block's output, `[patches, embed_dim]`.
    pub hidden: Tensor,
    /// The merger's output, `[patches / merge², hidden_size]`: the image tokens the language
    /// model receives.
    pub merged: Tensor,
}

/// What the blocks of one pass of the tower share ([`Qwen2VisionTower::begin`]).
#[derive(Debug)]
pub struct VisionPass {
    /// cos and sin `[patches, head_dim]`, in the pass's order.
    rope: (Tensor, Tensor),
    /// Patches per image: the attention chunks of full-attention blocks.
    lengths: Vec<i64>,
    /// Qwen2.5-VL: the window order and the windows' lengths.
    windows: Option<WindowPass>,
}

#[derive(Debug)]
struct WindowPass {
    /// Merge blocks in window order ([`window_order`]).
    order: Tensor,
    windows: Vec<i64>,
}

/// Rows of `t` `[n, ..]` taken `unit` at a time in `index`'s order.
fn permute_units(t: &Tensor, index: &Tensor, unit: i64) -> Tensor {
    let n = t.size()[0];
    t.reshape([n / unit, unit, -1]).index_select(0, index).reshape([n, -1])
}

#[derive(Debug)]
pub struct Qwen2VisionTower {
    /// The patch `Conv3d`'s weight as a matrix `[embed_dim, patch_len]`.
    pub patch_embed: Tensor,
    pub blocks: Vec<Qwen2VisionBlock>,
    pub merger: Qwen2PatchMerger,
    pub cfg: Qwen2VisionConfig,
}

impl Qwen2VisionTower {
    /// The tower at `vb` (canonical `visual.`): `patch_embed.proj`, `blocks.*`, `merger.*`.
    pub fn load(vb: &VarBuilder, cfg: &Qwen2VisionConfig) -> Result<Self> {
        let c = cfg;
        let conv = vb.pp("patch_embed").pp("proj").get(
            "weight",
            &[c.embed_dim, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size],
            Init::Normal { std: 0.02 },
        )?;
        let blocks = (0..c.depth)
            .map(|b| Qwen2VisionBlock::load(&vb.pp("blocks").pp(b), c, b as u32))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed: conv.reshape([c.embed_dim, c.patch_len()]),
            blocks,
            merger: Qwen2PatchMerger::load(&vb.pp("merger"), c)?,
            cfg: c.clone(),
        })
    }

    /// The tower on `pixels` `[patches, patch_len]` (the image processor's `pixel_values`, the
    /// images one after the other) with each image's grid (`image_grid_thw`). An error when the
    /// grids do not account for the patches or a grid is not whole merge blocks.
    pub fn forward(
        &self,
        pixels: &Tensor,
        grids: &[GridThw],
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let (mut x, pass) = self.begin(pixels, grids)?;
        for i in 0..self.blocks.len() {
            x = self.run_block(i, &x, &pass, hook);
        }
        Ok(self.finish(&x, &pass, hook))
    }

    /// The patch embedding of `pixels` and what every block of this pass needs (the rotary
    /// angles, the attention chunks; Qwen2.5-VL: the merge blocks in window order, transformers'
    /// `permute_input_for_window_attn`, so that every window is a run). [`Self::forward`] is
    /// `begin`, [`Self::run_block`] for every block, [`Self::finish`]; a search runs them one
    /// at a time.
    pub fn begin(&self, pixels: &Tensor, grids: &[GridThw]) -> Result<(Tensor, VisionPass)> {
        let m = self.cfg.spatial_merge_size;
        let mut lengths = Vec::with_capacity(grids.len());
        for &[t, h, w] in grids {
            if t <= 0 || h <= 0 || w <= 0 || h % m != 0 || w % m != 0 {
                return Err(Error::Invalid(format!(
                    "image grid (t, h, w) = ({t}, {h}, {w}): every side must be positive and h, w whole blocks of spatial_merge_size {m}"
                )));
            }
            lengths.push(t * h * w);
        }
        let total: i64 = lengths.iter().sum();
        let want = [total, self.cfg.patch_len()];
        if pixels.size() != want {
            return Err(Error::Invalid(format!(
                "pixel values {:?} do not match the grids: expected {want:?}",
                pixels.size()
            )));
        }
        let weight = &self.patch_embed;
        let x = pixels.to_kind(weight.kind()).matmul(&weight.tr());
        let (cos, sin) = self.rotary(grids, x.device());
        let Qwen2VisionKind::Qwen25Vl { window_size, .. } = self.cfg.kind else {
            return Ok((x, VisionPass { rope: (cos, sin), lengths, windows: None }));
        };
        let per_window = window_size / (m * self.cfg.patch_size);
        let (order, windows) = window_order(grids, m, per_window);
        let order = Tensor::from_slice(&order).to_device(x.device());
        let unit = m * m;
        let rope = (permute_units(&cos, &order, unit), permute_units(&sin, &order, unit));
        let x = permute_units(&x, &order, unit);
        Ok((x, VisionPass { rope, lengths, windows: Some(WindowPass { order, windows }) }))
    }

    /// Block `i` on `x` (the previous block's output, in the pass's order).
    pub fn run_block(
        &self,
        i: usize,
        x: &Tensor,
        pass: &VisionPass,
        hook: &mut dyn LinearHook,
    ) -> Tensor {
        let block = &self.blocks[i];
        let chunks = match &pass.windows {
            Some(w) if block.windowed => &w.windows,
            _ => &pass.lengths,
        };
        block.forward(x, &pass.rope, chunks, hook)
    }

    /// The merger on the last block's output; both outputs put back in the image processor's
    /// order.
    pub fn finish(&self, x: &Tensor, pass: &VisionPass, hook: &mut dyn LinearHook) -> VisionOutput {
        let merged = self.merger.forward(x, hook);
        match &pass.windows {
            None => VisionOutput { hidden: x.shallow_clone(), merged },
            Some(w) => {
                let back = w.order.argsort(0, false);
                let unit = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
                VisionOutput {
                    hidden: permute_units(x, &back, unit),
                    merged: merged.index_select(0, &back),
                }
            }
        }
    }

    /// The cos and sin `[patches, head_dim]` of transformers' `Qwen2VLVisionRotaryEmbedding` at
    /// `get_vision_position_ids`' positions: within each image, patches go merge block by merge
    /// block (`h/m × w/m` blocks, `m × m` patches each, row-major at both levels), repeated for
    /// each temporal slice; a patch at row `r`, column `c` gets angles `r·f` and `c·f` for the
    /// `head_dim/4` frequencies `f = θ^(−2i / (head_dim/2))`, laid out `[r·f, c·f, r·f, c·f]`.
    fn rotary(&self, grids: &[GridThw], device: tch::Device) -> (Tensor, Tensor) {
        let m = self.cfg.spatial_merge_size;
        let (mut rows, mut cols) = (Vec::new(), Vec::new());
        for &[t, h, w] in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                rows.push((bh * m + ih) as f32);
                                cols.push((bw * m + iw) as f32);
                            }
                        }
                    }
                }
            }
        }
        let spatial = self.cfg.head_dim() / 2;
        let inv_freq = Tensor::arange_start_step(0, spatial, 2, (Kind::Float, device))
            .divide_scalar(spatial as f64);
        let inv_freq = Tensor::from(self.cfg.rope_theta as f32).to_device(device).pow(&inv_freq);
        let inv_freq = inv_freq.reciprocal();
        let angles =
            |p: Vec<f32>| Tensor::from_slice(&p).to_device(device).unsqueeze(1) * &inv_freq;
        let hw = Tensor::cat(&[angles(rows), angles(cols)], 1);
        let full = Tensor::cat(&[&hw, &hw], 1);
        (full.cos(), full.sin())
    }

    /// Every linear of the tower and the merger, in execution order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = self.blocks.iter().flat_map(|b| b.linears()).collect();
        out.extend([&self.merger.fc1, &self.merger.fc2]);
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> =
            self.blocks.iter_mut().flat_map(|b| b.linears_mut()).collect();
        out.extend([&mut self.merger.fc1, &mut self.merger.fc2]);
        out
    }

    /// Every tensor under its canonical name (`visual.…`; the patch embedding as the matrix it is
    /// held as).
    pub fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        out.push(("visual.patch_embed.proj.weight".into(), self.patch_embed.shallow_clone()));
        for block in &self.blocks {
            block.named_tensors(out);
        }
        self.merger.ln_q.named_tensors(out);
        self.merger.fc1.named_tensors(out);
        self.merger.fc2.named_tensors(out);
    }
}

/// Qwen2.5-VL's window order (transformers' `get_vision_window_index`): each image's merge
/// blocks (`t × h/m × w/m`) are cut into windows of `per_window × per_window` blocks, row-major,
/// the last row and column of windows ragged; returns the merge blocks' indices in window order
/// (images one after the other) and each non-empty window's length in patches.
pub fn window_order(grids: &[GridThw], merge: i64, per_window: i64) -> (Vec<i64>, Vec<i64>) {
    let (mut order, mut windows) = (Vec::new(), Vec::new());
    let mut offset = 0;
    for &[t, h, w] in grids {
        let (gh, gw) = (h / merge, w / merge);
        let (nh, nw) = ((gh + per_window - 1) / per_window, (gw + per_window - 1) / per_window);
        for ti in 0..t {
            for wy in 0..nh {
                for wx in 0..nw {
                    let before = order.len();
                    for r in wy * per_window..((wy + 1) * per_window).min(gh) {
                        for c in wx * per_window..((wx + 1) * per_window).min(gw) {
                            order.push(offset + ti * gh * gw + r * gw + c);
                        }
                    }
                    windows.push((order.len() - before) as i64 * merge * merge);
                }
            }
        }
        offset += t * gh * gw;
    }
    (order, windows)
}

/// The multimodal rotary positions (M-RoPE) of one prompt, as transformers'
/// `Qwen2VLModel.get_rope_index` computes them: `is_image[i]` says whether token `i` is an image
/// token (the merged tokens of the images, in order, one run per image), `grids` each image's
/// patch grid and `merge` the tower's `spatial_merge_size`. Text tokens count on from the position
/// so far in all three components; an image's tokens get (temporal, row, column) of their merged
/// patch, each offset by the position at the image's start, and the position then moves on by
/// the longer side of the merged grid. Returns `[t, h, w]` per token and the delta that decoding
/// continues with (`max position + 1 − tokens`). An error when the image runs and the grids
/// disagree.
pub fn mrope_positions(
    is_image: &[bool],
    grids: &[GridThw],
    merge: i64,
) -> Result<(Vec<[i64; 3]>, i64)> {
    let mut positions = Vec::with_capacity(is_image.len());
    let mut grids = grids.iter();
    let mut current = 0i64;
    let mut i = 0;
    while i < is_image.len() {
        let run = is_image[i..].iter().take_while(|&&b| b == is_image[i]).count();
        if !is_image[i] {
            positions.extend((0..run as i64).map(|j| [current + j; 3]));
            current += run as i64;
        } else {
            let &[t, h, w] = grids.next().ok_or_else(|| {
                Error::Invalid(format!("image tokens at {i} but no image grid is left"))
            })?;
            let (gh, gw) = (h / merge, w / merge);
            if t * gh * gw != run as i64 {
                return Err(Error::Invalid(format!(
                    "{run} image tokens at {i}, but the image's grid ({t}, {h}, {w}) merged by {merge} has {}",
                    t * gh * gw
                )));
            }
            for ti in 0..t {
                for hi in 0..gh {
                    for wi in 0..gw {
                        positions.push([current + ti, current + hi, current + wi]);
                    }
                }
            }
            current += gh.max(gw);
        }
        i += run;
    }
    if grids.next().is_some() {
        return Err(Error::Invalid("more image grids than runs of image tokens".into()));
    }
    let max = positions.iter().flatten().copied().max().unwrap_or(-1);
    Ok((positions, max + 1 - is_image.len() as i64))
}

/// Qwen2-VL (transformers' `Qwen2VLForConditionalGeneration`): the vision tower and merger, the
/// merged image tokens in place of the prompt's image placeholders, the Qwen2 decoder with M-RoPE.
#[derive(Debug)]
pub struct Qwen2Vl {
    pub visual: Qwen2VisionTower,
    pub language_model: LlamaModel,
    pub cfg: Qwen2VlConfig,
    /// The rotation applied to the language model, if any
    /// ([`crate::model::rotation::rotate_qwen2_vl`]).
    pub rotation: Option<crate::quant::spec::RotationSpec>,
}

/// One prompt: its token ids (each image as its run of `image_token_id` placeholders, one per
/// merged token) and its images' grids and merged tokens ([`Qwen2Vl::image_tokens`]).
#[derive(Debug)]
pub struct Qwen2VlPrompt<'a> {
    pub ids: &'a [i64],
    pub grids: &'a [GridThw],
    /// `[merged tokens of all the prompt's images, hidden]`, `None` for a text-only prompt.
    pub image_tokens: Option<&'a Tensor>,
}

/// Prompts ready for the decoder, left-padded.
#[derive(Debug)]
pub struct Qwen2VlBatch {
    /// `[B, T, hidden]`.
    pub embeds: Tensor,
    /// `[B, T]` int64, 1 = real token.
    pub mask: Tensor,
    /// `[3, B, T]` M-RoPE positions (padding at 1, as transformers fills it; it is masked).
    pub positions: Tensor,
    /// `[B]`: the position of each row's next token (`max position + 1`), the same in all three
    /// components: decoding continues as text.
    pub next_positions: Tensor,
}

impl Qwen2Vl {
    /// Builds the model from named weights; every stored key must be read.
    pub fn build(vb: &VarBuilder, cfg: &Qwen2VlConfig) -> Result<Self> {
        let model = Self {
            visual: Qwen2VisionTower::load(&vb.pp("visual"), &cfg.vision)?,
            language_model: LlamaModel::load(&vb.pp("language_model"), vb, &cfg.text)?,
            cfg: cfg.clone(),
            rotation: None,
        };
        vb.finish()?;
        Ok(model)
    }

    /// Loads a Qwen2-VL checkpoint directory (either key layout), strictly.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if let Some(clip) = &opts.clip_dir {
            return Err(Error::Invalid(format!(
                "a CLIP directory ({}) is for original LLaVA checkpoints; {} is Qwen2-VL",
                clip.display(),
                dir.display()
            )));
        }
        let cfg = Qwen2VlConfig::from_json(&dir.join("config.json"))?;
        let set = ShardSet::open_dir(dir)?;
        let naming = Naming::detect_qwen2_vl(&set, dir)?;
        let vb = VarBuilder::from_checkpoint(vec![set], naming, opts.device, opts.dtype.kind());
        Self::build(&vb, &cfg)
    }

    pub fn device(&self) -> Device {
        self.language_model.embed_tokens.device()
    }

    pub fn kind(&self) -> Kind {
        self.language_model.embed_tokens.kind()
    }

    /// The merged image tokens `[tokens, hidden]` of `pixels` (the image processor's output) for
    /// images with `grids`.
    pub fn image_tokens(
        &self,
        pixels: &Tensor,
        grids: &[GridThw],
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        let pixels = pixels.to_device(self.device());
        Ok(self.visual.forward(&pixels, grids, hook)?.merged)
    }

    /// Embeds each prompt, puts its image tokens at its placeholders (transformers'
    /// `masked_scatter` in `Qwen2VLModel.forward`), computes its M-RoPE positions
    /// ([`mrope_positions`]) and left-pads the batch.
    pub fn prepare(&self, prompts: &[Qwen2VlPrompt<'_>]) -> Result<Qwen2VlBatch> {
        let (device, kind) = (self.device(), self.kind());
        let hidden = self.cfg.text.hidden_size;
        let t = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0) as i64;
        let (mut embeds, mut masks, mut positions, mut next) = (vec![], vec![], vec![], vec![]);
        for (b, prompt) in prompts.iter().enumerate() {
            let vocab = self.cfg.text.vocab_size;
            if prompt.ids.is_empty() {
                return Err(Error::Prompt(format!("prompt {b} is empty")));
            }
            if let Some(bad) = prompt.ids.iter().find(|&&i| i < 0 || i >= vocab) {
                return Err(Error::Prompt(format!(
                    "prompt {b}: token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            if prompt.ids.contains(&self.cfg.video_token_id) {
                return Err(Error::Prompt(format!("prompt {b}: videos are not supported")));
            }
            let is_image: Vec<bool> =
                prompt.ids.iter().map(|&i| i == self.cfg.image_token_id).collect();
            let image_rows: Vec<i64> =
                (0..is_image.len() as i64).filter(|&i| is_image[i as usize]).collect();
            let ids = Tensor::from_slice(prompt.ids).to_device(device);
            let mut row = self.language_model.embed(&ids);
            let supplied = prompt.image_tokens.map_or(0, |x| x.size()[0]);
            if supplied != image_rows.len() as i64 {
                return Err(Error::Prompt(format!(
                    "prompt {b}: {} image placeholder tokens but {supplied} image tokens",
                    image_rows.len()
                )));
            }
            if let Some(tokens) = prompt.image_tokens {
                let at = Tensor::from_slice(&image_rows).to_device(device);
                row = row.index_copy(0, &at, &tokens.to_device(device).to_kind(kind));
            }
            let (pos, delta) =
                mrope_positions(&is_image, prompt.grids, self.cfg.vision.spatial_merge_size)?;
            let len = prompt.ids.len() as i64;
            let pad = t - len;
            let flat: Vec<i64> = pos.iter().flatten().copied().collect();
            // [T, 3] → [3, T], padding positions 1 in front.
            let pos = Tensor::from_slice(&flat).view([len, 3]).tr();
            let pos = Tensor::cat(&[Tensor::ones([3, pad], (Kind::Int64, Device::Cpu)), pos], 1);
            positions.push(pos);
            next.push(len + delta);
            embeds.push(Tensor::cat(&[Tensor::zeros([pad, hidden], (kind, device)), row], 0));
            masks.push(Tensor::cat(
                &[
                    Tensor::zeros([pad], (Kind::Int64, device)),
                    Tensor::ones([len], (Kind::Int64, device)),
                ],
                0,
            ));
        }
        if prompts.is_empty() {
            return Err(Error::Prompt("no prompts".into()));
        }
        Ok(Qwen2VlBatch {
            embeds: Tensor::stack(&embeds, 0),
            mask: Tensor::stack(&masks, 0),
            positions: Tensor::stack(&positions, 1).to_device(device),
            next_positions: Tensor::from_slice(&next).to_device(device),
        })
    }

    /// Runs the decoder over a prepared batch; returns the final hidden states `[B, T, hidden]`
    /// (before the final norm). With a cache, keys and values are appended to it.
    pub fn decode_hidden(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        positions: &Tensor,
        mut cache: Option<&mut KvCache>,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.len());
        let key_mask = match cache.as_mut() {
            Some(c) => c.extend_mask(mask),
            None => mask.shallow_clone(),
        };
        let ctx = DecoderContext::multimodal(
            &self.language_model.cfg,
            positions,
            &key_mask,
            past,
            self.kind(),
        )?;
        let mut h = embeds.shallow_clone();
        for layer in &self.language_model.layers {
            h = layer.forward(&h, &ctx, cache.as_deref_mut(), hook);
        }
        Ok(h)
    }

    /// Logits `[B, T, vocab]` of every position of a prepared batch.
    pub fn logits(&self, batch: &Qwen2VlBatch, hook: &mut dyn LinearHook) -> Result<Tensor> {
        let h = self.decode_hidden(&batch.embeds, &batch.mask, &batch.positions, None, hook)?;
        Ok(self.language_model.head(&h))
    }

    /// Greedy decoding with the KV cache, as [`crate::model::llava::Llava::generate`] (either
    /// decode path): each new token's position is the row's next position in all three M-RoPE
    /// components (transformers: `cache_position + rope_deltas`).
    pub fn generate(
        &self,
        batch: &Qwen2VlBatch,
        opts: &GenerateOptions,
        hook: &mut dyn LinearHook,
    ) -> Result<Generation> {
        opts.decode.check_hook(hook)?;
        let b = batch.embeds.size()[0];
        let lm = &self.language_model;
        let mut cache = KvCache::new(lm.layers.len());
        let h = self.decode_hidden(
            &batch.embeds,
            &batch.mask,
            &batch.positions,
            Some(&mut cache),
            hook,
        )?;
        let first_logits = lm.head(&h.select(1, -1));
        let mut next_pos = batch.next_positions.shallow_clone();
        match opts.decode {
            DecodePath::Libtorch => greedy_decode(first_logits, opts, |next| {
                let embeds = lm.embed(&next.view([b, 1]));
                let mask = Tensor::ones([b, 1], (Kind::Int64, self.device()));
                let positions = next_pos.view([1, b, 1]).expand([3, b, 1], true);
                let h = self.decode_hidden(&embeds, &mask, &positions, Some(&mut cache), hook)?;
                next_pos += 1;
                Ok(lm.head(&h.select(1, -1)))
            }),
            DecodePath::Fused => greedy_decode_fused(lm, cache, first_logits, next_pos, opts),
        }
    }

    /// Every quantizable linear, in execution order (vision blocks, merger, decoder layers).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = self.visual.linears();
        for layer in &self.language_model.layers {
            out.extend(layer.linears());
        }
        out
    }

    /// [`Qwen2Vl::linears`] and, when untied, `lm_head` (last).
    pub fn linears_and_head(&self) -> Vec<&Linear> {
        let mut out = self.linears();
        out.extend(self.language_model.lm_head.as_ref());
        out
    }

    pub fn linears_and_head_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = self.visual.linears_mut();
        for layer in &mut self.language_model.layers {
            out.extend(layer.linears_mut());
        }
        out.extend(self.language_model.lm_head.as_mut());
        out
    }

    /// Every weight under its canonical name (quantized layers: their dequantized weight).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visual.named_tensors(&mut out);
        self.language_model.named_tensors(&mut out);
        out
    }

    /// The identity of the weights ([`super::weights_sha256`]).
    pub fn weights_sha256(&self) -> Result<String> {
        super::weights_sha256(self.named_tensors())
    }

    /// Every quantizable linear, mutable, in [`Qwen2Vl::linears`]' order (no `lm_head`).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = self.visual.linears_mut();
        for layer in &mut self.language_model.layers {
            out.extend(layer.linears_mut());
        }
        out
    }
}

/// A loaded Qwen2-VL checkpoint with its tokenizer, chat template and image processor:
/// everything `generate` needs.
#[derive(Debug)]
pub struct Qwen2VlBundle {
    pub model: Qwen2Vl,
    pub tokenizer: PromptTokenizer,
    pub template: ChatTemplate,
    pub images: Qwen2ImageProcessor,
    /// End-of-sequence ids: `generation_config.json`'s `eos_token_id` when the file has one (what
    /// transformers' `generate` stops on), else the config's.
    pub eos_token_ids: Vec<i64>,
}

impl Qwen2VlBundle {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let model = Qwen2Vl::load(dir, opts)?;
        let tokenizer = PromptTokenizer::text_only(&dir.join("tokenizer.json"))?;
        let image_token = tokenizer.token_id("<|image_pad|>");
        if image_token != Some(model.cfg.image_token_id) {
            return Err(Error::Tokenizer {
                file: dir.join("tokenizer.json"),
                reason: format!(
                    "`<|image_pad|>` is {image_token:?} here but the config's image_token_id is {}",
                    model.cfg.image_token_id
                ),
            });
        }
        let template = ChatTemplate::from_dir(dir)?;
        let images = Qwen2ImageProcessor::new(Qwen2ImageConfig::from_json(
            &dir.join("preprocessor_config.json"),
        )?);
        let generation = dir.join("generation_config.json");
        let mut eos_token_ids = model.cfg.text.eos_token_ids.clone();
        if generation.is_file() {
            let root = read_json_object(&generation)?;
            let ids: Option<Vec<i64>> = match root.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => n.as_i64().map(|i| vec![i]),
                Some(serde_json::Value::Array(a)) => a.iter().map(|v| v.as_i64()).collect(),
                None | Some(serde_json::Value::Null) => Some(eos_token_ids.clone()),
                Some(_) => None,
            };
            eos_token_ids = ids.ok_or_else(|| {
                Error::config(&generation, "eos_token_id", "expected an integer or a list of them")
            })?;
        }
        Ok(Self { model, tokenizer, template, images, eos_token_ids })
    }

    /// The prompt's ids for one user turn asking `question` about `grids.len()` images, rendered
    /// with the checkpoint's chat template and each image's `<|image_pad|>` expanded to its merged
    /// token count (`Qwen2VLProcessor.replace_image_token`: `t·h·w / merge²`).
    pub fn chat_ids(&self, question: &str, grids: &[GridThw]) -> Result<Vec<i64>> {
        let text = self.template.render(&ChatTemplate::user_turn(grids.len(), question), true)?;
        self.expand_image_pads(&self.tokenizer.encode_text(&text, true)?, grids)
    }

    /// One user turn asking `question` about one image as prompt pieces: the rendered chat's ids
    /// with its single `<|image_pad|>` as the image slot ([`Piece::Image`]`(0)`), which a
    /// calibration pass expands to the image's merged tokens.
    pub fn chat_pieces(&self, question: &str) -> Result<Vec<Piece>> {
        let text = self.template.render(&ChatTemplate::user_turn(1, question), true)?;
        let ids = self.tokenizer.encode_text(&text, true)?;
        let pad = self.model.cfg.image_token_id;
        let at: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == pad).collect();
        let [at] = at[..] else {
            return Err(Error::Prompt(format!(
                "the rendered chat has {} `<|image_pad|>` placeholders, expected one",
                at.len()
            )));
        };
        Ok(vec![
            Piece::Tokens(ids[..at].to_vec()),
            Piece::Image(0),
            Piece::Tokens(ids[at + 1..].to_vec()),
        ])
    }

    /// Each single `<|image_pad|>` of `ids` (in order) becomes one per merged token of its image;
    /// an error when the placeholders and the images differ in number.
    pub fn expand_image_pads(&self, ids: &[i64], grids: &[GridThw]) -> Result<Vec<i64>> {
        let pad = self.model.cfg.image_token_id;
        let merge = self.model.cfg.vision.spatial_merge_size;
        let found = ids.iter().filter(|&&i| i == pad).count();
        if found != grids.len() {
            return Err(Error::Prompt(format!(
                "the prompt has {found} `<|image_pad|>` placeholder(s) but {} image(s) were given",
                grids.len()
            )));
        }
        let mut grids = grids.iter();
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            match (id == pad).then(|| grids.next()).flatten() {
                Some(&[t, h, w]) => {
                    out.extend(std::iter::repeat_n(pad, (t * h * w / (merge * merge)) as usize))
                }
                None => out.push(id),
            }
        }
        Ok(out)
    }

    /// One user turn asking `question` about `images` (none: a text-only turn), ready for the
    /// decoder.
    pub fn prepare_chat(
        &self,
        question: &str,
        images: &[Rgb8],
        hook: &mut dyn LinearHook,
    ) -> Result<Qwen2VlBatch> {
        if images.is_empty() {
            let ids = self.chat_ids(question, &[])?;
            let prompt = Qwen2VlPrompt { ids: &ids, grids: &[], image_tokens: None };
            return self.model.prepare(&[prompt]);
        }
        let (pixels, grids) = self.images.preprocess_all(images)?;
        let ids = self.chat_ids(question, &grids)?;
        let tokens = self.model.image_tokens(&pixels, &grids, hook)?;
        let prompt = Qwen2VlPrompt { ids: &ids, grids: &grids, image_tokens: Some(&tokens) };
        self.model.prepare(&[prompt])
    }

    /// Greedy answer to `question` about `images`: the new tokens (without the stopping EOS) and
    /// their text (special tokens skipped).
    pub fn answer(
        &self,
        question: &str,
        images: &[Rgb8],
        max_new_tokens: usize,
        hook: &mut dyn LinearHook,
    ) -> Result<(Vec<i64>, String)> {
        let batch = self.prepare_chat(question, images, hook)?;
        let opts = GenerateOptions {
            max_new_tokens,
            eos_token_ids: self.eos_token_ids.clone(),
            stop: None,
            decode: DecodePath::Libtorch,
        };
        let new = self.model.generate(&batch, &opts, hook)?.tokens.remove(0);
        let text = self.tokenizer.decode(&new, true)?;
        Ok((new, text))
    }
}
