//! The LLaMA/Vicuna decoder: RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU.
//! Mirrors transformers' `LlamaModel`
//! (<https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/llama/modeling_llama.py>).

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::hook::LinearHook;
use crate::io::config::{LlamaConfig, RopeScaling};
use crate::io::weights::{Init, VarBuilder};
use crate::layer_id::{LayerId, Slot, Tower};
use crate::model::linear::Linear;
use crate::model::norm::RmsNorm;

/// `θ^(−2i/d)` for `i < d/2`, in f32, divided by a linear scaling factor when there is one.
fn inv_freq(cfg: &LlamaConfig, device: tch::Device) -> Tensor {
    let d = cfg.head_dim;
    let exponents =
        Tensor::arange_start_step(0, d, 2, (Kind::Int64, device)).to_kind(Kind::Float) / d as f64;
    let inv_freq = Tensor::from(cfg.rope_theta).to_device(device).pow(&exponents).reciprocal();
    match cfg.rope_scaling {
        RopeScaling::Default => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
    }
}

/// Cosine and sine tables for the positions of one forward pass, `[B, T, head_dim]`.
#[derive(Debug)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Default RoPE (`inv_freq = θ^(-2i/d)`), optionally position-interpolated, computed in f32
    /// and cast to `kind` as transformers' `LlamaRotaryEmbedding.forward` does. With M-RoPE
    /// (`cfg.mrope_section`) one position per token means the same position in all three
    /// components, which is exactly this.
    pub fn new(cfg: &LlamaConfig, positions: &Tensor, kind: Kind) -> Rope {
        let freqs =
            positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq(cfg, positions.device());
        Self::from_freqs(&freqs, kind)
    }

    /// M-RoPE (transformers' `Qwen2VLRotaryEmbedding.forward`): `positions` `[3, B, T]` hold each
    /// token's (temporal, row, column) position; the `head_dim / 2` frequencies are split into
    /// `mrope_section`'s three runs and run `i` turns by component `i`'s angle.
    pub fn multimodal(cfg: &LlamaConfig, positions: &Tensor, kind: Kind) -> Result<Rope> {
        let section = cfg.mrope_section.ok_or_else(|| {
            Error::Invalid("three-component positions given to a decoder without M-RoPE".into())
        })?;
        if positions.dim() != 3 || positions.size()[0] != 3 {
            return Err(Error::Invalid(format!(
                "M-RoPE positions must be [3, batch, tokens], found {:?}",
                positions.size()
            )));
        }
        // [3, B, T, d/2] angles; run i of the last axis taken from component i.
        let freqs =
            positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq(cfg, positions.device());
        let runs = freqs.split_with_sizes(section, -1);
        let picked: Vec<Tensor> =
            runs.iter().enumerate().map(|(i, r)| r.select(0, i as i64)).collect();
        Ok(Self::from_freqs(&Tensor::cat(&picked, -1), kind))
    }

    /// `[.., d/2]` angles → cos and sin of `[angles, angles]`.
    fn from_freqs(freqs: &Tensor, kind: Kind) -> Rope {
        let emb = Tensor::cat(&[freqs, freqs], -1);
        Rope { cos: emb.cos().to_kind(kind), sin: emb.sin().to_kind(kind) }
    }

    /// Applies the rotation to `[B, heads, T, head_dim]`.
    fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let x1 = x.narrow(-1, 0, half);
        let x2 = x.narrow(-1, half, half);
        let rotated = Tensor::cat(&[x2.neg(), x1], -1);
        x * self.cos.unsqueeze(1) + rotated * self.sin.unsqueeze(1)
    }
}

/// Keys and values of past positions for every decoder layer, plus which of them are padding.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// `[B, S]`, 1 for real tokens, 0 for padding.
    key_mask: Option<Tensor>,
}

/// One layer's keys and values `[B, kv_heads, capacity, head_dim]`, of which the first `len`
/// positions are filled. A step writes its positions into the free tail instead of concatenating
/// a new cache: a decode step then copies one position per layer, not the whole cache (and
/// allocates nothing until the capacity runs out, when it doubles).
#[derive(Debug)]
struct LayerCache {
    keys: Tensor,
    values: Tensor,
    len: i64,
}

/// Positions of headroom a layer's first allocation rounds up to.
const KV_CAPACITY_STEP: i64 = 64;

impl LayerCache {
    fn capacity(&self) -> i64 {
        self.keys.size()[2]
    }

