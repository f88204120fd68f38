//! A bf16-weight matmul for AVX-512 and AVX2 CPUs that streams its weights at the memory roof: the
//! fair 16-bit baseline of the efficiency bench.
//!
//! Why it exists: libtorch's bf16 linear is far from bandwidth-bound on the CPUs seen (on the
//! 2-core AMD EPYC with AVX512-BF16, 948 ms per LLaVA-7B-shaped decode step for 13.2 GiB of
//! weights, ≈ 15 GB/s against a ≈ 31 GB/s read roof), so "W4A16 is 5× faster than BF16" compared
//! a memory-bound 4-bit kernel with a compute-bound 16-bit one. This kernel is what a 16-bit
//! decode costs when it is as well written as the 4-bit kernel.
//!
//! Numeric: bf16 → f32 is exact (a bf16 is the upper 16 bits of an f32), so each product is the
//! f32 product of the stored weight and the f32 activation, summed in f32 in the order below —
//! the values of a dequantized f32 matmul, only the summation order differs.
//!
//! Layout: rows four at a time (a *quad*, as in [`crate::quant::int4_avx512`]), each quad one
//! contiguous stream of 64-byte lines: the 32 inputs `32·s..32·s + 32` of row `i` of quad `q` at
//! `((q · k/32 + s) · 4 + i) · 32` (u16). One thread then reads one forward stream per range of
//! quads, as the read roof does; row-major storage made each quad four streams 8 KiB apart (LLaVA's
//! `k` = 4096), which the hardware and the one software prefetch per row served worse: measured on
//! the AMD EPYC with AVX-512 VNNI (2 cores, 2026-12-02, a prototype of both loops over 1 GiB of
//! weights, 4 rounds alternated): row-major 34–37 GB/s, interleaved 40–43 GB/s, against a
//! streaming read of 45–48 GB/s.
//!
//! Inner step (AVX-512: 32 weights of one row, four instructions): one 64-byte load holds 32 bf16
//! values; in each 32-bit lane `j` the low half is column `2j` and the high half column `2j + 1`,
//! so `vpslld 16` yields the even columns as f32 and `vpandd 0xffff0000` the odd ones, each FMA'd
//! with the activations of the matching columns. AVX2 (+ FMA) does the same on the two 32-byte
//! halves of each line, 16 weights each; the level is chosen at run time ([`Isa`]). The activation row is split once per
//! call into the even and odd columns of every step (an O(k) copy against the O(n·k) weight
//! stream). A quad's four lines of a step are prefetched together, on AVX-512 each into L2 and
//! later into L1 ([`crate::quant::team::prefetch_stream`]: 16 KiB and 4 KiB ahead; measured
//! there), on AVX2 into L1 ([`crate::quant::team::PREFETCH_BYTES`] ahead); ranges of quads go to libtorch's
//! OpenMP team ([`crate::quant::team`]).
//!
//! More than one activation row (prefill): each quad of rows is widened once into an f32 scratch
//! and multiplied with every activation row from there (the int4 kernel's prefill path).
#![allow(unsafe_code)]

use tch::{Device, Kind, Tensor};

use super::int4_avx512::{self, QUAD};
use super::team::{self, Isa, Team};
use crate::error::{Error, Result};

/// Inputs a row must come in multiples of: one 64-byte load of bf16 (AVX-512; AVX2 steps by 16).
pub const STEP: usize = 32;

/// Inputs per inner step at `isa`.
fn step(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 32,
        Isa::Avx2 => 16,
    }
}

/// Whether this CPU runs the kernel (AVX-512F+BW, or AVX2+FMA).
pub fn available() -> bool {
    Isa::best().is_some()
}

/// Why this kernel cannot take a weight `[n, k]`, if it cannot.
pub fn unsupported(n: usize, k: usize) -> Option<String> {
    if let Some(reason) = team::no_isa_reason() {
        return Some(reason);
    }
    if n == 0 || !n.is_multiple_of(QUAD) {
        return Some(format!("own bf16 kernel needs out % {QUAD} == 0, out = {n}"));
    }
    if k == 0 || !k.is_multiple_of(STEP) {
        return Some(format!("own bf16 kernel needs in % {STEP} == 0, in = {k}"));
    }
    None
}

/// A bf16 weight `[n, k]` as its raw bits (the bytes a bf16 tensor holds), in the kernel's quad
/// layout (module doc).
#[derive(Debug, Clone)]
pub struct Bf16Weight {
    n: usize,
    k: usize,
    /// `[n/4, k/32, 4, 32]` u16.
    lines: Vec<u16>,
    /// The SIMD level [`Bf16Weight::matmul`] runs at.
    isa: Isa,
}

