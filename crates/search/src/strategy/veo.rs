//! Visual-encoder optimization (Q-VLM Eq. 8–10, the "disentangled" strategy): the vision tower's
//! activation ranges are learned by gradient descent with straight-through rounding on
//! L = L_reg + λ1·L_ent + λ2·L_err, lowering the cross-layer dependency of the vision sites;
//! the remaining sites are then searched by another strategy (e.g. entropy-blocked).
//!
//! Choices the paper leaves open (README, configurable): λ1, λ2, η (defaults from a small sweep);
//! L_ent is Σ_k w_k·D(k, k+1) over consecutive quantized sites of both towers (the sign that
//! lowers dependency; the printed Eq. 8 would raise it; `entropy_pairs = "vision"` keeps the
//! vision tower's pairs only) with w_k = ‖∂E⁽ⁿ⁾/∂X⁽ᵏ⁾‖ measured at the start of a round (the
//! input image requires grad, so every site's input is on the graph) and normalised to mean 1;
//! the norms of Eq. 9 are relative mean squared errors (scale-free); the trainable tensors are
//! the vision sites' clipping bounds (lo, hi) only, parametrised as offsets in units of the
//! initial range width; AdamW. With `rounds` > 1, VEO and the base strategy alternate, each VEO
//! round training with the previous round's whole plan (its language quantizers) in the loop,
//! until the calibration objective stops improving.

use std::collections::BTreeMap;
use std::time::Instant;

use qvlm_core::hook::{LinearHook, NoHook};
use qvlm_core::layer_id::{LayerId, Tower};
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::optim::{AdamW, AdamWConfig};
use qvlm_core::quant::activation::ActQuantizer;
use qvlm_core::quant::spec::{ActSpec, RangeMode};
use qvlm_core::quant::uniform::{QParams, MIN_SCALE};
use tch::{Kind, Tensor};

use super::config::{BaseStrategy, EntropyPairs, Progress, VeoConfig, VeoInit};
use super::walk::{self, walk_with};
use crate::calib::CalibrationSet;
use crate::engine::{Engine, WeightMethod};
use crate::entropy::{conditional_entropy, level_distribution, subsample, EntropyConfig};
use crate::error::{setting, Result};
use crate::model::{with_answers, SearchModel};
use crate::plan::{LossTerms, PlanHook, QuantPlan, Scheme, VeoRecord, VeoRound};
use crate::site::Site;

/// A vision site's learnable range.
struct Learnable {
    site: Site,
    spec: ActSpec,
    lo0: Tensor,
    width: Tensor,
    a_lo: Tensor,
    a_hi: Tensor,
}

impl Learnable {
    fn bounds(&self) -> (Tensor, Tensor) {
        let lo = &self.lo0 + &self.width * &self.a_lo;
        let hi = &self.lo0 + &self.width + &self.width * &self.a_hi;
        (lo, hi)
    }

    /// Differentiable fake quantization, the same arithmetic as the deployed quantizer
    /// (`QParams::from_range` + fake-quant: range widened to include 0, zero point rounded,
    /// codes clamped) with straight-through rounding, so what VEO trains is what runs.
    fn quantize(&self, x: &Tensor) -> (Tensor, QParams) {
        let ste_round = |t: &Tensor| t + (t.round() - t).detach();
        let (qmin, qmax) = self.spec.grid.range();
        let (lo, hi) = self.bounds();
        let (lo, hi) = (lo.clamp_max(0.0), hi.clamp_min(0.0));
        let (scale, zero_point) = if self.spec.grid.symmetric {
            let amax = lo.abs().maximum(&hi);
            ((amax / ((qmax - qmin) as f64 / 2.0)).clamp_min(MIN_SCALE), lo.zeros_like())
        } else {
            let scale = ((&hi - &lo) / (qmax - qmin) as f64).clamp_min(MIN_SCALE);
            let zp = ste_round(&(Tensor::from(qmin as f64).to_device(lo.device()) - &lo / &scale))
                .clamp(qmin, qmax);
            (scale, zp)
        };
        let u = x.to_kind(Kind::Float) / &scale + &zero_point;
        let q = ste_round(&u).clamp(qmin, qmax);
        let xq = (q - &zero_point) * &scale;
        (xq.to_kind(x.kind()), QParams { grid: self.spec.grid, scale, zero_point })
    }

    fn quantizer(&self) -> ActQuantizer {
        let (lo, hi) = self.bounds();
        ActQuantizer::with_range(self.spec, &lo.detach(), &hi.detach())
    }
}

