//! Visual-encoder optimization (Q-VLM Eq. 8–10, the "disentangled" strategy): the vision tower's
//! activation ranges are learned by gradient descent with straight-through rounding on
//! L = L_reg + λ1·L_ent + λ2·L_err, lowering the cross-layer dependency of the vision sites;
//! the remaining sites are then searched by another strategy (e.g. entropy-blocked).
//!
//! Choices the paper leaves open (README, configurable): λ1, λ2, η (defaults from a small sweep);
//! L_ent is Σ_k w_k·D(k, k+1) (the sign that lowers dependency; the printed Eq. 8 would raise
//! it) with w_k = ‖∂E⁽ⁿ⁾/∂X⁽ᵏ⁾‖ measured once at the start and normalised to mean 1; the norms
//! of Eq. 9 are relative mean squared errors (scale-free); the trainable tensors are the vision
//! sites' clipping bounds (lo, hi) only, parametrised as offsets in units of the initial range
//! width; AdamW.

use std::collections::BTreeMap;

use qvlm_core::hook::{LinearHook, NoHook};
use qvlm_core::layer_id::{LayerId, Tower};
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::model::llava::Llava;
use qvlm_core::optim::{AdamW, AdamWConfig};
use qvlm_core::quant::activation::ActQuantizer;
use qvlm_core::quant::spec::{ActSpec, RangeMode};
use qvlm_core::quant::uniform::{QParams, MIN_SCALE};
use tch::{Kind, Tensor};

use super::config::{BaseStrategy, Progress, VeoConfig};
use super::walk::{self, walk_with};
use crate::calib::CalibrationSet;
use crate::engine::{Engine, WeightMethod};
use crate::entropy::{conditional_entropy, level_distribution, subsample, EntropyConfig};
use crate::error::{setting, Result};
use crate::plan::{PlanHook, QuantPlan, Scheme};
use crate::site::{sites, Site};

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

/// The training hook: learnable vision sites, fixed plan elsewhere; records the vision sites'
/// (pre-quantization) inputs and their soft-assignment parameters for L_ent.
struct VeoHook<'l> {
    learnable: &'l [Learnable],
    consumer_to_site: BTreeMap<LayerId, usize>,
    fixed: PlanHook,
    seen: BTreeMap<usize, (Tensor, QParams)>,
}

impl LinearHook for VeoHook<'_> {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        match self.consumer_to_site.get(&id) {
            Some(&k) => {
                let (xq, params) = self.learnable[k].quantize(&x);
                if id == self.learnable[k].site.id {
                    self.seen.insert(k, (x, params));
                }
                xq
            }
            None => self.fixed.input(id, x),
        }
    }
}

fn set_weights(model: &mut Llava, weights: &BTreeMap<LayerId, Tensor>) {
    for l in model.linears_mut() {
        if let Some(w) = weights.get(&l.id) {
            l.weight = LinearWeight::Float(w.shallow_clone());
        }
    }
}

/// Final hidden states (before the head), vision features and logits of a batch.
fn forward(
    model: &Llava,
    calib: &CalibrationSet,
    hook: &mut dyn LinearHook,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let pixels = calib.pixels.to_device(model.device()).to_kind(model.kind());
    let vision = model.vision_tower.forward(&pixels, hook);
    let features = model.projector.forward(&vision, hook);
    let images: Vec<Tensor> = (0..features.size()[0]).map(|b| features.narrow(0, b, 1)).collect();
    let seqs: Vec<Vec<qvlm_core::io::prompt::Piece>> = calib
        .prompts
        .iter()
        .zip(&calib.answers)
        .map(|(p, a)| {
            let mut p = p.clone();
            if !a.is_empty() {
                p.push(qvlm_core::io::prompt::Piece::Tokens(a.clone()));
            }
            p
        })
        .collect();
    let batch = model.prepare(&seqs, &images)?;
    let hidden = model.decode_hidden(&batch, None, hook);
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
    Ok((hidden, vision, batch.mask, targets))
}

