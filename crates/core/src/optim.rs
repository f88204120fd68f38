//! AdamW over a list of tensors (decoupled weight decay, Loshchilov & Hutter 2019), matching
//! `torch.optim.AdamW`'s update
//! (<https://github.com/pytorch/pytorch/blob/v2.5.0/torch/optim/adamw.py#L346-L414>).
//! tch's own optimizers need a `VarStore`; the models here are built from named tensors.

use tch::Tensor;

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

#[derive(Debug)]
struct Slot {
    param: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: i32,
}

impl AdamW {
    /// `params`: (tensor, apply weight decay?) — norms, biases and embeddings usually do not decay.
    pub fn new(params: Vec<(Tensor, bool)>, cfg: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|(param, decay)| Slot {
                m: param.zeros_like(),
                v: param.zeros_like(),
                param,
                decay,
            })
            .collect();
        Self { cfg, slots, step: 0 }
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Clips the global gradient norm to `max_norm`; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let mut total = 0.0;
        for s in &self.slots {
            let g = s.param.grad();
            if g.defined() {
                total += g.pow_tensor_scalar(2).sum(g.kind()).double_value(&[]);
            }
        }
        let norm = total.sqrt();
        if norm > max_norm && norm.is_finite() {
            let scale = max_norm / (norm + 1e-6);
            for s in &mut self.slots {
                let mut g = s.param.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(scale);
                }
            }
        }
        norm
    }

    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.cfg;
        let bias1 = 1.0 - c.beta1.powi(self.step);
        let bias2 = 1.0 - c.beta2.powi(self.step);
        for s in &mut self.slots {
            let g = s.param.grad();
            if !g.defined() {
                continue;
            }
            if s.decay && c.weight_decay > 0.0 {
                let _ = s.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = s.m.g_mul_scalar_(c.beta1);
            let _ = s.m.g_add_(&(&g * (1.0 - c.beta1)));
            let _ = s.v.g_mul_scalar_(c.beta2);
            let _ = s.v.g_add_(&(&g * &g * (1.0 - c.beta2)));
            let denom = (&s.v / bias2).sqrt() + c.eps;
            let update = (&s.m / bias1) / denom * lr;
            let _ = s.param.g_sub_(&update);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn adamw_minimizes_a_quadratic() {
        let x = Tensor::from_slice(&[3.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![(x.shallow_clone(), false)], AdamWConfig::default());
        for _ in 0..500 {
            opt.zero_grad();
            let loss =
                (&x - Tensor::from_slice(&[1.0f32, 1.0])).pow_tensor_scalar(2).sum(Kind::Float);
            loss.backward();
            opt.step(0.05);
        }
        let v: Vec<f32> = Vec::try_from(&x.detach()).unwrap_or_default();
        assert!((v[0] - 1.0).abs() < 1e-2 && (v[1] - 1.0).abs() < 1e-2, "{v:?}");
    }
}