/// The training hook: learnable vision sites, a fixed plan elsewhere (its quantizers with
/// straight-through gradients). Records every quantized site's input (as its quantizer sees it)
/// with the quantizer's parameters, for L_ent and the Jacobian weights.
struct VeoHook<'l> {
    learnable: &'l [Learnable],
    /// Consumer → learnable index.
    consumer_to_learnable: &'l BTreeMap<LayerId, usize>,
    /// Ids of the quantized sites L_ent and the Jacobian look at (the sites' first consumers).
    watched: &'l BTreeMap<LayerId, usize>,
    fixed: PlanHook,
    seen: BTreeMap<usize, (Tensor, QParams)>,
}

impl<'l> VeoHook<'l> {
    fn new(
        learnable: &'l [Learnable],
        consumer_to_learnable: &'l BTreeMap<LayerId, usize>,
        watched: &'l BTreeMap<LayerId, usize>,
        plan: &QuantPlan,
    ) -> Self {
        Self {
            learnable,
            consumer_to_learnable,
            watched,
            fixed: PlanHook::new(plan),
            seen: BTreeMap::new(),
        }
    }
}

impl LinearHook for VeoHook<'_> {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        let watched = self.watched.get(&id).copied();
        match self.consumer_to_learnable.get(&id) {
            Some(&k) => {
                let (xq, params) = self.learnable[k].quantize(&x);
                if let Some(w) = watched {
                    self.seen.insert(w, (x, params));
                }
                xq
            }
            None => {
                let Some((inv, q)) = self.fixed.at(id) else { return x };
                let scaled = match inv {
                    Some(inv) => &x * inv.to_device(x.device()),
                    None => x.shallow_clone(),
                };
                if let (Some(w), Some(q)) = (watched, q) {
                    let params = q.params_for(&scaled.detach());
                    self.seen.insert(w, (scaled.shallow_clone(), params));
                }
                // Straight-through: the plan's quantized value forward, the identity backward,
                // so gradients reach the vision ranges through every quantized layer (not only
                // around them, through the residual stream).
                let quantized = self.fixed.input(id, x);
                &scaled + (quantized - &scaled).detach()
            }
        }
    }
}

fn set_weights(model: &mut dyn SearchModel, weights: &BTreeMap<LayerId, Tensor>) {
    for l in model.linears_mut() {
        if let Some(w) = weights.get(&l.id) {
            l.weight = LinearWeight::Float(w.shallow_clone());
        }
    }
}

/// One calibration batch through the model: final hidden states (before the head), vision
/// features, the padding mask `[B, T]` and the answer targets. With `track_pixels` the input
/// image requires grad, so that every activation is on the autograd graph.
fn forward(
    model: &dyn SearchModel,
    calib: &CalibrationSet,
    hook: &mut dyn LinearHook,
    track_pixels: bool,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let pass = model.forward_hidden(calib, &with_answers(calib), hook, track_pixels)?;
    let hidden = pass.hidden;
    // Targets: each row's answer tokens sit at its end (left padding).
    let t = hidden.size()[1];
    let mut targets = vec![-100i64; calib.len() * t as usize];
    for (b, a) in calib.answers.iter().enumerate() {
        for (j, &tok) in a.iter().enumerate() {
            let pos = t as usize - a.len() + j; // token position; predicted from pos − 1
            if pos >= 1 {
                targets[b * t as usize + pos - 1] = tok;
            }
        }
    }
    let targets =
        Tensor::from_slice(&targets).view([calib.len() as i64, t]).to_device(model.device());
    Ok((hidden, pass.vision, pass.mask, targets))
}

fn rel_mse(a: &Tensor, b: &Tensor) -> Tensor {
    let num =
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).pow_tensor_scalar(2).mean(Kind::Float);
    num / b.to_kind(Kind::Float).pow_tensor_scalar(2).mean(Kind::Float).clamp_min(1e-12)
}

/// Consecutive quantized sites of one tower, by watched index: `(first, second)`.
type Pairs = Vec<(usize, usize)>;

/// The per-row level distribution of a recorded site input (real rows only: `mask` selects the
/// language model's non-padding positions).
fn distribution(
    x: &Tensor,
    params: &QParams,
    mask: Option<&Tensor>,
    cfg: &EntropyConfig,
) -> Option<Tensor> {
    let c = *x.size().last()?;
    let full = |t: &Tensor| t.to_device(x.device()).expand_as(x).contiguous().reshape([-1, c]);
    let (mut rows, mut scale, mut zero) =
        (x.reshape([-1, c]), full(&params.scale), full(&params.zero_point));
    if let Some(m) = mask {
        let keep = m.reshape([-1]).to_device(x.device()).nonzero().squeeze_dim(1);
        rows = rows.index_select(0, &keep);
        scale = scale.index_select(0, &keep);
        zero = zero.index_select(0, &keep);
    }
    let qp = QParams {
        grid: params.grid,
        scale: subsample(&scale, cfg),
        zero_point: subsample(&zero, cfg),
    };
    Some(level_distribution(&subsample(&rows, cfg), &qp, cfg))
}