    /// A first buffer for `k` and `v` `[B, H, T, D]`: `T` rounded up to whole steps of
    /// [`KV_CAPACITY_STEP`] positions.
    fn new(k: &Tensor, v: &Tensor) -> Self {
        let t = k.size()[2];
        let capacity = (t + KV_CAPACITY_STEP - 1) / KV_CAPACITY_STEP * KV_CAPACITY_STEP;
        Self::with_capacity(k, v, capacity)
    }

    /// A buffer of `capacity` positions holding `k` and `v` `[B, H, T, D]` at its start.
    fn with_capacity(k: &Tensor, v: &Tensor, capacity: i64) -> Self {
        let buffer = |x: &Tensor| {
            let mut shape = x.size();
            shape[2] = capacity;
            let b = Tensor::empty(shape.as_slice(), (x.kind(), x.device()));
            b.narrow(2, 0, x.size()[2]).copy_(x);
            b
        };
        Self { keys: buffer(k), values: buffer(v), len: k.size()[2] }
    }

    /// Appends `k` and `v` `[B, H, T, D]`; the filled keys and values after it.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        if self.len + t > self.capacity() {
            let capacity = (self.len + t).max(2 * self.capacity());
            let (keys, values) = self.filled();
            *self = Self::with_capacity(&keys, &values, capacity);
        }
        self.keys.narrow(2, self.len, t).copy_(k);
        self.values.narrow(2, self.len, t).copy_(v);
        self.len += t;
        self.filled()
    }

    fn filled(&self) -> (Tensor, Tensor) {
        (self.keys.narrow(2, 0, self.len), self.values.narrow(2, 0, self.len))
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect(), key_mask: None }
    }

    pub fn len(&self) -> i64 {
        self.key_mask.as_ref().map_or(0, |m| m.size()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The padding mask of all cached positions plus `new_mask` `[B, T]` (appended).
    pub fn extend_mask(&mut self, new_mask: &Tensor) -> Tensor {
        let mask = match &self.key_mask {
            Some(m) => Tensor::cat(&[m, new_mask], 1),
            None => new_mask.shallow_clone(),
        };
        self.key_mask = Some(mask.shallow_clone());
        mask
    }

    /// Layer `layer`'s filled keys and values `[B, kv_heads, len, head_dim]`, if it has any.
    pub fn layer_kv(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        self.layers.get(layer)?.as_ref().map(LayerCache::filled)
    }

    /// The padding mask `[B, S]` of every cached position (1: a real token).
    pub fn key_mask(&self) -> Option<&Tensor> {
        self.key_mask.as_ref()
    }

    /// The cache of the batch rows `rows` (`[N]` int64 indices into this cache's batch, repeats
    /// allowed): one shared prefix computed once, continued by several sequences.
    pub fn select_rows(&self, rows: &Tensor) -> KvCache {
        let pick = |t: &Tensor| t.index_select(0, &rows.to_device(t.device()));
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref().map(|c| {
                        let (k, v) = c.filled();
                        LayerCache::with_capacity(&pick(&k), &pick(&v), c.capacity())
                    })
                })
                .collect(),
            key_mask: self.key_mask.as_ref().map(pick),
        }
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        match &mut self.layers[layer] {
            Some(cache) => cache.append(&k, &v),
            slot @ None => {
                let cache = LayerCache::new(&k, &v);
                let filled = cache.filled();
                *slot = Some(cache);
                filled
            }
        }
    }
}

/// What one forward pass over `[B, T]` new positions needs besides the hidden states.
#[derive(Debug)]
pub struct DecoderContext {
    pub rope: Rope,
    /// Additive mask `[B, 1, T, S]` (0 or the dtype's minimum).
    pub mask: Tensor,
}

impl DecoderContext {
    /// Causal + padding mask for `T` new queries at cache offset `past` over `key_mask` `[B, S]`;
    /// `positions` `[B, T]`.
    pub fn new(
        cfg: &LlamaConfig,
        positions: &Tensor,
        key_mask: &Tensor,
        past: i64,
        kind: Kind,
    ) -> Self {
        let t = positions.size()[1];
        Self { rope: Rope::new(cfg, positions, kind), mask: causal_mask(key_mask, past, t, kind) }
    }

    /// The same with M-RoPE positions `[3, B, T]` ([`Rope::multimodal`]).
    pub fn multimodal(
        cfg: &LlamaConfig,
        positions: &Tensor,
        key_mask: &Tensor,
        past: i64,
        kind: Kind,
    ) -> Result<Self> {
        let rope = Rope::multimodal(cfg, positions, kind)?;
        let t = positions.size()[2];
        Ok(Self { rope, mask: causal_mask(key_mask, past, t, kind) })
    }
}

