//! Timing one built model: a prefill of a batch-1 prompt into a fresh KV cache, then greedy decode
//! steps (M = 1) with that cache — warm-up steps discarded, the rest timed one by one. The decoder
//! layers and the head (final norm, `lm_head`, argmax) are timed apart, so a model built with
//! fewer layers than its shape can be extrapolated per layer. After every decode step, the
//! decoder's linears alone: every decoder linear of the model once, in layer order, on one token
//! (the same weights, kernels and tensor wrappers a decode step calls, without the attention,
//! norms and activations between them) — how near the kernels come to the roof inside the model,
//! apart from the rest of the step. Step and pass alternate so that each pass is paired with the
//! step just before it: on the 2-core machines the bandwidth moves by tens of percent within
//! seconds, and a separate phase of passes after the steps met another bandwidth (2026-12-04,
//! AMD EPYC, under perf: linears alone 153 ms a pass after decode steps of 140 ms that include
//! them). On the CPU, every step is also run through the fused decode path
//! ([`qvlm_core::model::fused`]: the same layers and weights, the operators between the linears
//! as loops instead of libtorch calls) right after it — the same token at the same position, on
//! its own copy of the prefilled cache — timed the same way and compared with the libtorch step's
//! final hidden state. With a step-paired 16-bit partner (`measure.step_paired_16bit`: a second
//! model of the same shape on the own bf16 kernel), every fused step is followed by the
//! partner's fused step on the same token and position, on a third copy of the prefilled cache
//! (its output is not compared: its weights are others), so that the two are timed in the same
//! seconds; on odd steps the partner's step comes first. With `measure.roof_each_step_mib`, the
//! memory roof is read right after every fused step (one buffer, allocated for the row), so that
//! each step's share of the roof is taken against the bandwidth of its own seconds.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use qvlm_core::model::fused::{FusedCache, FusedDecoder};
use qvlm_core::model::llama::{KvCache, LlamaModel};
use qvlm_core::quant::team::ReadRoof;
use tch::{Device, Kind, Tensor};

use super::config::MeasureSettings;
use super::machine::sync;
use super::model::BenchModel;

/// Milliseconds of one forward pass, split where extrapolation needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Split {
    /// Vision tower + projector (prefill with an image only).
    pub vision_ms: f64,
    /// Embedding lookup (or image splice) and every decoder layer.
    pub layers_ms: f64,
    /// Final norm, `lm_head` and argmax.
    pub head_ms: f64,
}

impl Split {
    pub fn total_ms(&self) -> f64 {
        self.vision_ms + self.layers_ms + self.head_ms
    }
}

/// What one model's prefill and decode took.
#[derive(Debug, Clone, PartialEq)]
pub struct Timings {
    /// Positions the prefill ran through the decoder (text tokens + image features).
    pub prefill_positions: i64,
    pub prefill: Split,
    /// One entry per timed decode step.
    pub decode: Vec<Split>,
    /// Milliseconds of each timed pass of the decoder's linears alone (as many as decode steps).
    pub linears: Vec<f64>,
    /// Each timed decode step again through the fused decode path (empty off the CPU).
    pub fused: Vec<Split>,
    /// The largest difference between a fused step's final hidden state and the libtorch step's,
    /// relative to the largest |value| of the latter, over the timed steps (`None` off the CPU).
    pub fused_max_rel_diff: Option<f64>,
    /// Each timed fused step's partner step (the module doc; empty without a partner).
    pub partner_fused: Vec<Split>,
    /// The memory roof (bytes/s) read right after each timed fused step
    /// (`measure.roof_each_step_mib`; empty when it is off or off the CPU).
    pub fused_roofs: Vec<f64>,
}

impl Timings {
    /// Mean of the timed decode steps.
    pub fn decode_mean(&self) -> Split {
        let n = self.decode.len().max(1) as f64;
        let sum = |f: fn(&Split) -> f64| self.decode.iter().map(f).sum::<f64>() / n;
        Split { vision_ms: 0.0, layers_ms: sum(|s| s.layers_ms), head_ms: sum(|s| s.head_ms) }
    }

    /// Mean of the fused decode steps, if they ran.
    pub fn fused_mean(&self) -> Option<Split> {
        mean_of(&self.fused)
    }

    /// Mean of the partner's fused steps, if it ran.
    pub fn partner_fused_mean(&self) -> Option<Split> {
        mean_of(&self.partner_fused)
    }

    /// Mean of the timed passes of the decoder's linears alone.
    pub fn linears_mean(&self) -> f64 {
        self.linears.iter().sum::<f64>() / self.linears.len().max(1) as f64
    }