/// L_ent (Eq. 8, lowering form): Σ over the pairs of w_first·D(first, second), averaged over the
/// pairs. `weights[k]` is the weight of watched site k (a pair's first site); `language[k]`
/// whether its rows need the padding mask.
fn entropy_term(
    seen: &BTreeMap<usize, (Tensor, QParams)>,
    pairs: &Pairs,
    weights: &[f64],
    language: &[bool],
    mask: &Tensor,
    cfg: &EntropyConfig,
) -> Result<Tensor> {
    let dist = |k: usize| -> Result<Tensor> {
        let (x, p) = seen.get(&k).ok_or_else(|| {
            setting("veo", format!("a watched site ({k}) was not reached by the forward pass"))
        })?;
        distribution(x, p, language[k].then_some(mask), cfg)
            .ok_or_else(|| setting("veo", "a site input without a channel axis"))
    };
    let mut total = Tensor::zeros([], (Kind::Float, mask.device()));
    for &(a, b) in pairs {
        let (pa, pb) = (dist(a)?, dist(b)?);
        let n = pa.size()[0].min(pb.size()[0]);
        total = total.to_device(pa.device())
            + conditional_entropy(&pa.narrow(0, 0, n), &pb.narrow(0, 0, n)) * weights[a];
    }
    Ok(total / pairs.len().max(1) as f64)
}

/// A round's whole plan on the model: the relative error of the final hidden states against the
/// float references, over the calibration batches.
fn plan_objective(
    model: &mut dyn SearchModel,
    calib: &CalibrationSet,
    batches: &[(usize, usize)],
    references: &[(Tensor, Tensor)],
    plan: &QuantPlan,
    float_weights: &BTreeMap<LayerId, Tensor>,
) -> Result<f64> {
    let mut hook = crate::plan::apply(model, plan)?;
    let mut total = 0.0;
    for (&(s, len), (h_r, _)) in batches.iter().zip(references) {
        let part = calib.slice(s, len);
        let (h, _, _, _) = tch::no_grad(|| forward(model, &part, &mut hook, false))?;
        total += rel_mse(&h, h_r).double_value(&[]) * len as f64;
    }
    set_weights(model, float_weights);
    Ok(total / calib.len().max(1) as f64)
}

