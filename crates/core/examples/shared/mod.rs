//! What the probes share: one LLaMA-7B decoder layer's linears and a best-of timer.

use std::time::Instant;

/// One LLaMA-7B decoder layer's linears `[out, in]`: q, k, v, o, gate, up, down.
pub const LAYER: [(usize, usize); 7] = [
    (4096, 4096),
    (4096, 4096),
    (4096, 4096),
    (4096, 4096),
    (11008, 4096),
    (11008, 4096),
    (4096, 11008),
];

/// The fastest of `repeats` timed runs of `pass` after one untimed, in seconds.
pub fn best_of(repeats: usize, mut pass: impl FnMut()) -> f64 {
    pass();
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            pass();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
