//! The one extension point of the forward pass: a hook passed explicitly to `forward` sees the
//! input of every quantizable linear, in execution order, and may replace it (fake-quantize it,
//! record statistics for calibration, …). No global state, no mode flags on modules.

use tch::Tensor;

use crate::layer_id::LayerId;

/// Sees — and may replace — the input activation of every quantizable linear.
pub trait LinearHook {
    /// Called with the input `x` of linear `id` (shape `[.., in_features]`); returns what the
    /// linear consumes. The default passes `x` through.
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        let _ = id;
        x
    }

    /// Whether this hook passes every input through unchanged and records nothing, so that a
    /// path which runs the linears without calling hooks (the fused decode step,
    /// [`crate::model::fused`]) computes exactly what the hooked path would. Only [`NoHook`]
    /// says so; a path that cannot call hooks refuses every other hook.
    fn is_pass_through(&self) -> bool {
        false
    }
}

/// The float forward pass: every input passes through unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHook;

impl LinearHook for NoHook {
    fn is_pass_through(&self) -> bool {
        true
    }
}

/// Two hooks in sequence (e.g. an observer after a fake-quantizer).
pub struct Chain<'a, A: LinearHook + ?Sized, B: LinearHook + ?Sized>(pub &'a mut A, pub &'a mut B);

impl<A: LinearHook + ?Sized, B: LinearHook + ?Sized> LinearHook for Chain<'_, A, B> {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        let x = self.0.input(id, x);
        self.1.input(id, x)
    }

    fn is_pass_through(&self) -> bool {
        self.0.is_pass_through() && self.1.is_pass_through()
    }
}