    /// Fastest timed decode step (total).
    pub fn decode_min_ms(&self) -> f64 {
        self.decode.iter().map(Split::total_ms).fold(f64::INFINITY, f64::min)
    }
}

/// The mean of decode steps' splits; `None` for none.
fn mean_of(steps: &[Split]) -> Option<Split> {
    let n = steps.len();
    (n > 0).then(|| {
        let sum = |f: fn(&Split) -> f64| steps.iter().map(f).sum::<f64>() / n as f64;
        Split { vision_ms: 0.0, layers_ms: sum(|s| s.layers_ms), head_ms: sum(|s| s.head_ms) }
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Random prompt ids (ids 0–2 are BOS/EOS/UNK in LLaMA's vocabulary).
fn prompt_ids(vocab: i64, n: i64) -> Result<Vec<i64>> {
    let ids = Tensor::randint_low(3.min(vocab - 1), vocab, [n], (Kind::Int64, Device::Cpu));
    Vec::<i64>::try_from(&ids).context("reading prompt ids")
}

/// Times `model` as the module doc says (a prefill image is `image_side` pixels square for
/// Qwen2-VL; LLaVA's is its tower's size); `bar` advances once per decode step. `partner`: the
/// step-paired 16-bit model (the module doc), with as many decoder layers as `model`.
pub fn run(
    model: &BenchModel,
    partner: Option<&BenchModel>,
    spec: &MeasureSettings,
    image_side: i64,
    bar: &ProgressBar,
) -> Result<Timings> {
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let lm = model.language_model();
    let ids: Vec<i64> = prompt_ids(lm.cfg.vocab_size, spec.prefill_tokens)?
        .into_iter()
        .map(|id| if model.is_text_token(id) { id } else { 3 })
        .collect();

    // Untimed: one short forward pays one-time costs (thread pool, kernel selection, first-touch
    // of activation buffers) outside the timed prefill.
    let warm = model.prefill(&ids[..ids.len().min(4)], None, None)?;
    let _ = lm.head(&warm.hidden.select(1, -1)).argmax(-1, false);
    sync(device);

    // Prefill.
    let mut prefill = Split::default();
    let t = Instant::now();
    let image = if spec.prefill_image { Some(model.random_image(image_side)?) } else { None };
    sync(device);
    prefill.vision_ms = ms(t);
    let t = Instant::now();
    let mut cache = KvCache::new(lm.layers.len());
    let done = model.prefill(&ids, image.as_ref(), Some(&mut cache))?;
    sync(device);
    prefill.layers_ms = ms(t);
    let t = Instant::now();
    let mut next = lm.head(&done.hidden.select(1, -1)).argmax(-1, false);
    sync(device);
    prefill.head_ms = ms(t);

    // Decode, each step followed by the same step on the fused path and a pass of the linears
    // alone.
    let linears_pass = linears_pass(model);
    let mut fused = match device {
        Device::Cpu => {
            let decoder = FusedDecoder::new(lm).context("the fused decode path")?;
            let cache = FusedCache::from_kv(&cache, lm.layers.len(), model.kind())
                .context("the prefilled cache for the fused decode path")?;
            Some((decoder, cache))
        }
        _ => None,
    };
    let mut partner = match (partner, device) {
        (Some(p), Device::Cpu) => {
            let p_lm = p.language_model();
            let decoder = FusedDecoder::new(p_lm).context("the 16-bit partner's fused path")?;
            let cache = FusedCache::from_kv(&cache, p_lm.layers.len(), p.kind())
                .context("the prefilled cache for the 16-bit partner")?;
            Some((p_lm, decoder, cache))
        }
        (Some(_), _) => bail!("a step-paired 16-bit partner runs on the CPU only"),
        (None, _) => None,
    };
    // The roof after every fused step: only where the fused path runs (the CPU).
    let roof_reader = match (spec.roof_each_step_mib, &fused) {
        (Some(mib), Some(_)) => {
            let bytes = mib.checked_mul(1 << 20).context("measure.roof_each_step_mib overflows")?;
            Some(ReadRoof::try_new(bytes).with_context(|| {
                format!("allocating the roof read after every step ({mib} MiB, measure.roof_each_step_mib)")
            })?)
        }
        _ => None,
    };
    let mut fused_roofs = Vec::with_capacity(spec.decode_tokens);
    let mut partner_steps = Vec::with_capacity(spec.decode_tokens);
    let mut decode = Vec::with_capacity(spec.decode_tokens);
    let mut linears = Vec::with_capacity(spec.decode_tokens);
    let mut fused_steps = Vec::with_capacity(spec.decode_tokens);
    let mut fused_max_rel_diff: Option<f64> = None;
    for step in 0..spec.warmup_tokens + spec.decode_tokens {
        let token = next.shallow_clone();
        let t = Instant::now();
        let position = &done.next_position + step as i64;
        let h = model.decode(&token, &position, &mut cache)?;
        sync(device);
        let layers_ms = ms(t);
        let t = Instant::now();
        next = lm.head(&h.select(1, -1)).argmax(-1, false);
        sync(device);
        let head_ms = ms(t);
        // The partner's step before the row's fused step on odd steps, after it on even ones:
        // neither side always follows the libtorch step.
        let mut run_partner = || -> Result<Option<Split>> {
            match &mut partner {
                Some((p_lm, decoder, cache)) => Ok(Some(
                    timed_fused_step(p_lm, decoder, &token, &position, cache)
                        .context("the 16-bit partner's fused step")?
                        .0,
                )),
                None => Ok(None),
            }
        };
        let partner_first = step % 2 == 1;
        let mut partner_step = if partner_first { run_partner()? } else { None };
        let fused_step = match &mut fused {
            Some((decoder, cache)) => {
                let (split, fused_h) = timed_fused_step(lm, decoder, &token, &position, cache)
                    .context("the fused decode step")?;
                let scale = h.to_kind(Kind::Float).abs().max().double_value(&[]);
                let diff = (fused_h.to_kind(Kind::Float) - h.to_kind(Kind::Float))
                    .abs()
                    .max()
                    .double_value(&[]);
                Some((split, diff / scale))
            }
            None => None,
        };
        // One read per prefetch variant, right after the fused step.
        let roof_now = roof_reader.as_ref().map(|r| r.read(1));
        if !partner_first {
            partner_step = run_partner()?;
        }
        let linears_ms = linears_pass()?;
        if step >= spec.warmup_tokens {
            decode.push(Split { vision_ms: 0.0, layers_ms, head_ms });
            linears.push(linears_ms);
            if let Some((split, diff)) = fused_step {
                fused_steps.push(split);
                fused_max_rel_diff = Some(fused_max_rel_diff.map_or(diff, |d| d.max(diff)));
            }
            partner_steps.extend(partner_step);
            fused_roofs.extend(roof_now);
        }
        bar.inc(1);
    }
    Ok(Timings {
        prefill_positions: done.positions,
        prefill,
        decode,
        linears,
        fused: fused_steps,
        fused_max_rel_diff,
        partner_fused: partner_steps,
        fused_roofs,
    })
}

/// One fused decode step of `token` at `position` on `decoder` (the layers of `lm`), then `lm`'s
/// head on its output, each timed: the split and the final hidden state.
fn timed_fused_step(
    lm: &LlamaModel,
    decoder: &FusedDecoder,
    token: &Tensor,
    position: &Tensor,
    cache: &mut FusedCache,
) -> qvlm_core::error::Result<(Split, Tensor)> {
    let t = Instant::now();
    let h = decoder.step_token(token, position, cache)?;
    let layers_ms = ms(t);
    let t = Instant::now();
    let _ = std::hint::black_box(lm.head(&h.select(1, -1)).argmax(-1, false));
    Ok((Split { vision_ms: 0.0, layers_ms, head_ms: ms(t) }, h))
}

/// One pass of the decoder's linears alone, as the module doc says, in milliseconds.
fn linears_pass(model: &BenchModel) -> impl Fn() -> Result<f64> + '_ {
    let device = model.device();
    let layers = &model.language_model().layers;
    // One input per width (hidden, intermediate), in the model's dtype, as a decode step has.
    let mut inputs: Vec<(i64, Tensor)> = Vec::new();
    for l in layers.iter().flat_map(|l| l.linears()) {
        if !inputs.iter().any(|(k, _)| *k == l.in_features) {
            let x = Tensor::randn([1, 1, l.in_features], (model.kind(), device));
            inputs.push((l.in_features, x));
        }
    }
    move || -> Result<f64> {
        let t = Instant::now();
        for l in layers.iter().flat_map(|l| l.linears()) {
            let (_, x) = inputs
                .iter()
                .find(|(k, _)| *k == l.in_features)
                .context("an input of every linear's width was made above")?;
            let _ = std::hint::black_box(l.forward_raw(x));
        }
        sync(device);
        Ok(ms(t))
    }
}