/// Additive causal + padding mask `[B, 1, T, S]` for `t` queries at cache offset `past`.
fn causal_mask(key_mask: &Tensor, past: i64, t: i64, kind: Kind) -> Tensor {
    let device = key_mask.device();
    let s = key_mask.size()[1];
    let q_idx = Tensor::arange_start(past, past + t, (Kind::Int64, device)).view([t, 1]);
    let k_idx = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
    let causal = k_idx.le_tensor(&q_idx).view([1, 1, t, s]);
    let keep = causal.logical_and(&key_mask.to_kind(Kind::Bool).view([-1, 1, 1, s]));
    let min = finfo_min(kind);
    let mask = Tensor::zeros([1], (kind, device)).masked_fill(&keep.logical_not(), min);
    mask.expand([key_mask.size()[0], 1, t, s], true).contiguous()
}

/// `torch.finfo(kind).min`, the additive mask value transformers uses.
fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        // (2 − 2⁻⁷) · 2¹²⁷
        Kind::BFloat16 => -(2.0 - 2f64.powi(-7)) * 2f64.powi(127),
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

#[derive(Debug)]
pub struct LlamaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl LlamaAttention {
    fn load(vb: &VarBuilder, cfg: &LlamaConfig, block: u32) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let id = |slot| LayerId::new(Tower::Language, block, slot);
        // LLaMA's attention_bias covers all four; Qwen2 puts a bias on q, k and v only.
        let (qkv_bias, o_bias) = (cfg.attention_bias || cfg.qkv_bias, cfg.attention_bias);
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), id(Slot::QProj), h, nh * d, qkv_bias)?,
            k_proj: Linear::load(&vb.pp("k_proj"), id(Slot::KProj), h, nkv * d, qkv_bias)?,
            v_proj: Linear::load(&vb.pp("v_proj"), id(Slot::VProj), h, nkv * d, qkv_bias)?,
            o_proj: Linear::load(&vb.pp("o_proj"), id(Slot::OProj), nh * d, h, o_bias)?,
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &DecoderContext,
        cache: Option<(&mut KvCache, usize)>,
        hook: &mut dyn LinearHook,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let d = self.head_dim;
        let q = self.q_proj.forward(x, hook).view([b, t, self.heads, d]).transpose(1, 2);
        let k = self.k_proj.forward(x, hook).view([b, t, self.kv_heads, d]).transpose(1, 2);
        let v = self.v_proj.forward(x, hook).view([b, t, self.kv_heads, d]).transpose(1, 2);
        let q = ctx.rope.apply(&q);
        let k = ctx.rope.apply(&k);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        // Grouped-query attention: each KV head serves `heads / kv_heads` consecutive query heads
        // (transformers' `repeat_kv`).
        let rep = self.heads / self.kv_heads;
        let repeat = |x: Tensor| {
            if rep == 1 {
                return x;
            }
            let s = x.size()[2];
            x.unsqueeze(2)
                .expand([b, self.kv_heads, rep, s, d], true)
                .reshape([b, self.heads, s, d])
        };
        let (k, v) = (repeat(k), repeat(v));
        let scores = q.matmul(&k.transpose(-1, -2)) * (d as f64).powf(-0.5) + &ctx.mask;
        let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
        let out = probs.matmul(&v).transpose(1, 2).contiguous().view([b, t, self.heads * d]);
        self.o_proj.forward(&out, hook)
    }
}

#[derive(Debug)]
pub struct LlamaDecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: LlamaAttention,
    pub post_attention_layernorm: RmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    index: usize,
}

