//! What the probes share: one LLaMA-7B decoder layer's linears, a best-of timer and a seeded
//! random stream. Not every probe uses every piece.
#![allow(dead_code)]

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

/// A xorshift64 stream from a fixed seed: the probes' random codes, the same in every run.
pub fn xorshift() -> impl FnMut() -> u64 {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
