//! One decode step — batch 1, one new token, on the CPU — of [`LlamaModel`]'s decoder layers on
//! plain f32 buffers instead of libtorch operators.
//!
//! Why: on the efficiency bench's 7B shape a libtorch decode step spends 21–34 ms outside the
//! linears (2026-12-04, AMD EPYC, 2 cores), about 90 small operators a layer each paying
//! dispatch, allocation and a cold cache after the weights streamed through; the same norms,
//! rotations and attention on 4096 values take microseconds as loops. This is the same model, not
//! a second definition: the weights are [`LlamaModel`]'s own (its linears are called through
//! their own kernels, or through [`Linear::forward_raw`] when they have none), and the arithmetic
//! is [`LlamaDecoderLayer::forward`](crate::model::llama::LlamaDecoderLayer::forward)'s, rounded
//! to the model's dtype after every operator exactly where the libtorch path rounds (a bf16
//! tensor op computes in f32 and rounds its output once). Only summation orders differ (and
//! `exp`'s last f32 bits: [`exp_f32`]), so a step agrees with the libtorch step to within a bf16 rounding of
//! the largest hidden value; the tests hold it to that, on f32 and bf16 models, float and packed.
//!
//! What it takes: a model in f32 or bf16 on the CPU, and a KV cache filled by a libtorch prefill
//! of one sequence without padding ([`FusedCache::from_kv`]); the rotary angles of the step come
//! from [`Rope`] (the one place they are computed). Anything else is an error, not a fallback.

use std::ops::Range;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::linear::{Linear, LinearWeight};
use crate::model::llama::{KvCache, LlamaModel, Rope};
use crate::quant::bf16_own::{self, Bf16Weight};
use crate::quant::packed::PackedWeight;
use crate::quant::team::{at_isa, default_team, for_each_range, Isa};

/// The dtype a step's values are rounded to between operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    F32,
    Bf16,
}

impl StepKind {
    pub fn of(kind: Kind) -> Result<Self> {
        match kind {
            Kind::Float => Ok(StepKind::F32),
            Kind::BFloat16 => Ok(StepKind::Bf16),
            other => Err(Error::Invalid(format!(
                "the fused decode step runs f32 and bf16 models, not {other:?}"
            ))),
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            StepKind::F32 => Kind::Float,
            StepKind::Bf16 => Kind::BFloat16,
        }
    }

    /// `x` as an operator of this dtype returns it.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            StepKind::F32 => x,
            StepKind::Bf16 => round_bf16(x),
        }
    }
}

/// f32 → bf16 → f32 with rounding to nearest even, NaN kept a (quiet) NaN: c10's
/// `round_to_nearest_even`
/// (<https://github.com/pytorch/pytorch/blob/v2.5.0/c10/util/BFloat16.h#L78-L93>).
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return f32::from_bits(0x7fc0_0000);
    }
    let bits = x.to_bits();
    let bias = 0x7fff + ((bits >> 16) & 1);
    f32::from_bits(bits.wrapping_add(bias) & 0xffff_0000)
}

/// A cached value as stored: f32, or the upper half of a bf16-rounded f32.
trait Stored: Copy {
    fn widen(self) -> f32;
    /// `x` already rounded to the stored dtype.
    fn narrow(x: f32) -> Self;
}

impl Stored for f32 {
    #[inline]
    fn widen(self) -> f32 {
        self
    }
    #[inline]
    fn narrow(x: f32) -> Self {
        x
    }
}

impl Stored for u16 {
    #[inline]
    fn widen(self) -> f32 {
        bf16_own::widen(self)
    }
    #[inline]
    fn narrow(x: f32) -> Self {
        (x.to_bits() >> 16) as u16
    }
}

/// One layer's keys or values, head-major: `[kv_head]` holds that KV head's `head_dim` values of
/// every cached position, position after position (a step appends `head_dim` values to each), so
/// the attention reads each head's keys and values as one contiguous stream.
#[derive(Debug)]
enum Rows {
    F32(Vec<Vec<f32>>),
    Bf16(Vec<Vec<u16>>),
}

impl Rows {
    /// Appends one position: `row` `[kv_heads · head_dim]`, head after head.
    fn push(&mut self, row: &[f32]) {
        fn push_to<S: Stored>(heads: &mut [Vec<S>], row: &[f32]) {
            let d = row.len() / heads.len().max(1);
            for (head, piece) in heads.iter_mut().zip(row.chunks_exact(d.max(1))) {
                head.extend(piece.iter().map(|&x| S::narrow(x)));
            }
        }
        match self {
            Rows::F32(heads) => push_to(heads, row),
            Rows::Bf16(heads) => push_to(heads, row),
        }
    }

    /// Values held per KV head.
    fn head_len(&self) -> usize {
        match self {
            Rows::F32(heads) => heads.first().map_or(0, Vec::len),
            Rows::Bf16(heads) => heads.first().map_or(0, Vec::len),
        }
    }

    /// Keeps the first `values` values of every KV head.
    fn truncate(&mut self, values: usize) {
        match self {
            Rows::F32(heads) => heads.iter_mut().for_each(|h| h.truncate(values)),
            Rows::Bf16(heads) => heads.iter_mut().for_each(|h| h.truncate(values)),
        }
    }
}