fn rel_mse(a: &Tensor, b: &Tensor) -> Tensor {
    let num =
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).pow_tensor_scalar(2).mean(Kind::Float);
    num / b.to_kind(Kind::Float).pow_tensor_scalar(2).mean(Kind::Float).clamp_min(1e-12)
}

/// L_ent over consecutive learnable sites: the mean of w_k·D(k, k+1) over the pairs.
fn entropy_term(
    seen: &BTreeMap<usize, (Tensor, QParams)>,
    weights: &[f64],
    cfg: &EntropyConfig,
) -> Tensor {
    let mut total = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    let dist = |k: usize| -> Option<Tensor> {
        let (x, p) = seen.get(&k)?;
        let full = |t: &Tensor| t.expand_as(x).contiguous();
        let c = *x.size().last()?;
        let rows = x.reshape([-1, c]);
        let qp = QParams {
            grid: p.grid,
            scale: subsample(&full(&p.scale).reshape([-1, c]), cfg),
            zero_point: subsample(&full(&p.zero_point).reshape([-1, c]), cfg),
        };
        Some(level_distribution(&subsample(&rows, cfg), &qp, cfg))
    };
    let mut pairs = 0usize;
    for k in 0..weights.len() {
        if let (Some(a), Some(b)) = (dist(k), dist(k + 1)) {
            let n = a.size()[0].min(b.size()[0]);
            total = total.to_device(a.device())
                + conditional_entropy(&a.narrow(0, 0, n), &b.narrow(0, 0, n)) * weights[k];
            pairs += 1;
        }
    }
    total / pairs.max(1) as f64
}