impl LlamaDecoderLayer {
    fn load(vb: &VarBuilder, cfg: &LlamaConfig, block: u32) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mlp = vb.pp("mlp");
        let id = |slot| LayerId::new(Tower::Language, block, slot);
        let bias = cfg.mlp_bias;
        Ok(Self {
            input_layernorm: RmsNorm::load(&vb.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
            self_attn: LlamaAttention::load(&vb.pp("self_attn"), cfg, block)?,
            post_attention_layernorm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                h,
                cfg.rms_norm_eps,
            )?,
            gate_proj: Linear::load(&mlp.pp("gate_proj"), id(Slot::GateProj), h, i, bias)?,
            up_proj: Linear::load(&mlp.pp("up_proj"), id(Slot::UpProj), h, i, bias)?,
            down_proj: Linear::load(&mlp.pp("down_proj"), id(Slot::DownProj), i, h, bias)?,
            index: block as usize,
        })
    }

    /// One decoder layer over `[B, T, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &DecoderContext,
        cache: Option<&mut KvCache>,
        hook: &mut dyn LinearHook,
    ) -> Tensor {
        let cache = cache.map(|c| (c, self.index));
        let x = x + self.self_attn.forward(&self.input_layernorm.forward(x), ctx, cache, hook);
        let h = self.post_attention_layernorm.forward(&x);
        let gate = self.gate_proj.forward(&h, hook);
        let up = self.up_proj.forward(&h, hook);
        &x + self.down_proj.forward(&(gate.silu() * up), hook)
    }

    fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        self.input_layernorm.named_tensors(out);
        self.post_attention_layernorm.named_tensors(out);
        for l in self.linears() {
            l.named_tensors(out);
        }
    }

    pub fn linears(&self) -> [&Linear; 7] {
        let a = &self.self_attn;
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let a = &mut self.self_attn;
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

#[derive(Debug)]
pub struct LlamaModel {
    pub embed_tokens: Tensor,
    pub layers: Vec<LlamaDecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`. Float as loaded; packed only where a caller packs it
    /// (the efficiency bench): it is not a quantization site of the searches.
    pub lm_head: Option<Linear>,
    pub cfg: LlamaConfig,
    /// The canonical name of the decoder (`language_model`).
    pub path: String,
}

impl LlamaModel {
    /// `vb` is scoped at the decoder (`language_model`), `head` at the root (for `lm_head`).
    pub fn load(vb: &VarBuilder, head: &VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let layers_vb = vb.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::load(&layers_vb.pp(i), cfg, i as u32))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let id = LayerId::new(Tower::Language, cfg.num_hidden_layers as u32, Slot::LmHead);
            Some(Linear::load(&head.pp("lm_head"), id, h, v, false)?)
        };
        Ok(Self {
            embed_tokens: vb.pp("embed_tokens").get(
                "weight",
                &[v, h],
                Init::Normal { std: 0.02 },
            )?,
            layers,
            norm: RmsNorm::load(&vb.pp("norm"), h, cfg.rms_norm_eps)?,
            lm_head,
            cfg: cfg.clone(),
            path: vb.path(),
        })
    }

    /// Every tensor under its canonical name, `lm_head` last.
    pub fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{}.embed_tokens.weight", self.path), self.embed_tokens.shallow_clone()));
        for layer in &self.layers {
            layer.named_tensors(out);
        }
        self.norm.named_tensors(out);
        if let Some(head) = &self.lm_head {
            head.named_tensors(out);
        }
    }

    /// Token ids `[..]` → embeddings `[.., hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }

    /// Final norm and the language-model head (not a quantization site of the searches).
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        let h = self.norm.forward(hidden);
        match &self.lm_head {
            Some(head) => head.forward_raw(&h),
            None => h.linear(&self.embed_tokens, None::<Tensor>),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appending chunk by chunk, across the first allocation's headroom and a doubling, keeps
    /// exactly what concatenating the chunks gives; a row selection continues the same way.
    #[test]
    fn kv_cache_appends_like_concatenation() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(3);
        let mut cache = KvCache::new(1);
        let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
        for t in [5, 1, 70, 1, 1, 200] {
            let k = Tensor::randn([2, 3, t, 4], (Kind::Float, tch::Device::Cpu));
            let v = Tensor::randn([2, 3, t, 4], (Kind::Float, tch::Device::Cpu));
            all_k.push(k.shallow_clone());
            all_v.push(v.shallow_clone());
            let (ck, cv) = cache.append(0, k, v);
            assert!(ck.equal(&Tensor::cat(&all_k, 2)), "keys after a chunk of {t}");
            assert!(cv.equal(&Tensor::cat(&all_v, 2)), "values after a chunk of {t}");
        }
        let filled = cache.layers[0].as_ref().expect("layer 0 filled");
        assert_eq!(filled.len, 278);
        assert!(filled.capacity() >= 278);

        let rows = Tensor::from_slice(&[1i64, 1, 0]);
        let mut picked = cache.select_rows(&rows);
        let k = Tensor::randn([3, 3, 1, 4], (Kind::Float, tch::Device::Cpu));
        let (pk, _) = picked.append(0, k.shallow_clone(), k.shallow_clone());
        let want = Tensor::cat(&[Tensor::cat(&all_k, 2).index_select(0, &rows), k], 2);
        assert!(pk.equal(&want), "selected rows continue like their concatenation");
    }
}