/// The keys and values of every layer for the fused step, continued from a libtorch prefill.
#[derive(Debug)]
pub struct FusedCache {
    /// `(keys, values)` per layer.
    layers: Vec<(Rows, Rows)>,
    /// Cached positions.
    len: usize,
    /// `(kv_heads, head_dim)` of every layer.
    heads: (usize, usize),
    kind: StepKind,
}

impl FusedCache {
    /// The keys and values a libtorch prefill left in `cache`: one sequence (batch 1), no
    /// padding, every layer filled, in `kind`.
    pub fn from_kv(cache: &KvCache, num_layers: usize, kind: Kind) -> Result<Self> {
        let step_kind = StepKind::of(kind)?;
        let mask = cache.key_mask().ok_or_else(|| {
            Error::Invalid("the fused decode step continues a prefilled cache; it is empty".into())
        })?;
        if mask.size()[0] != 1 {
            return Err(Error::Invalid(format!(
                "the fused decode step decodes one sequence; the cache holds {}",
                mask.size()[0]
            )));
        }
        if mask.to_kind(Kind::Int64).min().int64_value(&[]) != 1 {
            return Err(Error::Invalid(
                "the fused decode step takes a cache without padding positions".into(),
            ));
        }
        let len = mask.size()[1] as usize;
        let mut layers = Vec::with_capacity(num_layers);
        let mut heads = None;
        for layer in 0..num_layers {
            let (k, v) = cache.layer_kv(layer).ok_or_else(|| {
                Error::Invalid(format!("the KV cache has nothing for decoder layer {layer}"))
            })?;
            let mut rows = |t: &Tensor| -> Result<Rows> {
                if t.kind() != kind || t.size()[2] as usize != len || t.device() != Device::Cpu {
                    return Err(Error::Invalid(format!(
                        "decoder layer {layer}'s cache is {:?} {:?} on {:?}; the fused step needs \
                         {kind:?} [1, heads, {len}, head_dim] on the CPU",
                        t.kind(),
                        t.size(),
                        t.device()
                    )));
                }
                // [1, H, S, D] → [H, S, D]: head-major, each head's positions in order.
                let t = t.select(0, 0).contiguous();
                let (h, d) = (t.size()[0] as usize, t.size()[2] as usize);
                if *heads.get_or_insert((h, d)) != (h, d) {
                    return Err(Error::Invalid(format!(
                        "decoder layer {layer}'s cache holds {h} heads of {d}, unlike layer 0's"
                    )));
                }
                // Head `i`'s `len · d` values, for every head (also when `len` is 0).
                fn split<S: Clone>(values: &[S], h: usize, per_head: usize) -> Vec<Vec<S>> {
                    (0..h).map(|i| values[i * per_head..(i + 1) * per_head].to_vec()).collect()
                }
                Ok(match step_kind {
                    StepKind::F32 => Rows::F32(split(&f32_values(&t)?, h, len * d)),
                    StepKind::Bf16 => Rows::Bf16(split(&bf16_own::bf16_bits(&t)?, h, len * d)),
                })
            };
            layers.push((rows(&k)?, rows(&v)?));
        }
        Ok(Self { layers, len, heads: heads.unwrap_or((0, 0)), kind: step_kind })
    }

    /// After a failed step: every layer that appended a position drops it, so the cache is as
    /// the step found it.
    fn roll_back(&mut self) {
        let values = self.len * self.heads.1;
        for (keys, vals) in &mut self.layers {
            keys.truncate(values);
            vals.truncate(values);
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `t` (any float dtype, CPU) as f32 values in its memory order.
fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().reshape([-1]))?)
}

/// A decoder linear for one token: its own kernel on the f32 values where it has one, else its
/// tensor path.
#[derive(Debug)]
struct TokenLinear<'a> {
    linear: &'a Linear,
    /// The bias as f32 values of the layer's dtype (own-kernel path only).
    bias: Option<Vec<f32>>,
}

impl<'a> TokenLinear<'a> {
    fn new(linear: &'a Linear) -> Result<Self> {
        let bias = linear.bias.as_ref().map(f32_values).transpose()?;
        Ok(Self { linear, bias })
    }

    /// `forward_raw(x)` for one token `x` `[in]` (values of `kind`), as f32 values of `kind`.
    fn forward(&self, x: &[f32], kind: StepKind) -> Result<Vec<f32>> {
        let own = match (&self.linear.input_rotation, &self.linear.weight) {
            (None, LinearWeight::Packed(p)) => p.matmul_token(x),
            (None, LinearWeight::Bf16Own(w)) => w.matmul(x, 1),
            _ => None,
        };
        match own {
            Some(y) => Ok(self.finish(y, kind)),
            None => {
                let t = Tensor::from_slice(x).to_kind(kind.kind()).view([1, 1, -1]);
                f32_values(&self.linear.forward_raw(&t))
            }
        }
    }