pub fn run(
    model: &mut Llava,
    calib: &CalibrationSet,
    scheme: Scheme,
    weights: WeightMethod,
    cfg: &VeoConfig,
    then: &BaseStrategy,
    progress: Progress<'_>,
) -> Result<QuantPlan> {
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
    // 1. QLoRA-style initialization of every site (and the weights).
    let init = walk::plan(
        model,
        calib,
        scheme,
        weights,
        &BaseStrategy::LpInit {
            p: 2.4,
            ratios: (0..10).map(|i| 1.0 - 0.05 * f64::from(i)).collect(),
        },
        progress,
    )?;
    let float_weights: BTreeMap<LayerId, Tensor> =
        model.linears().iter().map(|l| (l.id, l.float_weight())).collect();
    let fixed_hook = crate::plan::apply(model, &init)?;
    let quant_weights: BTreeMap<LayerId, Tensor> =
        model.linears().iter().map(|l| (l.id, l.float_weight())).collect();
    // 2. Learnable vision ranges from the initialization.
    let all_sites = sites(model);
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
    let consumer_to_site: BTreeMap<LayerId, usize> = learnable
        .iter()
        .enumerate()
        .flat_map(|(k, l)| l.site.consumers.iter().map(move |c| (*c, k)))
        .collect();
    let n = calib.len();
    let batches: Vec<(usize, usize)> =
        (0..n).step_by(cfg.batch_size).map(|s| (s, cfg.batch_size.min(n - s))).collect();
    // 3. Jacobian weights w_k = ‖∂E⁽ⁿ⁾/∂X⁽ᵏ⁾‖ at the initialization, normalised to mean 1.
    let mut jac = vec![0.0; learnable.len()];
    for &(s, len) in &batches {
        let part = calib.slice(s, len);
        set_weights(model, &float_weights);
        let reference = tch::no_grad(|| forward(model, &part, &mut NoHook))?;
        set_weights(model, &quant_weights);
        let mut hook = VeoHook {
            learnable: &learnable,
            consumer_to_site: consumer_to_site.clone(),
            fixed: PlanHook::new(&init),
            seen: BTreeMap::new(),
        };
        let (hq, _, _, _) = forward(model, &part, &mut hook)?;
        let err = (hq - &reference.0).pow_tensor_scalar(2).sum(Kind::Float);
        let keys: Vec<usize> = hook.seen.keys().copied().collect();
        let inputs: Vec<Tensor> = keys.iter().map(|k| hook.seen[k].0.shallow_clone()).collect();
        if inputs.iter().all(|t| t.requires_grad()) && !inputs.is_empty() {
            let grads = Tensor::run_backward(&[err], &inputs, false, false);
            for (k, g) in keys.iter().zip(grads) {
                jac[*k] += g.norm().double_value(&[]);
            }
        }
    }
    let mean = jac.iter().sum::<f64>() / jac.len().max(1) as f64;
    let weights_k: Vec<f64> = jac.iter().map(|j| if mean > 0.0 { j / mean } else { 1.0 }).collect();
    let pair_weights: Vec<f64> = weights_k.iter().skip(1).copied().collect();
    // 4. Optimise.
    let params: Vec<(Tensor, bool)> = learnable
        .iter()
        .flat_map(|l| [(l.a_lo.shallow_clone(), false), (l.a_hi.shallow_clone(), false)])
        .collect();
    let mut opt = AdamW::new(params, AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() });
    let mut curve = Vec::new();
    let total_steps = cfg.epochs * batches.len();
    let mut step = 0;
    let mut model_passes = 0u64;
    // The float references of each batch do not change: compute them once.
    set_weights(model, &float_weights);
    let references: Vec<(Tensor, Tensor)> = batches
        .iter()
        .map(|&(s, len)| {
            let part = calib.slice(s, len);
            tch::no_grad(|| forward(model, &part, &mut NoHook)).map(|(h, v, _, _)| (h, v))
        })
        .collect::<Result<_>>()?;
    model_passes += batches.len() as u64;
    set_weights(model, &quant_weights);
    for epoch in 0..cfg.epochs {
        let mut epoch_loss = 0.0;
        for (&(s, len), (h_r, v_r)) in batches.iter().zip(&references) {
            progress(step, total_steps, &format!("VEO epoch {epoch}"));
            let part = calib.slice(s, len);
            let mut hook = VeoHook {
                learnable: &learnable,
                consumer_to_site: consumer_to_site.clone(),
                fixed: PlanHook::new(&init),
                seen: BTreeMap::new(),
            };
            let (h_q, v_q, _, targets) = forward(model, &part, &mut hook)?;
            let logits = model.language_model.head(&h_q);
            let vocab = logits.size()[2];
            let l_reg =
                logits.reshape([-1, vocab]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                    &targets.reshape([-1]),
                    None,
                    tch::Reduction::Mean,
                    -100,
                    0.0,
                );
            let l_ent = entropy_term(&hook.seen, &pair_weights, &cfg.entropy);
            let l_err = rel_mse(&v_q, v_r) + rel_mse(&h_q, h_r) * cfg.eta;
            let loss = &l_reg + l_ent.to_device(l_reg.device()) * cfg.lambda1 + l_err * cfg.lambda2;
            opt.zero_grad();
            loss.backward();
            opt.step(cfg.lr);
            model_passes += 1;
            epoch_loss += loss.double_value(&[]) / batches.len() as f64;
            step += 1;
        }
        curve.push(epoch_loss);
        tracing::info!(epoch, loss = epoch_loss, "VEO");
    }
    drop(fixed_hook);
    set_weights(model, &float_weights);
    // 5. Vision sites fixed at the learned ranges; the rest searched by `then`.
    let fixed: BTreeMap<LayerId, Option<ActQuantizer>> =
        learnable.iter().map(|l| (l.site.id, Some(l.quantizer()))).collect();
    let _ = all_sites;
    let mut engine = Engine::new(model, calib, scheme)?;
    engine.meter.report = init.cost.clone();
    engine.meter.report.model_passes += model_passes + 2 * batches.len() as u64;
    let (groups, deps) = walk_with(&mut engine, weights, then, &fixed, progress)?;
    let mut plan = engine.into_plan(&format!("disentangled+{}", then.name()));
    plan.groups = groups;
    plan.dependencies = deps;
    plan.notes.insert("veo_loss_per_epoch".into(), format!("{curve:?}"));
    plan.notes.insert("veo_jacobian_weights".into(), format!("{weights_k:?}"));
    plan.notes.insert(
        "veo_lambdas".into(),
        format!("lambda1={} lambda2={} eta={}", cfg.lambda1, cfg.lambda2, cfg.eta),
    );
    Ok(plan)
}