pub fn run(
    model: &mut dyn SearchModel,
    calib: &CalibrationSet,
    scheme: Scheme,
    weights: WeightMethod,
    cfg: &VeoConfig,
    then: &BaseStrategy,
    progress: Progress<'_>,
) -> Result<QuantPlan> {
    let started = Instant::now();
    let vision_act = scheme.vision.act.ok_or_else(|| {
        setting("strategy.disentangled", "VEO needs the vision tower's activations quantized")
    })?;
    if vision_act.range != RangeMode::Static {
        return Err(setting(
            "strategy.disentangled",
            "VEO learns static vision ranges; set vision act range = \"static\"",
        ));
    }
    cfg.check()?;
    // 1. The starting plan of every site (and the weights): QLoRA's initialization (the paper's
    //    protocol) or the base strategy's own plan.
    let start = match cfg.init {
        VeoInit::Qlora => BaseStrategy::LpInit {
            p: 2.4,
            ratios: (0..10).map(|i| 1.0 - 0.05 * f64::from(i)).collect(),
        },
        VeoInit::Base => then.clone(),
    };
    let init = walk::plan(model, calib, scheme, weights, &start, progress)?;
    let mut cost = init.cost.clone();
    let float_weights: BTreeMap<LayerId, Tensor> =
        model.linears().iter().map(|l| (l.id, l.float_weight())).collect();
    // 2. Learnable vision ranges from the initialization.
    let mut learnable = Vec::new();
    for sp in init.sites.iter().filter(|s| s.site.tower() == Tower::Vision) {
        let Some(act) = &sp.act else { continue };
        let Some((lo, hi)) = &act.range else { continue };
        let (lo, hi) =
            (lo.to_tensor().to_device(model.device()), hi.to_tensor().to_device(model.device()));
        let width = (&hi - &lo).clamp_min(1e-6);
        learnable.push(Learnable {
            site: sp.site.clone(),
            spec: act.spec,
            a_lo: lo.zeros_like().set_requires_grad(true),
            a_hi: lo.zeros_like().set_requires_grad(true),
            lo0: lo,
            width,
        });
    }
    let consumer_to_learnable: BTreeMap<LayerId, usize> = learnable
        .iter()
        .enumerate()
        .flat_map(|(k, l)| l.site.consumers.iter().map(move |c| (*c, k)))
        .collect();
    // The quantized sites L_ent and the Jacobian look at, in execution order, and their pairs.
    let quantized: Vec<Site> = model
        .sites()
        .into_iter()
        .filter(|s| init.sites.iter().any(|p| p.site.id == s.id && p.act.is_some()))
        .filter(|s| match cfg.entropy_pairs {
            EntropyPairs::All => s.tower() != Tower::Projector,
            EntropyPairs::Vision => s.tower() == Tower::Vision,
        })
        .collect();
    let watched: BTreeMap<LayerId, usize> =
        quantized.iter().enumerate().map(|(k, s)| (s.id, k)).collect();
    let language: Vec<bool> = quantized.iter().map(|s| s.tower() == Tower::Language).collect();
    let pairs: Pairs = (1..quantized.len())
        .filter(|&k| quantized[k].tower() == quantized[k - 1].tower())
        .map(|k| (k - 1, k))
        .collect();
    let n = calib.len();
    let batches: Vec<(usize, usize)> =
        (0..n).step_by(cfg.batch_size).map(|s| (s, cfg.batch_size.min(n - s))).collect();
    // The float references of each batch do not change: compute them once.
    set_weights(model, &float_weights);
    let references: Vec<(Tensor, Tensor)> = batches
        .iter()
        .map(|&(s, len)| {
            let part = calib.slice(s, len);
            tch::no_grad(|| forward(model, &part, &mut NoHook, false)).map(|(h, v, _, _)| (h, v))
        })
        .collect::<Result<_>>()?;
    cost.model_passes += batches.len() as u64;

    let mut in_loop = init;
    let mut rounds: Vec<VeoRound> = Vec::new();
    let mut best: Option<(f64, usize, QuantPlan)> = None;
    for round in 0..cfg.rounds {
        // The round's plan on the model: its quantized weights now, its activation quantizers
        // (other than the learnable ones) through `PlanHook` below.
        let _ = crate::plan::apply(model, &in_loop)?;
        // 3. Jacobian weights w_k = ‖∂E⁽ⁿ⁾/∂X⁽ᵏ⁾‖ under the round's starting plan.
        let mut norms = vec![0.0; quantized.len()];
        for (&(s, len), (h_r, _)) in batches.iter().zip(&references) {
            let part = calib.slice(s, len);
            let mut hook = VeoHook::new(&learnable, &consumer_to_learnable, &watched, &in_loop);
            let (hq, _, _, _) = forward(model, &part, &mut hook, true)?;
            let err = (hq - h_r).pow_tensor_scalar(2).sum(Kind::Float);
            let keys: Vec<usize> = hook.seen.keys().copied().collect();
            let inputs: Vec<Tensor> = keys.iter().map(|k| hook.seen[k].0.shallow_clone()).collect();
            if let Some(k) = keys.iter().zip(&inputs).find(|(_, t)| !t.requires_grad()) {
                return Err(setting(
                    "veo",
                    format!("the input of {} is not on the autograd graph", quantized[*k.0].id),
                ));
            }
            let grads = Tensor::run_backward(&[err], &inputs, false, false);
            for (k, g) in keys.iter().zip(grads) {
                norms[*k] += g.norm().double_value(&[]);
            }
            cost.model_passes += 1;
        }
        let openers: Vec<usize> = pairs.iter().map(|p| p.0).collect();
        let mean = openers.iter().map(|&k| norms[k]).sum::<f64>() / openers.len().max(1) as f64;
        if openers.is_empty() || !(mean.is_finite() && mean > 0.0) {
            return Err(setting(
                "veo",
                format!("the Jacobian norms cannot weight L_ent (mean over the pairs: {mean})"),
            ));
        }
        // Weights by watched site; only a pair's first site's weight is read.
        let pair_weights: Vec<f64> = norms.iter().map(|n| n / mean).collect();
        // 4. Optimise the vision ranges with the round's plan in the loop.
        let params: Vec<(Tensor, bool)> = learnable
            .iter()
            .flat_map(|l| [(l.a_lo.shallow_clone(), false), (l.a_hi.shallow_clone(), false)])
            .collect();
        let mut opt =
            AdamW::new(params, AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() });
        let mut curve = Vec::new();
        let mut terms = Vec::new();
        let total_steps = cfg.epochs * batches.len();
        let mut step = 0;
        for epoch in 0..cfg.epochs {
            let mut epoch_loss = 0.0;
            let mut epoch_terms = LossTerms::default();
            for (&(s, len), (h_r, v_r)) in batches.iter().zip(&references) {
                progress(step, total_steps, &format!("VEO round {round} epoch {epoch}"));
                let part = calib.slice(s, len);
                let mut hook = VeoHook::new(&learnable, &consumer_to_learnable, &watched, &in_loop);
                let (h_q, v_q, mask, targets) = forward(model, &part, &mut hook, false)?;
                let logits = model.head(&h_q);
                let vocab = logits.size()[2];
                let l_reg =
                    logits.reshape([-1, vocab]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                        &targets.reshape([-1]),
                        None,
                        tch::Reduction::Mean,
                        -100,
                        0.0,
                    );
                let l_ent = entropy_term(
                    &hook.seen,
                    &pairs,
                    &pair_weights,
                    &language,
                    &mask,
                    &cfg.entropy,
                )?;
                let l_err = rel_mse(&v_q, v_r) + rel_mse(&h_q, h_r) * cfg.eta;
                let loss =
                    &l_reg + l_ent.to_device(l_reg.device()) * cfg.lambda1 + &l_err * cfg.lambda2;
                opt.zero_grad();
                loss.backward();
                opt.step(cfg.lr);
                cost.model_passes += 1;
                let share = 1.0 / batches.len() as f64;
                epoch_loss += loss.double_value(&[]) * share;
                epoch_terms.reg += l_reg.double_value(&[]) * share;
                epoch_terms.ent += l_ent.double_value(&[]) * share;
                epoch_terms.err += l_err.double_value(&[]) * share;
                step += 1;
            }
            if !epoch_loss.is_finite() {
                return Err(setting(
                    "veo",
                    format!("the loss is {epoch_loss} in round {round}, epoch {epoch}"),
                ));
            }
            curve.push(epoch_loss);
            terms.push(epoch_terms);
            tracing::info!(round, epoch, loss = epoch_loss, "VEO");
        }
        set_weights(model, &float_weights);
        // 5. Vision sites fixed at the learned ranges; the rest searched by `then`.
        let fixed: BTreeMap<LayerId, Option<ActQuantizer>> =
            learnable.iter().map(|l| (l.site.id, Some(l.quantizer()))).collect();
        let mut engine = Engine::new(model, calib, scheme)?;
        let (groups, deps) = walk_with(&mut engine, weights, then, &fixed, progress)?;
        let mut plan = engine.into_plan(&format!("disentangled+{}", then.name()));
        plan.groups = groups;
        plan.dependencies = deps;
        cost.absorb(&plan.cost);
        let objective = plan_objective(model, calib, &batches, &references, &plan, &float_weights)?;
        cost.model_passes += batches.len() as u64;
        let by_id = |v: &dyn Fn(usize) -> Option<f64>| -> BTreeMap<LayerId, f64> {
            (0..quantized.len()).filter_map(|k| v(k).map(|x| (quantized[k].id, x))).collect()
        };
        rounds.push(VeoRound {
            jacobian_norms: by_id(&|k| Some(norms[k])),
            jacobian_weights: by_id(&|k| openers.contains(&k).then(|| pair_weights[k])),
            loss_per_epoch: curve,
            first_epoch_terms: terms.first().copied().unwrap_or_default(),
            last_epoch_terms: terms.last().copied().unwrap_or_default(),
            objective,
        });
        tracing::info!(round, objective, "VEO round");
        let improved = best.as_ref().is_none_or(|(b, _, _)| objective < *b);
        if improved {
            best = Some((objective, round, plan.clone()));
        }
        if !improved {
            break;
        }
        in_loop = plan;
    }
    let (_, chosen_round, mut plan) = best.ok_or_else(|| setting("veo.rounds", "no round ran"))?;
    cost.wall_seconds = started.elapsed().as_secs_f64();
    plan.cost = cost;
    plan.veo = Some(VeoRecord {
        lambda1: cfg.lambda1,
        lambda2: cfg.lambda2,
        eta: cfg.eta,
        entropy_pairs: cfg.entropy_pairs.name().into(),
        rounds,
        chosen_round,
    });
    Ok(plan)
}