    /// [`Self::forward`] of several linears on the same token `x`: one hand-out of the own
    /// kernel's thread team for all of them where they share one
    /// ([`PackedWeight::matmul_token_many`], [`Bf16Weight::matmul_many`]: a layer's q, k and v
    /// projections, its gate and up), else one [`Self::forward`] each. The values are the same
    /// either way, bit for bit (the kernels' tests); one hand-out saves the team's start and
    /// drain, and the activations' quantization, per extra linear.
    fn forward_many<const N: usize>(
        linears: [&Self; N],
        x: &[f32],
        kind: StepKind,
    ) -> Result<[Vec<f32>; N]> {
        let unrotated = linears.iter().all(|l| l.linear.input_rotation.is_none());
        // Every linear's weight as `pick` takes it, or `None` if one is held otherwise.
        fn all<'w, T>(
            linears: &[&TokenLinear<'w>],
            pick: impl Fn(&'w LinearWeight) -> Option<&'w T>,
        ) -> Option<Vec<&'w T>> {
            linears.iter().map(|l| pick(&l.linear.weight)).collect()
        }
        let packed = all(&linears, |w| match w {
            LinearWeight::Packed(p) => Some(p),
            _ => None,
        });
        let bf16 = all(&linears, |w| match w {
            LinearWeight::Bf16Own(b) => Some(b),
            _ => None,
        });
        let together = match (unrotated, packed, bf16) {
            (true, Some(p), _) => PackedWeight::matmul_token_many(&p, x),
            (true, _, Some(w)) => Bf16Weight::matmul_many(&w, x, 1),
            _ => None,
        };
        let ys = match together {
            Some(ys) => linears.iter().zip(ys).map(|(l, y)| l.finish(y, kind)).collect(),
            None => linears.iter().map(|l| l.forward(x, kind)).collect::<Result<Vec<_>>>()?,
        };
        Ok(ys.try_into().unwrap_or_else(|_| unreachable!("one output per linear")))
    }

    /// An own kernel's product as `Linear::multiply` returns it: rounded to the dtype, then
    /// `+ b` rounded again.
    fn finish(&self, mut y: Vec<f32>, kind: StepKind) -> Vec<f32> {
        match &self.bias {
            Some(b) => {
                for (y, b) in y.iter_mut().zip(b) {
                    *y = kind.round(kind.round(*y) + b);
                }
            }
            None => y.iter_mut().for_each(|y| *y = kind.round(*y)),
        }
        y
    }
}

/// What a fused step needs of one decoder layer.
#[derive(Debug)]
struct FusedLayer<'a> {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    /// q, k, v, o, gate, up, down.
    linears: [TokenLinear<'a>; 7],
}

/// [`LlamaModel`]'s decoder layers as one fused decode step (the module doc says what and why).
#[derive(Debug)]
pub struct FusedDecoder<'a> {
    /// The model whose layers these are: its embedding table and rotary config serve
    /// [`Self::step_token`].
    model: &'a LlamaModel,
    layers: Vec<FusedLayer<'a>>,
    kind: StepKind,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// `rms_norm_eps` as the f32 that `variance + eps` adds.
    eps: f32,
}

