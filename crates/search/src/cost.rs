//! Search-cost accounting: what a strategy spent, measured by the code that spent it.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What a search cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CostReport {
    pub wall_seconds: f64,
    /// Objective evaluations of a candidate (or a combination of candidates).
    pub candidate_evaluations: u64,
    /// Forward passes of a single linear layer over the calibration data.
    pub layer_forwards: u64,
    /// Forward passes of a block (transformer layer or projector) over the calibration data.
    pub block_forwards: u64,
    /// Full-model forward (and, for VEO, backward) passes over calibration batches.
    pub model_passes: u64,
    /// Largest total size of the calibration tensors held at once (bytes).
    pub peak_cache_bytes: u64,
    /// The partition proxy's own work (entropy-blocked strategies): dependencies D(k, k+1)
    /// measured, the elements of the tensors they read (soft assignments, or the activations for
    /// the quantization-error proxy), and the time spent computing them. Its capture passes count
    /// in `block_forwards`.
    #[serde(default)]
    pub dependency_evaluations: u64,
    #[serde(default)]
    pub dependency_elements: u64,
    #[serde(default)]
    pub dependency_seconds: f64,
    /// Times the block-by-block walk handed the heap's freed pages back to the system before a
    /// block (`qvlm_core::memory::release_freed_heap`: once per block on glibc, 0 where the C
    /// library cannot, and then the README's memory formula, whose constant was measured with
    /// the trims, is not known to hold).
    #[serde(default)]
    pub heap_trims: u64,
}

impl CostReport {
    /// Adds the work of `other` (counts add, the peak is the larger one; wall time is left to the
    /// caller, who measures the whole).
    pub fn absorb(&mut self, other: &CostReport) {
        self.candidate_evaluations += other.candidate_evaluations;
        self.layer_forwards += other.layer_forwards;
        self.block_forwards += other.block_forwards;
        self.model_passes += other.model_passes;
        self.peak_cache_bytes = self.peak_cache_bytes.max(other.peak_cache_bytes);
        self.dependency_evaluations += other.dependency_evaluations;
        self.dependency_elements += other.dependency_elements;
        self.dependency_seconds += other.dependency_seconds;
        self.heap_trims += other.heap_trims;
    }
}

/// Running counters for a [`CostReport`].
#[derive(Debug)]
pub struct CostMeter {
    start: Instant,
    pub report: CostReport,
    live_bytes: u64,
}

impl Default for CostMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl CostMeter {
    pub fn new() -> Self {
        Self { start: Instant::now(), report: CostReport::default(), live_bytes: 0 }
    }

    /// Tensors of `bytes` now held in the calibration cache.
    pub fn hold(&mut self, bytes: u64) {
        self.live_bytes += bytes;
        self.report.peak_cache_bytes = self.report.peak_cache_bytes.max(self.live_bytes);
    }

    /// Tensors of `bytes` released.
    pub fn release(&mut self, bytes: u64) {
        self.live_bytes = self.live_bytes.saturating_sub(bytes);
    }

    pub fn finish(mut self) -> CostReport {
        self.report.wall_seconds = self.start.elapsed().as_secs_f64();
        self.report
    }
}

/// Bytes of a tensor's elements.
pub fn bytes_of(t: &tch::Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_tracks_the_largest_simultaneous_hold() {
        let mut m = CostMeter::new();
        m.hold(100);
        m.hold(50);
        m.release(100);
        m.hold(20);
        m.report.candidate_evaluations += 3;
        let r = m.finish();
        assert_eq!(r.peak_cache_bytes, 150);
        assert_eq!(r.candidate_evaluations, 3);
        assert!(r.wall_seconds >= 0.0);
    }
}