impl Bf16Weight {
    /// From the raw bf16 bits `[n, k]`, row-major; `None` when [`unsupported`] says so or the
    /// length does not match.
    pub fn from_bits(bits: &[u16], n: usize, k: usize) -> Option<Self> {
        if unsupported(n, k).is_some() || Some(bits.len()) != n.checked_mul(k) {
            return None;
        }
        let mut lines = vec![0u16; bits.len()];
        for (row, src) in bits.chunks_exact(k).enumerate() {
            for (s, step) in src.chunks_exact(STEP).enumerate() {
                lines[line_start(row, s, k)..][..STEP].copy_from_slice(step);
            }
        }
        Some(Self { n, k, lines, isa: Isa::best()? })
    }

    /// The same weight at another SIMD level (to compare or test them); `None` when the CPU
    /// lacks it.
    pub fn with_isa(self, isa: Isa) -> Option<Self> {
        isa.available().then_some(Self { isa, ..self })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// From a float weight `[n, k]`, rounded to bf16 as `to_kind(BFloat16)` rounds (exact for a
    /// bf16 weight). An error names `layer` and why the kernel cannot take it.
    pub fn from_tensor(w: &Tensor, layer: &str) -> Result<Self> {
        let err = |reason: String| Error::Quant { layer: layer.to_string(), reason };
        let [n, k] = w.size()[..] else {
            return Err(err(format!("weight must be [out, in], got {:?}", w.size())));
        };
        let (n, k) = (n as usize, k as usize);
        if let Some(reason) = unsupported(n, k) {
            return Err(err(reason));
        }
        let bits = bf16_bits(&w.to_device(Device::Cpu).to_kind(Kind::BFloat16))?;
        Self::from_bits(&bits, n, k)
            .ok_or_else(|| err("weight length does not match its shape".into()))
    }

    /// The weight as a bf16 tensor `[n, k]` on the CPU (exact).
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.to_f32())
            .reshape([self.n as i64, self.k as i64])
            .to_kind(Kind::BFloat16)
    }

    /// `x Wᵀ` for `x` `[.., k]` (any float dtype, on the CPU), computed in f32 and returned in
    /// `x`'s dtype. Panics, like a mismatched `linear`, when `x` is not `[.., k]` or not on the
    /// CPU.
    pub fn matmul_tensor(&self, x: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        assert!(x.device() == Device::Cpu, "own bf16 kernel: activations on {:?}", x.device());
        let mut out_shape = x.size();
        assert_eq!(
            out_shape.last().copied(),
            Some(self.k as i64),
            "own bf16 kernel: x is not [.., k]"
        );
        out_shape.pop();
        out_shape.push(self.n as i64);
        let xs = x.to_kind(Kind::Float).contiguous().reshape([-1]);
        let m = xs.size()[0] as usize / self.k;
        if m == 0 {
            return Tensor::zeros(out_shape.as_slice(), (x.kind(), Device::Cpu));
        }
        let xs = Vec::<f32>::try_from(&xs).expect("f32 activations");
        let y = self.matmul(&xs, m).expect("own bf16 kernel on a CPU it was built for");
        Tensor::from_slice(&y).reshape(out_shape.as_slice()).to_kind(x.kind())
    }

    /// `[n, k]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    /// The raw bf16 bits `[n, k]`, row-major (what [`Self::from_bits`] took).
    pub fn row_major_bits(&self) -> Vec<u16> {
        let mut bits = vec![0u16; self.lines.len()];
        for (row, dst) in bits.chunks_exact_mut(self.k).enumerate() {
            for (s, step) in dst.chunks_exact_mut(STEP).enumerate() {
                step.copy_from_slice(&self.lines[line_start(row, s, self.k)..][..STEP]);
            }
        }
        bits
    }

    /// Bytes held (2 per weight).
    pub fn bytes(&self) -> usize {
        self.lines.len() * 2
    }

    /// The weights as f32 (exact), row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        self.row_major_bits().into_iter().map(widen).collect()
    }

    /// `x Wᵀ` for `x` `[m, k]` f32 row-major: `[m, n]` f32 on the kernel's threads. `None` when
    /// the CPU lacks AVX-512F+BW or `x` is not `m · k` long.
    pub fn matmul(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        self.matmul_on(x, m, team::default_team)
    }

    fn matmul_on(&self, x: &[f32], m: usize, on: Team) -> Option<Vec<f32>> {
        Self::matmul_many_on(&[self], x, m, on)?.pop()
    }

    /// [`Self::matmul`] of several weights on the same `x` in one hand-out of the thread team
    /// (`team::quads_matmul_many`: a layer's q, k and v projections, its gate and up): each
    /// weight's `[m, n_i]`, bit for bit what one call each gives. `None` when any of them would
    /// be refused alone, the weights differ in SIMD level, or `weights` is empty.
    pub fn matmul_many(weights: &[&Self], x: &[f32], m: usize) -> Option<Vec<Vec<f32>>> {
        Self::matmul_many_on(weights, x, m, team::default_team)
    }

    fn matmul_many_on(weights: &[&Self], x: &[f32], m: usize, on: Team) -> Option<Vec<Vec<f32>>> {
        let isa = weights.first()?.isa;
        let refused = |w: &&Self| {
            w.isa != isa || !w.isa.available() || m == 0 || Some(x.len()) != m.checked_mul(w.k)
        };
        if weights.iter().any(refused) {
            return None;
        }
        let split = if m == 1 { split_even_odd(x, step(isa)) } else { Vec::new() };
        team::quads_matmul_many(
            on,
            weights,
            |w| w.n,
            m,
            QUAD,
            16,
            |w, first, count, out| w.rows(x, &split, m, first, count, out),
        )
    }

    /// Quads `first..first + count` into `out` `[count · 4, m]` (`split`: [`split_even_odd`] of
    /// `x` when `m` = 1).
    fn rows(
        &self,
        x: &[f32],
        split: &[f32],
        m: usize,
        first: usize,
        count: usize,
        out: &mut [f32],
    ) {
        assert!(self.isa.available());
        let end = first.checked_add(count).and_then(|e| e.checked_mul(QUAD * self.k));
        assert!(end.is_some_and(|e| e <= self.lines.len()), "quads past the weight");
        assert!(Some(x.len()) == m.checked_mul(self.k), "x is not m · k long");
        assert!(Some(out.len()) == count.checked_mul(QUAD * m), "out is not 4 · count · m long");
        #[cfg(target_arch = "x86_64")]
        {
            if m == 1 {
                assert!(split.len() == self.k, "split activations are not k long");
                // SAFETY: the level is present (asserted); quads, `split` and `out` in bounds
                // (asserted).
                match self.isa {
                    Isa::Avx512 => unsafe { avx512::gemv(self, split, first, count, out) },
                    Isa::Avx2 => unsafe { avx2::gemv(self, split, first, count, out) },
                }
                return;
            }
            let k = self.k;
            let mut scratch = vec![0f32; QUAD * k];
            for q in 0..count {
                // The quad's lines back to its four rows, widened.
                let quad = &self.lines[(first + q) * QUAD * k..][..QUAD * k];
                for (l, line) in quad.chunks_exact(STEP).enumerate() {
                    let (s, i) = (l / QUAD, l % QUAD);
                    for (d, &b) in scratch[i * k + s * STEP..][..STEP].iter_mut().zip(line) {
                        *d = widen(b);
                    }
                }
                let out = &mut out[q * QUAD * m..][..QUAD * m];
                int4_avx512::quad_times_rows(self.isa, &scratch, x, m, k, out);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("available() is false off x86_64");
    }
}

/// Where the line of inputs `STEP·s..STEP·s + STEP` of `row` starts in the quad layout.
fn line_start(row: usize, s: usize, k: usize) -> usize {
    (((row / QUAD) * (k / STEP) + s) * QUAD + row % QUAD) * STEP
}

/// The bit patterns of a bf16 tensor (on the CPU) in its logical order, read as int16 without an
/// f32 copy: a 7B model's lm_head would otherwise need three more copies of itself at once
/// (2 GiB f32 twice, then the bits).
pub(crate) fn bf16_bits(t: &Tensor) -> std::result::Result<Vec<u16>, tch::TchError> {
    let raw = Vec::<i16>::try_from(&t.contiguous().view_dtype(Kind::Int16).reshape([-1]))?;
    Ok(raw.into_iter().map(|v| v as u16).collect())
}

/// bf16 bits → f32 (exact).
pub(crate) fn widen(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `x` (its length a multiple of `step`) with each `step` columns reordered as the even ones,
/// then the odd ones: the order the inner step's two halves meet them.
fn split_even_odd(x: &[f32], step: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (dst, src) in out.chunks_exact_mut(step).zip(x.chunks_exact(step)) {
        for j in 0..step / 2 {
            dst[j] = src[2 * j];
            dst[step / 2 + j] = src[2 * j + 1];
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::int4_avx512::{hsum256, PREFETCH_BYTES};
    use super::{Bf16Weight, QUAD, STEP};

    /// As [`super::avx512::gemv`], each 64-byte line as two halves of 16 weights (`split` in
    /// steps of 16: 8 even columns, then 8 odd).
    ///
    /// SAFETY: AVX2+FMA; the quads lie inside `w.lines`, `split` is `k` long and `out`
    /// `4 · count` long.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv(w: &Bf16Weight, split: &[f32], first: usize, count: usize, out: &mut [f32]) {
        let k = w.k;
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let xp = split.as_ptr();
        for q in 0..count {
            let mut p = w.lines.as_ptr().add((first + q) * QUAD * k);
            let mut even = [_mm256_setzero_ps(); QUAD];
            let mut odd = [_mm256_setzero_ps(); QUAD];
            let mut c = 0;
            while c < k {
                // The quad's four lines of a step further on (hints: never a fault).
                let ahead = (p as *const i8).wrapping_add(PREFETCH_BYTES);
                for line in 0..QUAD {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                }
                for half in 0..2 {
                    let xe = _mm256_loadu_ps(xp.add(c + 16 * half));
                    let xo = _mm256_loadu_ps(xp.add(c + 16 * half + 8));
                    for i in 0..QUAD {
                        let v = _mm256_loadu_si256(p.add(STEP * i + 16 * half) as *const __m256i);
                        let we = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                        let wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                        even[i] = _mm256_fmadd_ps(we, xe, even[i]);
                        odd[i] = _mm256_fmadd_ps(wo, xo, odd[i]);
                    }
                }
                p = p.add(QUAD * STEP);
                c += STEP;
            }
            for i in 0..QUAD {
                *out.get_unchecked_mut(q * QUAD + i) = hsum256(_mm256_add_ps(even[i], odd[i]));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::team::prefetch_stream;
    use super::{Bf16Weight, QUAD, STEP};

    // The split activations meet each step as 16 even columns, then 16 odd ones.
    const _: () = assert!(STEP == 32);

    /// One activation row (`split`, see `split_even_odd`) against quads `first..first + count`.
    ///
    /// SAFETY: AVX-512F+BW; the quads lie inside `w.lines`, `split` is `k` long and `out`
    /// `4 · count` long.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn gemv(w: &Bf16Weight, split: &[f32], first: usize, count: usize, out: &mut [f32]) {
        let k = w.k;
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let xp = split.as_ptr();
        for q in 0..count {
            let mut p = w.lines.as_ptr().add((first + q) * QUAD * k);
            // Even and odd columns in separate accumulators: two independent FMA chains per row.
            let mut even = [_mm512_setzero_ps(); QUAD];
            let mut odd = [_mm512_setzero_ps(); QUAD];
            let mut c = 0;
            while c < k {
                let xe = _mm512_loadu_ps(xp.add(c));
                let xo = _mm512_loadu_ps(xp.add(c + STEP / 2));
                for i in 0..QUAD {
                    // The line further on, into L2 and then into L1 (hints: never a fault).
                    prefetch_stream((p as *const u8).wrapping_add(64 * i));
                    let v = _mm512_loadu_si512(p.add(STEP * i) as *const __m512i);
                    let we = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                    let wo = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                    even[i] = _mm512_fmadd_ps(we, xe, even[i]);
                    odd[i] = _mm512_fmadd_ps(wo, xo, odd[i]);
                }
                p = p.add(QUAD * STEP);
                c += STEP;
            }
            for i in 0..QUAD {
                *out.get_unchecked_mut(q * QUAD + i) =
                    _mm512_reduce_add_ps(_mm512_add_ps(even[i], odd[i]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic weight of exact bf16 values; `None` exactly where the kernel refuses it
    /// (asserted: on a CPU with neither AVX-512F+BW nor AVX2+FMA, because of the CPU).
    fn weight(n: usize, k: usize) -> Option<Bf16Weight> {
        let bits: Vec<u16> = (0..n * k)
            .map(|i| {
                let v = (((i * 7919) % 211) as f32 - 105.0) / 64.0;
                (v.to_bits() >> 16) as u16
            })
            .collect();
        let w = Bf16Weight::from_bits(&bits, n, k);
        if available() {
            assert!(w.is_some(), "[{n}, {k}] refused on a CPU with {:?}", Isa::best());
        } else {
            assert!(w.is_none(), "the kernel took a weight on a CPU without AVX-512 or AVX2");
            assert!(unsupported(n, k).is_some_and(|r| r.contains("AVX2")));
        }
        w
    }

    /// The levels this CPU runs (every test runs at each; an AVX-512 machine also tests AVX2).
    fn levels() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.available()).collect()
    }

    #[test]
    fn matmul_matches_the_f64_reference() {
        for (n, k, m) in [(4, 32, 1), (8, 256, 1), (12, 4096, 1), (8, 96, 3), (16, 512, 6)] {
            for isa in levels() {
                let Some(w) = weight(n, k).and_then(|w| w.with_isa(isa)) else { continue };
                assert_eq!(w.isa(), isa);
                let dense = w.to_f32();
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0).collect();
                let y = w.matmul(&x, m).expect("kernel runs");
                let wide = |v: &[f32]| v.iter().map(|&e| f64::from(e)).collect::<Vec<f64>>();
                let what = format!("{isa:?} [{n}, {k}]");
                team::assert_matches_f64_reference(&wide(&dense), &wide(&x), &y, n, k, m, &what);
            }
        }
    }

    #[test]
    fn weights_in_one_hand_out_equal_each_alone_bit_for_bit() {
        // Three heights (a range of the hand-out crosses from one weight into the next), decode
        // (the even/odd split of `x` made once for all) and prefill.
        for isa in levels() {
            let Some(ws) = [96, 32, 160]
                .iter()
                .map(|&n| weight(n, 512).and_then(|w| w.with_isa(isa)))
                .collect::<Option<Vec<_>>>()
            else {
                return;
            };
            let refs: Vec<&Bf16Weight> = ws.iter().collect();
            for m in [1, 3] {
                let x: Vec<f32> =
                    (0..m * 512).map(|i| ((i * 29) % 89) as f32 / 44.0 - 1.0).collect();
                let many = Bf16Weight::matmul_many(&refs, &x, m).expect("kernel runs");
                let alone = |i: usize| ws[i].matmul(&x, m).expect("kernel runs");
                team::assert_each_equals_alone(&many, ws.len(), alone, &format!("{isa:?} m {m}"));
            }
            let x = vec![0.5f32; 512];
            assert!(Bf16Weight::matmul_many(&[], &x, 1).is_none());
            // Weights at two SIMD levels are refused together (their `x` splits differ).
            if let Some(other) = levels().into_iter().find(|&l| l != isa) {
                let w2 = weight(32, 512).and_then(|w| w.with_isa(other)).expect("available level");
                assert!(Bf16Weight::matmul_many(&[&ws[0], &w2], &x, 1).is_none());
            }
        }
    }

    #[test]
    fn libgomp_and_rayon_teams_give_identical_results() {
        for isa in levels() {
            let Some(w) = weight(256, 512).and_then(|w| w.with_isa(isa)) else { return };
            for m in [1, 5] {
                let x: Vec<f32> =
                    (0..m * 512).map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0).collect();
                let omp = w.matmul_on(&x, m, team::default_team).expect("libgomp team");
                let rayon = w.matmul_on(&x, m, team::rayon_team).expect("rayon team");
                assert_eq!(omp, rayon, "{isa:?} m = {m}");
            }
        }
    }

    #[test]
    fn shapes_and_lengths_are_checked() {
        if !available() {
            assert!(unsupported(4, 32).is_some_and(|r| r.contains("AVX2")));
            return;
        }
        assert!(unsupported(4, 32).is_none());
        assert!(unsupported(6, 32).is_some_and(|r| r.contains("out % 4")));
        assert!(unsupported(4, 48).is_some_and(|r| r.contains("in % 32")));
        assert!(Bf16Weight::from_bits(&[0; 100], 4, 32).is_none());
        let w = weight(4, 32).expect("supported");
        let wrapping_m = usize::MAX / 32 + 2; // m · 32 wraps to 32
        assert!(w.matmul(&[0.0; 32], wrapping_m).is_none());
        assert!(w.matmul(&[0.0; 32], 0).is_none());
        assert_eq!(w.bytes(), 4 * 32 * 2);
    }

    #[test]
    fn the_quad_layout_round_trips_and_holds_each_line_where_the_doc_says() {
        let (n, k) = (8, 96);
        let bits: Vec<u16> = (0..(n * k) as u16).collect();
        let Some(w) = Bf16Weight::from_bits(&bits, n, k) else { return };
        assert_eq!(w.row_major_bits(), bits);
        // Row 5 (quad 1, row 1 of it), inputs 64..96 (step 2): ((1 · 3 + 2) · 4 + 1) · 32.
        assert_eq!(line_start(5, 2, k), 672);
        assert_eq!(&w.lines[672..704], &bits[5 * k + 64..5 * k + 96]);
    }
}