impl<'a> FusedDecoder<'a> {
    /// The decoder of `model` (f32 or bf16, on the CPU).
    pub fn new(model: &'a LlamaModel) -> Result<Self> {
        let kind = StepKind::of(model.embed_tokens.kind())?;
        if model.embed_tokens.device() != Device::Cpu {
            return Err(Error::Invalid(format!(
                "the fused decode step runs on the CPU; the model is on {:?}",
                model.embed_tokens.device()
            )));
        }
        let cfg = &model.cfg;
        let (heads, kv_heads, head_dim) = (
            cfg.num_attention_heads as usize,
            cfg.num_key_value_heads as usize,
            cfg.head_dim as usize,
        );
        if kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
            return Err(Error::Invalid(format!(
                "the fused decode step needs heads ({heads}) a multiple of kv_heads ({kv_heads}) \
                 and an even head_dim ({head_dim})"
            )));
        }
        let layers = model
            .layers
            .iter()
            .map(|l| {
                let [q, k, v, o, gate, up, down] = l.linears().map(TokenLinear::new);
                Ok(FusedLayer {
                    input_norm: f32_values(&l.input_layernorm.weight)?,
                    post_norm: f32_values(&l.post_attention_layernorm.weight)?,
                    linears: [q?, k?, v?, o?, gate?, up?, down?],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { model, layers, kind, heads, kv_heads, head_dim, eps: cfg.rms_norm_eps as f32 })
    }

    /// One decode step of `token` `[1]` at `position` `[1]`: the token's embedding row and the
    /// rotary tables (libtorch, once a step), then [`Self::step`]; the final hidden state
    /// `[1, 1, hidden]` in the model's dtype, as [`LlamaModel`]'s layers give it. A generated
    /// token is text: for M-RoPE (Qwen2-VL) its three position components are equal, which is
    /// the plain rotation at that position, so one position serves both families.
    pub fn step_token(
        &self,
        token: &Tensor,
        position: &Tensor,
        cache: &mut FusedCache,
    ) -> Result<Tensor> {
        if token.numel() != 1 || position.numel() != 1 {
            return Err(Error::Invalid(format!(
                "the fused decode step takes one token at one position, got tokens {:?} at {:?}",
                token.size(),
                position.size()
            )));
        }
        let kind = self.kind.kind();
        let embedding = self.model.embed(&token.view([1]));
        let values = f32_values(&embedding)?;
        let rope = Rope::new(&self.model.cfg, &position.view([1, 1]), kind);
        let h = self.step(&values, &rope, cache)?;
        Ok(Tensor::from_slice(&h).view([1, 1, -1]).to_kind(kind))
    }

    /// One token through every decoder layer: `embedding` `[hidden]` (the token's embedding row,
    /// values of the model's dtype) at the position `rope` was made for (`[1, 1, head_dim]`
    /// tables), its keys and values appended to `cache`; the final hidden state `[hidden]`
    /// (before the final norm), as [`LlamaDecoderLayer::forward`] of every layer gives it.
    ///
    /// [`LlamaDecoderLayer::forward`]: crate::model::llama::LlamaDecoderLayer::forward
    pub fn step(&self, embedding: &[f32], rope: &Rope, cache: &mut FusedCache) -> Result<Vec<f32>> {
        let kind = self.kind;
        let d = self.head_dim;
        let heads = (self.kv_heads, d);
        if cache.kind != kind || cache.layers.len() != self.layers.len() || cache.heads != heads {
            return Err(Error::Invalid(format!(
                "a fused cache of {} layers of {} KV heads of {} in {:?} given to a decoder of {} \
                 layers of {} KV heads of {d} in {:?}",
                cache.layers.len(),
                cache.heads.0,
                cache.heads.1,
                cache.kind,
                self.layers.len(),
                self.kv_heads,
                kind
            )));
        }
        let (cos, sin) = (f32_values(&rope.cos)?, f32_values(&rope.sin)?);
        if cos.len() != d || sin.len() != d {
            return Err(Error::Invalid(format!(
                "the fused step takes the rotary tables of one position ([1, 1, {d}]), got {:?}",
                rope.cos.size()
            )));
        }
        let result = self.layers_step(embedding, &cos, &sin, cache);
        match &result {
            Ok(_) => cache.len += 1,
            Err(_) => cache.roll_back(),
        }
        result
    }

    /// The layers of [`Self::step`], each appending one position to `cache`'s rows.
    fn layers_step(
        &self,
        embedding: &[f32],
        cos: &[f32],
        sin: &[f32],
        cache: &mut FusedCache,
    ) -> Result<Vec<f32>> {
        let (kind, d) = (self.kind, self.head_dim);
        let len = cache.len + 1;
        // The SIMD level the element-wise loops below are compiled for (`team::at_isa`).
        let isa = Isa::best();
        let mut x = embedding.to_vec();
        for (layer, (keys, values)) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] = &layer.linears;
            let h = rms_norm(isa, &x, &layer.input_norm, self.eps, kind);
            let [mut q, mut k, v] = TokenLinear::forward_many([q_proj, k_proj, v_proj], &h, kind)?;
            rotate(isa, &mut q, cos, sin, kind);
            rotate(isa, &mut k, cos, sin, kind);
            keys.push(&k);
            values.push(&v);
            debug_assert_eq!(keys.head_len(), len * d);
            let shape = Attention { heads: self.heads, kv_heads: self.kv_heads, head_dim: d, len };
            let attended = match (&*keys, &*values) {
                (Rows::F32(k), Rows::F32(v)) => shape.run(&q, k, v, kind),
                (Rows::Bf16(k), Rows::Bf16(v)) => shape.run(&q, k, v, kind),
                _ => unreachable!("a layer's keys and values are stored alike"),
            };
            let o = o_proj.forward(&attended, kind)?;
            add_assign(isa, &mut x, &o, kind);
            let h = rms_norm(isa, &x, &layer.post_norm, self.eps, kind);
            let [gate, up] = TokenLinear::forward_many([gate_proj, up_proj], &h, kind)?;
            let act = swiglu(isa, &gate, &up, kind);
            let down = down_proj.forward(&act, kind)?;
            add_assign(isa, &mut x, &down, kind);
        }
        Ok(x)
    }
}

/// `f(range)` for disjoint ranges covering `0..items`, one per thread of the own kernels' team
/// (measured on the 7B shape's SwiGLU in scalar code, 11008 inputs on 2 threads: 30 µs in 4
/// ranges, 48 µs in 11, 38 µs on one thread; vectorised, it now runs on one thread: [`swiglu`]),
/// the outputs concatenated in range order.
fn on_team(items: usize, f: &(dyn Fn(Range<usize>) -> Vec<f32> + Sync)) -> Vec<f32> {
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1);
    let chunk = items.div_ceil(threads).max(1);
    let parts = Mutex::new(Vec::new());
    for_each_range(default_team, items, chunk, &|r| {
        let start = r.start;
        let out = f(r);
        parts.lock().unwrap_or_else(|e| e.into_inner()).push((start, out));
    });
    let mut parts = parts.into_inner().unwrap_or_else(|e| e.into_inner());
    parts.sort_by_key(|(start, _)| *start);
    parts.into_iter().flat_map(|(_, out)| out).collect()
}

/// `x += y`, rounded (the residual connections), its loop compiled for `isa` (`team::at_isa`:
/// the same operations at every level).
fn add_assign(isa: Option<Isa>, x: &mut [f32], y: &[f32], kind: StepKind) {
    at_isa(
        isa,
        #[inline(always)]
        || {
            for (x, y) in x.iter_mut().zip(y) {
                *x = kind.round(*x + y);
            }
        },
    )
}

/// `gate.silu() * up`, each rounded: `silu(g) = g / (1 + e^−g)` with [`exp_f32`], compiled for
/// `isa`, on the calling thread. Measured on the AMD EPYC with AVX-512 VNNI (2026-12-06): with
/// `f32::exp` (a libm call per value, which no loop vectorises) on the thread team, the 7B step's
/// 32 SwiGLUs took 0.73–0.85 ms of an 86 ms W4A16 q8 fused step (the step's parts timed in
/// `experiments bench`), 0.22–0.29 ms this way; one SwiGLU of 11008 values in AVX-512 takes 6.0
/// µs on one thread, 9.5 µs on the team of two (6.5 µs of which are the team's hand-out and
/// gather: an empty call), and 28 µs in SSE2 on one thread.
fn swiglu(isa: Option<Isa>, gate: &[f32], up: &[f32], kind: StepKind) -> Vec<f32> {
    at_isa(
        isa,
        #[inline(always)]
        || {
            // A `for` loop over a buffer: the same computation as `zip → map → collect` vectorised
            // only in this form (the collect's code is not inlined into the level's function).
            let mut out = vec![0f32; gate.len().min(up.len())];
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = kind.round(kind.round(g / (1.0 + exp_f32(-g))) * u);
            }
            out
        },
    )
}

/// `e^x` in f32 as straight-line arithmetic that vectorises (a loop calling `f32::exp` calls libm
/// once per value): Cephes' `expf` (<https://github.com/jeremybarnes/cephes/blob/master/single/expf.c>)
/// — `x = n ln 2 + r` with `n` the nearest integer to `x / ln 2` and `ln 2` in two parts, a
/// degree-7 polynomial in `r ∈ [−ln 2 / 2, ln 2 / 2]` — with `2ⁿ` applied as two powers of two,
/// so that the results that are subnormal, overflow or vanish come out as a product of normal
/// numbers rounds them. Within 1 ulp of `e^x` rounded to f32 from f64 on every input tested
/// (every 997th f32 of the range, about 2.2 million; libtorch's vectorised `exp`, Sleef's, is
/// within 1 ulp too); `+∞` from ln(f32::MAX) ≈ 88.7228 up (inputs clamped at 88.73), `0` below
/// ≈ −103.97 (clamped at −104), NaN for NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with 9 significant bits so that `n · LN2_HI` is exact.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2²³ rounds a float of magnitude < 2²² to the nearest integer (ties to even),
    // which then sits in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    // NaN passes `clamp`; the bounds keep `n` in [−150, 128].
    let x = x.clamp(-104.0, 88.73);
    let shifted = x * LOG2_E + ROUNDER;
    let n_float = shifted - ROUNDER;
    let n = shifted.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let r = (x - n_float * LN2_HI) - n_float * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = p * (r * r) + r + 1.0;
    // 2ⁿ as 2^(n − n/2) · 2^(n/2): each factor a normal float for n in [−150, 128].
    let half = n >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    y * pow2(n - half) * pow2(half)
}

/// `Σ a·b` in f32 over 16 partial sums (so the loop vectorises). Always inlined, so that a caller
/// compiled for a wider vector level (`team::at_isa`) vectorises it with that level's lanes.
#[inline(always)]
fn dot<S: Stored>(a: &[f32], b: &[S]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (a, b) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += a[i] * b[i].widen();
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(a, b)| a * b.widen()).sum();
    acc.iter().sum::<f32>() + tail
}

/// [`RmsNorm::forward`](crate::model::norm::RmsNorm::forward): `x · rsqrt(mean(x²) + eps)` in f32,
/// rounded, then times the weight, rounded; compiled for `isa`.
fn rms_norm(isa: Option<Isa>, x: &[f32], weight: &[f32], eps: f32, kind: StepKind) -> Vec<f32> {
    at_isa(
        isa,
        #[inline(always)]
        || {
            let squares = dot(x, x);
            let r = 1.0 / (squares / x.len() as f32 + eps).sqrt();
            // A `for` loop over a buffer, not `map → collect`: see [`swiglu`].
            let mut out = vec![0f32; x.len().min(weight.len())];
            for ((o, &x), &w) in out.iter_mut().zip(x).zip(weight) {
                *o = kind.round(w * kind.round(x * r));
            }
            out
        },
    )
}

/// `Rope::apply` on every head of `x` `[heads · head_dim]`:
/// `x · cos + rotate_half(x) · sin`, each product and the sum rounded; compiled for `isa`.
fn rotate(isa: Option<Isa>, x: &mut [f32], cos: &[f32], sin: &[f32], kind: StepKind) {
    let half = cos.len() / 2;
    let (cos_first, cos_second) = cos.split_at(half);
    let (sin_first, sin_second) = sin.split_at(half);
    at_isa(
        isa,
        #[inline(always)]
        || {
            let r = |x: f32| kind.round(x);
            for head in x.chunks_exact_mut(cos.len()) {
                let (first, second) = head.split_at_mut(half);
                for ((a, b), (((&c1, &c2), &s1), &s2)) in first
                    .iter_mut()
                    .zip(second)
                    .zip(cos_first.iter().zip(cos_second).zip(sin_first).zip(sin_second))
                {
                    // rotate_half: [−second, first].
                    let (x1, x2) = (*a, *b);
                    *a = r(r(x1 * c1) + r(-x2 * s1));
                    *b = r(r(x2 * c2) + r(x1 * s2));
                }
            }
        },
    )
}

/// Grouped-query attention of one query over `len` cached positions.
#[derive(Clone, Copy, Debug)]
struct Attention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
}

impl Attention {
    /// `softmax(q kᵀ / √d) v` per head as [`LlamaAttention`]'s forward computes it: the scores
    /// rounded, scaled and rounded, the softmax in f32 then rounded, the weighted sum of values
    /// in f32 then rounded. Query head `h` reads KV head `h / (heads / kv_heads)` (`repeat_kv`).
    ///
    /// [`LlamaAttention`]: crate::model::llama::LlamaAttention
    fn run<S: Stored + Sync>(
        &self,
        q: &[f32],
        keys: &[Vec<S>],
        values: &[Vec<S>],
        kind: StepKind,
    ) -> Vec<f32> {
        // Heads split over the thread team: each thread reads its own heads' KV rows.
        on_team(self.heads, &|heads| self.heads_range(Isa::best(), heads, q, keys, values, kind))
    }

    /// The outputs `[heads.len() · head_dim]` of query heads `heads`, head by head: each head's
    /// dot products in position order, its softmax, then its values summed in position order.
    /// The cache is head-major ([`Rows`]), so a head's keys, then its values, are one contiguous
    /// read each, which the hardware prefetchers follow from memory (where the cache is after a
    /// step's weights streamed through).
    ///
    /// How it got here, all on the LLaVA-7B shape (bf16 cache, 32 heads of 128):
    /// - Head by head on the position-major cache of before (`[position, kv_head, head_dim]`, one
    ///   head's keys 256-byte pieces 8 KiB apart): 8.0–9.4 ms of a 135–146 ms W4A16 q8 step (Intel
    ///   Xeon with AVX512-BF16, 2026-12-06, `experiments bench` with the step's parts timed, 66–82
    ///   positions); position by position, all of a thread's heads together: 4.6–5.0 ms.
    /// - On the AMD EPYC with AVX-512 VNNI (2026-12-06; a throwaway timing of 32 layers over 80
    ///   positions, 42 MB, read after 256 MiB of other reads): position by position 3.2–4.1 ms;
    ///   with the row two positions ahead prefetched and the loops compiled for the vector level,
    ///   2.0–2.5 ms (one layer in cache 35–44 µs). Then (same timing, the two layouts' binaries
    ///   alternated, three runs each, 3 repeats a run) head-major: 1.11–1.35 ms against 1.88–2.53
    ///   ms for that position-major loop; warm, 0.88–1.25 against 1.38–1.50 ms. No software
    ///   prefetch is left: the streams are contiguous. In the model (the step's parts timed in
    ///   `experiments bench`, 7B W4A16 q8, positions 64–130) the attention took 1.9–2.6 ms a
    ///   step with either layout: there its first read of the cache costs about 1 ms more than a
    ///   second call right after it (not the TLB: with huge pages it was the same), which this
    ///   timing does not reproduce.
    ///
    /// `isa`: the SIMD level the loops are compiled for (`team::at_isa`; the CPU must have it,
    /// `None` is the default target's SSE2): the same Rust in 16 (AVX-512) or 8 (AVX2) lanes
    /// where SSE2 has 4, the bf16 keys and values widened by one `vpmovzxwd` and a shift — the
    /// same results bit for bit (tested at every level the CPU has).
    fn heads_range<S: Stored>(
        &self,
        isa: Option<Isa>,
        heads: Range<usize>,
        q: &[f32],
        keys: &[Vec<S>],
        values: &[Vec<S>],
        kind: StepKind,
    ) -> Vec<f32> {
        at_isa(
            isa,
            #[inline(always)]
            || self.heads_body(heads, q, keys, values, kind),
        )
    }

    /// The attention of `heads` (see [`Self::heads_range`]), inlined into each level's copy.
    #[inline(always)]
    fn heads_body<S: Stored>(
        &self,
        heads: Range<usize>,
        q: &[f32],
        keys: &[Vec<S>],
        values: &[Vec<S>],
        kind: StepKind,
    ) -> Vec<f32> {
        let (d, len) = (self.head_dim, self.len);
        let rep = self.heads / self.kv_heads;
        let scale = (d as f64).powf(-0.5) as f32;
        let mut out = vec![0f32; heads.len() * d];
        let mut scores = vec![0f32; len];
        for (h, out) in heads.zip(out.chunks_exact_mut(d)) {
            // Query head `h` reads KV head `h / rep` (`repeat_kv`): `[len, head_dim]` each.
            let (k, v) = (&keys[h / rep][..len * d], &values[h / rep][..len * d]);
            let qh = &q[h * d..(h + 1) * d];
            for (score, k) in scores.iter_mut().zip(k.chunks_exact(d)) {
                *score = kind.round(kind.round(dot(qh, k)) * scale);
            }
            // ATen's last-dim softmax: exp(x − max), then times 1 / Σ. The exponentials in a loop
            // of their own (it vectorises), then summed in position order.
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for s in scores.iter_mut() {
                *s = exp_f32(*s - max);
            }
            let inv = 1.0 / scores.iter().fold(0f32, |sum, &e| sum + e);
            for s in scores.iter_mut() {
                *s = kind.round(*s * inv);
            }
            // The values weighted in position order, in f32, then rounded.
            for (&p, v) in scores.iter().zip(v.chunks_exact(d)) {
                for (o, v) in out.iter_mut().zip(v) {
                    *o += p * v.widen();
                }
            }
            for o in out.iter_mut() {
                *o = kind.round(*o);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention head by head on a position-major cache (`[len, kv_heads, head_dim]`, the
    /// layout of the fused cache until 2026-12-06): the reference [`Attention::heads_range`] on
    /// the head-major cache must equal bit for bit.
    fn attention_head_by_head<S: Stored>(
        a: &Attention,
        q: &[f32],
        keys: &[S],
        values: &[S],
        kind: StepKind,
    ) -> Vec<f32> {
        let (d, width) = (a.head_dim, a.kv_heads * a.head_dim);
        let rep = a.heads / a.kv_heads;
        let scale = (d as f64).powf(-0.5) as f32;
        let mut out = vec![0f32; a.heads * d];
        for (h, out) in out.chunks_exact_mut(d).enumerate() {
            let column = (h / rep) * d;
            let qh = &q[h * d..(h + 1) * d];
            let mut scores: Vec<f32> = (0..a.len)
                .map(|s| kind.round(kind.round(dot(qh, &keys[s * width + column..][..d])) * scale))
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = exp_f32(*s - max);
                sum += *s;
            }
            let inv = 1.0 / sum;
            let mut acc = vec![0f32; d];
            for (s, &e) in scores.iter().enumerate() {
                let p = kind.round(e * inv);
                for (a, v) in acc.iter_mut().zip(&values[s * width + column..][..d]) {
                    *a += p * v.widen();
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = kind.round(*a);
            }
        }
        out
    }

    #[test]
    fn attention_on_the_head_major_cache_equals_the_position_major_reference_bit_for_bit() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(3);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Every vector level this CPU has, and the default target's.
        let levels: Vec<Option<Isa>> =
            Isa::ALL.into_iter().filter(|i| i.available()).map(Some).chain([None]).collect();
        // Grouped queries (4 per KV head), a head wider than one 16-lane chunk plus a tail; then
        // LLaVA's head width, one query per KV head.
        for (heads, kv_heads, head_dim, len) in [(8, 2, 40, 9), (4, 4, 128, 5)] {
            let a = Attention { heads, kv_heads, head_dim, len };
            let values_of = |n: i64| f32_values(&Tensor::randn([n], (Kind::Float, Device::Cpu)));
            let q = values_of((heads * head_dim) as i64).expect("values");
            let kv = (len * kv_heads * head_dim) as i64;
            let (k, v) = (values_of(kv).expect("values"), values_of(kv).expect("values"));
            let narrow =
                |x: &[f32]| x.iter().map(|&x| u16::narrow(round_bf16(x))).collect::<Vec<_>>();
            let (kb, vb) = (narrow(&k), narrow(&v));
            // The same values as the fused cache holds them, through its own append.
            let head_major = |k: &[f32], v: &[f32], kind: StepKind| {
                let empty = || match kind {
                    StepKind::F32 => Rows::F32(vec![Vec::new(); kv_heads]),
                    StepKind::Bf16 => Rows::Bf16(vec![Vec::new(); kv_heads]),
                };
                let (mut keys, mut values) = (empty(), empty());
                let width = kv_heads * head_dim;
                for (k, v) in k.chunks_exact(width).zip(v.chunks_exact(width)) {
                    keys.push(k);
                    values.push(v);
                }
                (keys, values)
            };
            let widened = |x: &[u16]| x.iter().map(|&x| x.widen()).collect::<Vec<_>>();
            let (Rows::F32(hk), Rows::F32(hv)) = head_major(&k, &v, StepKind::F32) else {
                unreachable!()
            };
            let (Rows::Bf16(hkb), Rows::Bf16(hvb)) =
                head_major(&widened(&kb), &widened(&vb), StepKind::Bf16)
            else {
                unreachable!()
            };
            for kind in [StepKind::F32, StepKind::Bf16] {
                let want_f32 = attention_head_by_head(&a, &q, &k, &v, kind);
                assert_eq!(bits(&a.run(&q, &hk, &hv, kind)), bits(&want_f32), "f32, {kind:?}");
                let want = attention_head_by_head(&a, &q, &kb, &vb, kind);
                assert_eq!(bits(&a.run(&q, &hkb, &hvb, kind)), bits(&want), "bf16, {kind:?}");
                for &isa in &levels {
                    let got = a.heads_range(isa, 0..heads, &q, &hkb, &hvb, kind);
                    assert_eq!(bits(&got), bits(&want), "bf16 cache, {isa:?}, {kind:?}");
                    let got = a.heads_range(isa, 0..heads, &q, &hk, &hv, kind);
                    assert_eq!(bits(&got), bits(&want_f32), "f32 cache, {isa:?}, {kind:?}");
                }
                // The heads split over ranges as the team may split them.
                let split: Vec<f32> = [0..3, 3..heads]
                    .into_iter()
                    .flat_map(|r| a.heads_range(Isa::best(), r, &q, &hkb, &hvb, kind))
                    .collect();
                assert_eq!(bits(&split), bits(&want), "heads in two ranges, {kind:?}");
            }
        }
    }

    #[test]
    fn a_failed_step_leaves_every_head_as_it_was() {
        // Two layers of 3 KV heads of 4, two positions cached; a step that appended to the first
        // layer only, then failed.
        let (kv_heads, d, len) = (3, 4, 2);
        let row = |p: usize| (0..kv_heads * d).map(|i| (p * 100 + i) as f32).collect::<Vec<_>>();
        let filled = || {
            let mut rows = Rows::F32(vec![Vec::new(); kv_heads]);
            (0..len).for_each(|p| rows.push(&row(p)));
            rows
        };
        let mut cache = FusedCache {
            layers: vec![(filled(), filled()), (filled(), filled())],
            len,
            heads: (kv_heads, d),
            kind: StepKind::F32,
        };
        let before = format!("{:?}", cache.layers);
        cache.layers[0].0.push(&row(len));
        cache.layers[0].1.push(&row(len));
        assert_eq!(cache.layers[0].0.head_len(), (len + 1) * d);
        cache.roll_back();
        assert_eq!(format!("{:?}", cache.layers), before);
        // Head 1 of position 1 holds row 1's second piece: the layout is head-major.
        let Rows::F32(heads) = &cache.layers[1].0 else { unreachable!() };
        assert_eq!(heads[1][d..2 * d], [104.0, 105.0, 106.0, 107.0]);
    }

    #[test]
    fn exp_is_within_one_ulp_over_the_f32_range() {
        // Every 997th f32 in [−104, 89] (both signs' bit patterns walked), against f64's `exp`
        // rounded to f32; positive results, so the distance in ulp is the distance of their bits.
        let mut worst = (0u32, 0f32);
        let mut check = |x: f32| {
            let want = (x as f64).exp() as f32;
            let ulp = exp_f32(x).to_bits().abs_diff(want.to_bits());
            if ulp > worst.0 {
                worst = (ulp, x);
            }
        };
        for bits in (0..=104f32.to_bits()).step_by(997) {
            check(-f32::from_bits(bits));
        }
        for bits in (0..=89f32.to_bits()).step_by(997) {
            check(f32::from_bits(bits));
        }
        for x in [-103.97, -103.0, -87.34, -87.33, -10.0, -0.5, 0.0, 0.346_573_6, 88.72, 88.73] {
            check(x);
        }
        assert!(worst.0 <= 1, "{} ulp at {}", worst.0, worst.1);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(88.8), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        // The loops compiled at each vector level and the scalar function agree bit for bit.
        let xs: Vec<f32> = (0..4096).map(|i| (i as f32 - 2048.0) * 0.05).collect();
        let levels = Isa::ALL.into_iter().filter(|i| i.available()).map(Some).chain([None]);
        for isa in levels {
            let got: Vec<f32> = at_isa(
                isa,
                #[inline(always)]
                || {
                    let mut out = vec![0f32; xs.len()];
                    for (o, &x) in out.iter_mut().zip(&xs) {
                        *o = exp_f32(x);
                    }
                    out
                },
            );
            for (x, g) in xs.iter().zip(&got) {
                assert_eq!(g.to_bits(), exp_f32(*x).to_bits(), "{x} at {isa:?}");
            }
        }
    }

    #[test]
    fn element_wise_loops_are_the_same_at_every_vector_level() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(11);
        let values = |n: i64, scale: f64| {
            f32_values(&(Tensor::randn([n], (Kind::Float, Device::Cpu)) * scale)).expect("values")
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Odd lengths (a vector tail), LLaVA's head width for the rotation, large gate values (the
        // exponential's overflow and underflow).
        let (x, w, y) = (values(4099, 3.0), values(4099, 1.0), values(4099, 1.0));
        let (gate, up) = (values(11011, 30.0), values(11011, 1.0));
        let (cos, sin) = (values(128, 1.0), values(128, 1.0));
        let q = values(4096, 2.0);
        for kind in [StepKind::F32, StepKind::Bf16] {
            let norm = rms_norm(None, &x, &w, 1e-5, kind);
            let act = swiglu(None, &gate, &up, kind);
            let (mut added, mut rotated) = (x.clone(), q.clone());
            add_assign(None, &mut added, &y, kind);
            rotate(None, &mut rotated, &cos, &sin, kind);
            for isa in Isa::ALL.into_iter().filter(|i| i.available()).map(Some) {
                let (mut a, mut r) = (x.clone(), q.clone());
                add_assign(isa, &mut a, &y, kind);
                rotate(isa, &mut r, &cos, &sin, kind);
                assert_eq!(bits(&rms_norm(isa, &x, &w, 1e-5, kind)), bits(&norm), "{isa:?}");
                assert_eq!(bits(&swiglu(isa, &gate, &up, kind)), bits(&act), "{isa:?}");
                assert_eq!(bits(&a), bits(&added), "{isa:?}");
                assert_eq!(bits(&r), bits(&rotated), "{isa:?}");
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_torch() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(5);
        let x = Tensor::randn([4096], (Kind::Float, Device::Cpu)) * 1e3;
        let xs = f32_values(&x).expect("values");
        let want = f32_values(&x.to_kind(Kind::BFloat16)).expect("values");
        for (i, (&x, &w)) in xs.iter().zip(&want).enumerate() {
            assert_eq!(round_bf16(x).to_bits(), w.to_bits(), "element {i}: {x}");
        }
        // Ties go to even, overflow to infinity, NaN stays NaN.
        assert_eq!(round_bf16(f32::from_bits(0x3f80_8000)).to_bits(), 0x3f80_0000);
        assert_eq!(round_bf16(f32::from_bits(0x3f81_8000)).to_bits(), 0x3f82_0000);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(u16::narrow(round_bf16(1.5)).widen(), 1.5);
    }
}
