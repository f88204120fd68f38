//! This crate's own W4A16 matmul for AVX-512 CPUs: 4-bit codes in a register-friendly layout,
//! dequantized through a 16-entry lookup table held in one register and multiplied in f32; and
//! its AVX2 + FMA variant on the same layout, for CPUs without AVX-512 (chosen at run time,
//! [`Isa`]; it can be forced on an AVX-512 CPU to test it).
//!
//! Why it exists: decode is one row of activations against every weight (a GEMV), so its speed is
//! the rate at which the 4-bit codes stream from memory. libtorch's `_weight_int4pack_mm_for_cpu`
//! streams about 17 GB/s on the 2-core development machine (63 % of its copy bandwidth in the
//! efficiency bench); this kernel streams 21.7 GB/s (74 % in the bench).
//!
//! Layout (`words`, u32): rows are taken four at a time (a *quad*); a quad's codes are one
//! contiguous stream of 64-byte blocks, block `b` of row `i` of the quad at
//! `((quad · blocks + b) · 4 + i) · 16` words. Lane `j` (0..16) of such a block holds the codes
//! of columns `128·b + 16·s + j` for `s` = 0..8, column `s` in bits `4s..4s + 4`. One block is
//! 128 inputs of one row (exactly one group of 128).
//!
//! Inner step (16 weights of one row, three instructions): bring nibble `s` of every lane to its
//! low 4 bits (a lane shift or a byte shift, chosen by the CPU's vendor, see `nibble`), `vpermps` with that as indices into the row's current lookup table (`vpermps` reads only the
//! low 4 bits of each index), `vfmadd` with 16 activations. The table of a group is
//! `(c − (zero_point − qmin)) · scale` for `c` = 0..16, in f32 — the same values
//! [`crate::quant::packed::PackedWeight::dequantize`] computes, so only the summation order
//! differs from a dequantized f32 matmul. Each thread streams a contiguous range of quads with a
//! software prefetch (measured on a prototype of this loop: 4.7 → 11.4 GB/s on one core of the
//! development machine, where the hardware prefetcher alone leaves the core waiting on memory):
//! on AVX-512 each line into L2 16 KiB ahead and into L1 4 KiB ahead
//! ([`crate::quant::team::prefetch_stream`], measured there), on AVX2 into L1 [`PREFETCH_BYTES`]
//! ahead. The threads are libtorch's OpenMP team ([`crate::quant::team`]),
//! which hands out ranges of quads through an atomic counter.
//!
//! AVX2 has no 16-entry table in one register (`vpermps` on 8 lanes reads 3 index bits), so each
//! 8 codes are masked out (`vpsrld`, `vpand`), converted (`vcvtdq2ps`) and centred, `c − offset`
//! (`vsubps`, exact), before the FMA into the group's accumulator, which is multiplied by the
//! group's scale once at the group's end: five instructions per 8 weights where AVX-512 spends
//! three per 16, so the summation differs from the f32 matmul of the dequantized weight by one
//! rounding per group. Each 64-byte block is read as two 32-byte halves (lanes 0–7 and 8–15), one
//! row of a quad at a time. Measured on an AMD EPYC with AVX2 only (2 cores, 2026-12-02, one
//! `[65536, 4096]` weight, decode, several runs on a shared machine): 5.1 GB/s with the four rows
//! at once and a multiply per weight (registers spilled), 7.8 GB/s one row at a time, 7.4–9.7 GB/s
//! with the scale once per group, against a 15–20 GB/s streaming-read roof (about 40–65 % of it:
//! compute-bound); libtorch's int4 kernel 6.0–6.9 GB/s on the same codes.
//!
//! More than one row of activations (prefill): each quad is dequantized once into a scratch row
//! of f32 and multiplied with every activation row from there.
//!
//! `unsafe` here: the AVX-512 intrinsics and their unaligned loads (every load's range is checked
//! against the slice lengths, with checked arithmetic, before the unchecked loop starts).
#![allow(unsafe_code)]

use super::int4_pairs;
use super::team::{self, Isa, Team};

/// Inputs per 64-byte block of one row.
pub const BLOCK: usize = 128;
/// Rows per quad.
pub const QUAD: usize = 4;
const _: () = assert!(int4_pairs::BLOCK == BLOCK && int4_pairs::QUAD == QUAD);
/// How far ahead each own kernel prefetches its stream: [`team::PREFETCH_BYTES`].
pub use super::team::PREFETCH_BYTES;

/// Why this kernel cannot take a weight `[n, k]` in groups of `group`, if it cannot.
pub fn unsupported(n: usize, k: usize, group: usize) -> Option<String> {
    if let Some(reason) = team::no_isa_reason() {
        return Some(reason);
    }
    if !n.is_multiple_of(QUAD) {
        return Some(format!("own int4 kernel needs out % {QUAD} == 0, out = {n}"));
    }
    if !k.is_multiple_of(BLOCK) {
        return Some(format!("own int4 kernel needs in % {BLOCK} == 0, in = {k}"));
    }
    if group == 0 || !group.is_multiple_of(16) || !k.is_multiple_of(group) {
        return Some(format!(
            "own int4 kernel needs a group that is a multiple of 16 and divides in = {k}, got {group}"
        ));
    }
    None
}

/// Whether this CPU runs the kernel (AVX-512F+BW, or the AVX2+FMA variant).
pub fn available() -> bool {
    Isa::best().is_some()
}

/// One 64-byte cache line of codes, aligned as one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct CacheLine([u32; 16]);

const _: () = assert!(size_of::<CacheLine>() == 64 && align_of::<CacheLine>() == 64);

/// The codes of an [`Int4Weight`], stored as whole cache lines, so that every 64-byte load of the
/// kernels (one row's block of 128 codes) reads one line, where a `Vec<u32>` starts wherever the
/// allocator puts it (16 bytes past a page for large ones) and splits each load over two lines.
/// Measured on the Intel Xeon with AVX512-BF16 (2026-12-06): the bench's weights started at 0, 16,
/// 32 or 48 bytes into a line (the probe's at 16). The gain was not resolved above that machine's
/// noise: `examples/stream_probe`, binaries alternated, the VNNI kernel's share of the roof
/// relative to the bf16 kernel's went from 0.86–0.90 to 0.91–0.94 (2 runs each); in the model
/// (`experiments bench`, LLaVA-7B W4A16 q8, 1 round each) the fused step read 79–80 % of the roof
/// before and after. Kept because it removes a cost (two L1 accesses per split load) for none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheLines(Vec<CacheLine>);

impl CacheLines {
    /// `words` zero words; `None` unless a whole number of lines (16 words).
    pub(crate) fn zeroed(words: usize) -> Option<Self> {
        words.is_multiple_of(16).then(|| Self(vec![CacheLine::default(); words / 16]))
    }

    /// The same words, copied onto lines; `None` unless a whole number of lines.
    #[cfg(test)]
    pub(crate) fn from_words(words: &[u32]) -> Option<Self> {
        let mut lines = Self::zeroed(words.len())?;
        lines.copy_from_slice(words);
        Some(lines)
    }
}

impl std::ops::Deref for CacheLines {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        // SAFETY: `CacheLine` is `repr(C)` around `[u32; 16]` (64 bytes, no padding: size and
        // alignment agree), so `len` lines are `16 · len` contiguous, initialised u32s.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u32>(), self.0.len() * 16) }
    }
}

impl std::ops::DerefMut for CacheLines {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in `deref`, borrowed mutably from `self.0`.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u32>(), self.0.len() * 16)
        }
    }
}

/// A 4-bit weight `[n, k]` with one f32 scale and one zero point per `group` inputs of a row, in
/// the kernel's layout. It is the only copy of the codes: [`Int4Weight::nibbles`] gives back
/// the portable storage order.
#[derive(Debug, Clone)]
pub struct Int4Weight {
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) group: usize,
    /// `[n/4, k/128, 4, 16]` u32, 8 codes per word, each 64-byte row block on a cache line.
    pub(crate) words: CacheLines,
    /// `[n, k/group]` f32.
    pub(crate) scale: Vec<f32>,
    /// `[n, k/group]` u8 (asymmetric grids); `None`: symmetric, zero points 0.
    pub(crate) zero_point: Option<Vec<u8>>,
    /// The grid's lowest integer (`c = q − qmin`).
    pub(crate) qmin: i32,
    /// The SIMD level [`Int4Weight::matmul`] runs at.
    pub(crate) isa: Isa,
    /// How more than one row of activations is multiplied.
    pub(crate) prefill: Prefill,
}

/// How [`Int4Weight::matmul`] multiplies more than one row of activations (a prefill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// In bf16 pairs ([`crate::quant::int4_pairs`]: exact products, the scale once per group)
    /// where the CPU, the weight and the activations allow it ([`Int4Weight::paired_prefill_refused`]
    /// and every activation a bf16 value), in f32 otherwise.
    Auto,
    /// In f32 always: each quad dequantized to f32 and multiplied with every activation row.
    F32,
}

impl Int4Weight {
    /// From the portable storage: `nibbles` `[n, k/2]` (column `2j` in the high nibble of byte
    /// `j`), `scale` and `zero_point` `[n, k/group]`. `None` when [`unsupported`] says so or a
    /// length does not match.
    pub fn from_nibbles(
        nibbles: &[u8],
        scale: Vec<f32>,
        zero_point: Option<Vec<u8>>,
        qmin: i32,
        n: usize,
        k: usize,
        group: usize,
    ) -> Option<Self> {
        let (Some(numel), Some(groups)) = (n.checked_mul(k), n.checked_mul(k / group.max(1)))
        else {
            return None;
        };
        if unsupported(n, k, group).is_some()
            || nibbles.len() != numel / 2
            || scale.len() != groups
            || zero_point.as_ref().is_some_and(|z| z.len() != scale.len())
        {
            return None;
        }
        let blocks = k / BLOCK;
        let mut words = CacheLines::zeroed(numel / 8)?;
        for row in 0..n {
            let src = &nibbles[row * k / 2..(row + 1) * k / 2];
            let (quad, i) = (row / QUAD, row % QUAD);
            for b in 0..blocks {
                let dst = &mut words[((quad * blocks + b) * QUAD + i) * 16..][..16];
                for s in 0..8 {
                    for (j, word) in dst.iter_mut().enumerate() {
                        let col = b * BLOCK + s * 16 + j;
                        let byte = src[col / 2];
                        let code = if col.is_multiple_of(2) { byte >> 4 } else { byte & 15 };
                        *word |= u32::from(code) << (4 * s);
                    }
                }
            }
        }
        let isa = Isa::best()?;
        Some(Self { n, k, group, words, scale, zero_point, qmin, isa, prefill: Prefill::Auto })
    }

    /// The same weight at another SIMD level (to compare or test them); `None` when the CPU
    /// lacks it.
    pub fn with_isa(self, isa: Isa) -> Option<Self> {
        isa.available().then_some(Self { isa, ..self })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The same weight with its prefill path set (to compare the two or test them).
    pub fn with_prefill(self, prefill: Prefill) -> Self {
        Self { prefill, ..self }
    }

    /// Why a prefill on this weight runs in f32 whatever its activations, if it does (the CPU,
    /// the level, the group size, the zero points, or [`Prefill::F32`]); `None`: it runs in bf16
    /// pairs when every activation is a bf16 value.
    pub fn paired_prefill_refused(&self) -> Option<String> {
        if self.prefill == Prefill::F32 {
            return Some("its prefill is set to f32".into());
        }
        if self.isa != Isa::Avx512 {
            return Some(format!("the weight is held at the {} level", self.isa.name()));
        }
        int4_pairs::refused(&self.codes())
    }

    /// The codes as the paired prefill reads them.
    pub(crate) fn codes(&self) -> int4_pairs::Codes<'_> {
        int4_pairs::Codes {
            words: &self.words,
            scale: &self.scale,
            zero_point: self.zero_point.as_deref(),
            qmin: self.qmin,
            n: self.n,
            k: self.k,
            group: self.group,
        }
    }

    /// The codes in the portable storage order (`[n, k/2]`, the inverse of [`Self::from_nibbles`]).
    pub fn nibbles(&self) -> Vec<u8> {
        let (n, k) = (self.n, self.k);
        let blocks = k / BLOCK;
        let mut out = vec![0u8; n * k / 2];
        for row in 0..n {
            let dst = &mut out[row * k / 2..(row + 1) * k / 2];
            let (quad, i) = (row / QUAD, row % QUAD);
            for b in 0..blocks {
                let src = &self.words[((quad * blocks + b) * QUAD + i) * 16..][..16];
                for s in 0..8 {
                    for (j, word) in src.iter().enumerate() {
                        let col = b * BLOCK + s * 16 + j;
                        let code = ((word >> (4 * s)) & 15) as u8;
                        dst[col / 2] |= if col.is_multiple_of(2) { code << 4 } else { code };
                    }
                }
            }
        }
        out
    }

    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    pub fn zero_point(&self) -> Option<&[u8]> {
        self.zero_point.as_deref()
    }

    /// `[n, k]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    pub fn group(&self) -> usize {
        self.group
    }

    /// Bytes held in memory (codes, scales, zero points).
    pub fn bytes(&self) -> usize {
        self.words.len() * 4 + self.scale.len() * 4 + self.zero_point.as_ref().map_or(0, Vec::len)
    }

    /// `x Wᵀ` for `x` `[m, k]` f32 (row-major): `[m, n]` f32, on the kernel's threads. `None`
    /// when the CPU lacks AVX-512F+BW or `x` is not `m · k` long.
    pub fn matmul(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        self.matmul_on(x, m, team::default_team)
    }

    fn matmul_on(&self, x: &[f32], m: usize, on: Team) -> Option<Vec<f32>> {
        Self::matmul_many_on(&[self], x, m, on)?.pop()
    }

    /// [`Self::matmul`] of several weights on the same `x` in one hand-out of the thread team
    /// (`team::quads_matmul_many`: a layer's q, k and v projections, its gate and up): each
    /// weight's `[m, n_i]`, bit for bit what one call each gives. `None` when any of them would
    /// be refused alone, or `weights` is empty.
    pub fn matmul_many(weights: &[&Self], x: &[f32], m: usize) -> Option<Vec<Vec<f32>>> {
        Self::matmul_many_on(weights, x, m, team::default_team)
    }

    fn matmul_many_on(weights: &[&Self], x: &[f32], m: usize, on: Team) -> Option<Vec<Vec<f32>>> {
        let refused =
            |w: &&Self| !w.isa.available() || m == 0 || Some(x.len()) != m.checked_mul(w.k);
        if weights.is_empty() || weights.iter().any(refused) {
            return None;
        }
        // A prefill in bf16 pairs on each weight that takes it alone (decided once per call),
        // when the activations are bf16 values (put in the pair layout once for all weights and
        // threads).
        let k = weights[0].k;
        let takes_pairs: Vec<bool> =
            weights.iter().map(|w| m > 1 && w.paired_prefill_refused().is_none()).collect();
        let paired =
            takes_pairs.iter().any(|&p| p).then(|| int4_pairs::PairedRows::new(x, m, k)).flatten();
        let pairs_for =
            |w: &Self| weights.iter().zip(&takes_pairs).any(|(v, &p)| p && std::ptr::eq(*v, w));
        // At least 16 quads (64 rows) per range: long enough a stream for the prefetch to run
        // ahead of the loads.
        team::quads_matmul_many(
            on,
            weights,
            |w| w.n,
            m,
            QUAD,
            16,
            |w, first, count, out| match &paired {
                Some(p) if pairs_for(w) => {
                    let prefetch = |q: usize| w.prefetch_quad(q);
                    int4_pairs::quads(&w.codes(), p, first, count, out, &prefetch)
                }
                _ => w.rows(x, m, first, count, out),
            },
        )
    }

    /// Rows `4·first .. 4·(first + count)` dequantized, `[4·count, k]` f32 row-major (the values
    /// of [`crate::quant::packed::PackedWeight::dequantize`]). `None` without AVX-512F+BW or past
    /// the last quad.
    pub fn dequantize_quads(&self, first: usize, count: usize) -> Option<Vec<f32>> {
        let end = first.checked_add(count)?.checked_mul(QUAD)?;
        if !self.isa.available() || end > self.n {
            return None;
        }
        // `count · 4 · k` ≤ `n · k`, which the codes' allocation already holds.
        let mut out = vec![0f32; count * QUAD * self.k];
        for (q, rows) in out.chunks_mut(QUAD * self.k).enumerate() {
            self.dequantize_quad(first + q, rows);
        }
        Some(out)
    }

    /// Quad `quad` (in range, checked by the caller) into `rows` `[4, k]` f32.
    fn dequantize_quad(&self, quad: usize, rows: &mut [f32]) {
        assert!(self.isa.available() && rows.len() == QUAD * self.k && (quad + 1) * QUAD <= self.n);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is present, the quad exists and `rows` is `4 · k` long (asserted).
        match self.isa {
            Isa::Avx512 => unsafe { avx512::dequantize_quad(self, quad, rows) },
            Isa::Avx2 => unsafe { avx2::dequantize_quad(self, quad, rows) },
        }
    }

    /// Hints that quad `quad`'s codes will be read soon (into L2); past the last quad, nothing.
    fn prefetch_quad(&self, quad: usize) {
        let words = (self.k / BLOCK) * QUAD * 16;
        let Some(codes) = quad.checked_mul(words).and_then(|s| self.words.get(s..s + words)) else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        for line in codes.chunks(16) {
            // SAFETY: SSE (baseline x86-64); a prefetch is a hint that never faults.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    line.as_ptr() as *const i8
                )
            };
        }
    }

    /// Quads `first..first + count` into `out` `[count · 4, m]`.
    fn rows(&self, x: &[f32], m: usize, first: usize, count: usize, out: &mut [f32]) {
        assert!(self.isa.available());
        let blocks = self.k / BLOCK;
        let end = first.checked_add(count).expect("quad range overflows");
        // Every product below is checked: a wrapped bound would let the unchecked loops run
        // past the slices in a release build.
        let words = end.checked_mul(blocks * QUAD * 16);
        let scales = end.checked_mul(QUAD * (self.k / self.group));
        assert!(words.is_some_and(|w| w <= self.words.len()), "quads past the codes");
        assert!(scales.is_some_and(|s| s <= self.scale.len()), "quads past the scales");
        assert!(Some(x.len()) == m.checked_mul(self.k), "x is not m · k long");
        assert!(Some(out.len()) == count.checked_mul(QUAD * m), "out is not 4 · count · m long");
        if m == 1 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is present (asserted above); every index the loops form is below
            // the lengths asserted above.
            match self.isa {
                Isa::Avx512 => unsafe { avx512::gemv(self, x, first, count, out) },
                Isa::Avx2 => unsafe { avx2::gemv(self, x, first, count, out) },
            }
            return;
        }
        let mut scratch = vec![0f32; QUAD * self.k];
        for q in 0..count {
            // The next quad's codes on their way to L2 while this one is multiplied (its
            // dequantization otherwise waited on them: 14 % of a prefill's time, perf, AMD EPYC).
            self.prefetch_quad(first + q + 1);
            self.dequantize_quad(first + q, &mut scratch);
            quad_times_rows(self.isa, &scratch, x, m, self.k, &mut out[q * QUAD * m..][..QUAD * m]);
        }
    }

    /// `(c − (zero_point − qmin), scale)` of row `row`, group `g`: the lookup table is
    /// `(c − offset) · scale`.
    fn offset_scale(&self, row: usize, g: usize) -> (f32, f32) {
        let i = row * (self.k / self.group) + g;
        let zp = self.zero_point.as_ref().map_or(0, |z| i32::from(z[i]));
        ((zp - self.qmin) as f32, self.scale[i])
    }
}

/// The prefill step shared by the own kernels: a quad of rows already in f32 (`quad` `[4, k]`)
/// times the `m` activation rows of `x` `[m, k]`, into `out` `[4, m]`. AVX-512: four activation
/// rows at a time (16 accumulators), the rest one by one; AVX2: one by one. Needs the level
/// (asserted), `k` a multiple of 16.
pub(crate) fn quad_times_rows(
    isa: Isa,
    quad: &[f32],
    x: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    assert!(isa.available() && k.is_multiple_of(16));
    assert!(Some(quad.len()) == k.checked_mul(QUAD) && Some(x.len()) == m.checked_mul(k));
    assert!(Some(out.len()) == m.checked_mul(QUAD));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        for r in 0..m {
            // SAFETY: AVX2+FMA (asserted); four rows of `k` and one of `k`.
            let dots = unsafe { avx2::dot4(quad, &x[r * k..(r + 1) * k], k) };
            for (i, d) in dots.into_iter().enumerate() {
                out[i * m + r] = d;
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let whole = m / 4 * 4;
        // SAFETY: AVX-512F+BW (asserted); `quad` is four rows of `k`, `x` at least `whole` rows.
        let tiles = unsafe { avx512::dot4x4_rows(quad, &x[..whole * k], k) };
        for (t, dots) in tiles.into_iter().enumerate() {
            for (i, row) in dots.into_iter().enumerate() {
                out[i * m + 4 * t..][..4].copy_from_slice(&row);
            }
        }
        for r in whole..m {
            // SAFETY: as above; one row of `k`.
            let dots = unsafe { avx512::dot4(quad, &x[r * k..(r + 1) * k], k) };
            for (i, d) in dots.into_iter().enumerate() {
                out[i * m + r] = d;
            }
        }
    }
}

/// The sum of the 8 lanes of `v` (AVX2).
///
/// SAFETY: the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{hsum256, Int4Weight, BLOCK, PREFETCH_BYTES, QUAD};

    /// Codes `c` of nibble `S` of the 8 lanes of `v`, as f32, minus the offset: `c − offset`
    /// (an exact small integer).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn centred<const S: i32>(v: __m256i, offset: __m256) -> __m256 {
        let c = _mm256_and_si256(_mm256_srli_epi32::<S>(v), _mm256_set1_epi32(15));
        _mm256_sub_ps(_mm256_cvtepi32_ps(c), offset)
    }

    /// Codes `c` of nibble `S` of the 8 lanes of `v`, as f32, dequantized: `(c − offset) · scale`
    /// (the values of the AVX-512 table).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dequantize<const S: i32>(v: __m256i, offset: __m256, scale: __m256) -> __m256 {
        _mm256_mul_ps(centred::<S>(v, offset), scale)
    }

    /// `(offset, scale)` of row `row`, group `g`, broadcast.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn table(w: &Int4Weight, row: usize, g: usize) -> (__m256, __m256) {
        let (offset, scale) = w.offset_scale(row, g);
        (_mm256_set1_ps(offset), _mm256_set1_ps(scale))
    }

    /// One row of activations against quads `first..first + count`: `out[4q + i]`.
    ///
    /// The rows of a quad are taken one at a time (AVX2 has 16 vector registers: four rows' codes,
    /// tables and accumulators at once would spill); a quad's codes (`k/2` bytes a row, 8 KiB
    /// for LLaMA-7B's 4096 inputs) stay in L1 between its rows, and the first row prefetches the
    /// whole quad ahead.
    ///
    /// SAFETY: the caller checked AVX2+FMA and that the quads, their scales and `x` (`k` long)
    /// are in bounds.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv(w: &Int4Weight, x: &[f32], first: usize, count: usize, out: &mut [f32]) {
        let blocks = w.k / BLOCK;
        let steps_per_group = w.group / 16;
        for q in 0..count {
            let quad = w.words.as_ptr().add((first + q) * blocks * QUAD * 16);
            for i in 0..QUAD {
                let row = (first + q) * QUAD + i;
                // Two accumulators of the current group, `Σ (c − offset) · x` (lanes 0–7 and
                // 8–15 of each block); at the end of a group `y += scale · acc` — the scale
                // multiplies once per group instead of once per weight.
                let mut acc = [_mm256_setzero_ps(); 2];
                let mut y = _mm256_setzero_ps();
                let (mut offset, mut scale) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let (mut group, mut left) = (0usize, 0usize);
                let mut xp = x.as_ptr();
                let mut p = quad.add(i * 16);
                for _ in 0..blocks {
                    if i == 0 {
                        // The four rows' lines of a block further on (hints: never a fault).
                        let ahead = (p as *const i8).wrapping_add(PREFETCH_BYTES);
                        for line in 0..QUAD {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                        }
                    }
                    let v0 = _mm256_loadu_si256(p as *const __m256i);
                    let v1 = _mm256_loadu_si256(p.add(8) as *const __m256i);
                    macro_rules! step {
                        ($s:literal) => {{
                            if left == 0 {
                                y = _mm256_fmadd_ps(_mm256_add_ps(acc[0], acc[1]), scale, y);
                                acc = [_mm256_setzero_ps(); 2];
                                (offset, scale) = table(w, row, group);
                                group += 1;
                                left = steps_per_group;
                            }
                            left -= 1;
                            let x0 = _mm256_loadu_ps(xp.add($s * 16));
                            let x1 = _mm256_loadu_ps(xp.add($s * 16 + 8));
                            let c0 = centred::<{ 4 * $s }>(v0, offset);
                            let c1 = centred::<{ 4 * $s }>(v1, offset);
                            acc[0] = _mm256_fmadd_ps(c0, x0, acc[0]);
                            acc[1] = _mm256_fmadd_ps(c1, x1, acc[1]);
                        }};
                    }
                    step!(0);
                    step!(1);
                    step!(2);
                    step!(3);
                    step!(4);
                    step!(5);
                    step!(6);
                    step!(7);
                    p = p.add(QUAD * 16);
                    xp = xp.add(BLOCK);
                }
                y = _mm256_fmadd_ps(_mm256_add_ps(acc[0], acc[1]), scale, y);
                *out.get_unchecked_mut(q * QUAD + i) = hsum256(y);
            }
        }
    }

    /// The four rows of quad `quad` dequantized into `scratch` `[4, k]` f32.
    ///
    /// SAFETY: as [`gemv`]; `scratch` is `4 · k` long.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dequantize_quad(w: &Int4Weight, quad: usize, scratch: &mut [f32]) {
        let blocks = w.k / BLOCK;
        let dst = scratch.as_mut_ptr();
        for i in 0..QUAD {
            let row = quad * QUAD + i;
            let (mut offset, mut scale) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for b in 0..blocks {
                let at = ((quad * blocks + b) * QUAD + i) * 16;
                let v = [0, 8]
                    .map(|h| _mm256_loadu_si256(w.words.as_ptr().add(at + h) as *const __m256i));
                macro_rules! step {
                    ($s:literal) => {{
                        let col = b * BLOCK + $s * 16;
                        if col.is_multiple_of(w.group) {
                            (offset, scale) = table(w, row, col / w.group);
                        }
                        for (h, &vh) in v.iter().enumerate() {
                            let values = dequantize::<{ 4 * $s }>(vh, offset, scale);
                            _mm256_storeu_ps(dst.add(i * w.k + col + 8 * h), values);
                        }
                    }};
                }
                step!(0);
                step!(1);
                step!(2);
                step!(3);
                step!(4);
                step!(5);
                step!(6);
                step!(7);
            }
        }
    }

    /// Dot products of the four `k`-long rows of `rows` with `x`.
    ///
    /// SAFETY: AVX2+FMA; `rows` is `4 · k` and `x` `k` long, `k` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(rows: &[f32], x: &[f32], k: usize) -> [f32; QUAD] {
        assert!(rows.len() == QUAD * k && x.len() == k && k.is_multiple_of(8));
        let mut acc = [_mm256_setzero_ps(); QUAD];
        let (r, xp) = (rows.as_ptr(), x.as_ptr());
        let mut c = 0;
        while c < k {
            let xv = _mm256_loadu_ps(xp.add(c));
            for i in 0..QUAD {
                acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(r.add(i * k + c)), xv, acc[i]);
            }
            c += 8;
        }
        acc.map(|a| hsum256(a))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Int4Weight, BLOCK, QUAD};

    /// The 16-entry table `(c − offset) · scale`, c = 0..16 (same f32 operations as the
    /// dequantization: an exact small integer times the scale).
    #[target_feature(enable = "avx512f,avx512bw")]
    fn lut(offset: f32, scale: f32) -> __m512 {
        let iota =
            _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
        _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(offset)), _mm512_set1_ps(scale))
    }

    /// Lanes whose low 4 bits are nibble `S` of `v`'s lanes (`vpermps` ignores the upper bits).
    ///
    /// Two ways, the same bits (tested): with `BYTE_SHIFTS`, half of the steps shift each lane
    /// (`vpsrld`, port 0, which also runs the FMAs on an Intel CPU with one 512-bit FMA unit) and
    /// half shift each 128-bit lane by whole bytes (`vpsrldq`, port 5, beside the `vpermps`);
    /// without, every step shifts lanes. Which is faster depends on the core, so [`ShiftMix`]
    /// picks by vendor: on the Intel Xeon development machine the mix won (one core, weights in
    /// cache, 12.3 → 13.1 GB/s; two cores from memory 21.0 → 21.7 GB/s); on the AMD EPYC with
    /// AVX-512 VNNI (Zen 5, 2026-12-05, two cores, one weight `[4096, 4096]` in L3, best of 300)
    /// lane shifts alone won, 28.5 → 31.5 GB/s: there `vpsrldq` and `vpermps` compete for the
    /// same shuffle pipes, and this kernel is compute-bound (it streams about as much from L3 as
    /// from memory).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn nibble<const S: i32, const BYTE_SHIFTS: bool>(v: __m512i) -> __m512i {
        match (S, BYTE_SHIFTS) {
            (0, _) => v,
            (2, true) => _mm512_bsrli_epi128::<1>(v),
            (4, true) => _mm512_bsrli_epi128::<2>(v),
            (6, true) => _mm512_bsrli_epi128::<3>(v),
            (2, false) => _mm512_srli_epi32::<8>(v),
            (4, false) => _mm512_srli_epi32::<16>(v),
            (6, false) => _mm512_srli_epi32::<24>(v),
            (1, _) => _mm512_srli_epi32::<4>(v),
            (3, _) => _mm512_srli_epi32::<12>(v),
            (5, _) => _mm512_srli_epi32::<20>(v),
            _ => _mm512_srli_epi32::<28>(v),
        }
    }

    /// The table of row `row`, group `g` (unchecked: the caller's bounds).
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn lut_at(w: &Int4Weight, row: usize, g: usize) -> __m512 {
        let i = row * (w.k / w.group) + g;
        let zp = match &w.zero_point {
            Some(z) => f32::from(*z.get_unchecked(i)),
            None => 0.0,
        };
        lut(zp - w.qmin as f32, *w.scale.get_unchecked(i))
    }

    /// One row of activations against quads `first..first + count`: `out[4q + i]`.
    ///
    /// SAFETY: the caller checked AVX-512F+BW and that the quads, their scales and `x` (`k` long)
    /// are in bounds.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn gemv(w: &Int4Weight, x: &[f32], first: usize, count: usize, out: &mut [f32]) {
        // Groups of whole blocks (128, 256, …) change tables only between blocks: a constant, so
        // that the common case has no test inside a block.
        match (w.group.is_multiple_of(BLOCK), ShiftMix::here()) {
            (true, ShiftMix::ByteAndLane) => gemv_groups::<true, true>(w, x, first, count, out),
            (true, ShiftMix::LaneOnly) => gemv_groups::<true, false>(w, x, first, count, out),
            (false, ShiftMix::ByteAndLane) => gemv_groups::<false, true>(w, x, first, count, out),
            (false, ShiftMix::LaneOnly) => gemv_groups::<false, false>(w, x, first, count, out),
        }
    }

    /// How [`nibble`] brings each nibble down, chosen once per process by the CPU's vendor
    /// (measured on one CPU of each, see [`nibble`]; both give the same bits).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum ShiftMix {
        /// Byte shifts for the even nibbles, lane shifts for the odd ones (Intel and others).
        ByteAndLane,
        /// Lane shifts for every nibble (AMD).
        LaneOnly,
    }

    impl ShiftMix {
        pub(super) fn here() -> Self {
            static MIX: std::sync::OnceLock<ShiftMix> = std::sync::OnceLock::new();
            *MIX.get_or_init(|| {
                // CPUID leaf 0: the vendor string in EBX, EDX, ECX ("AuthenticAMD").
                let id = __cpuid(0);
                let vendor: Vec<u8> =
                    [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
                if vendor == *b"AuthenticAMD" {
                    ShiftMix::LaneOnly
                } else {
                    ShiftMix::ByteAndLane
                }
            })
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn gemv_groups<const WHOLE_BLOCKS: bool, const BYTE_SHIFTS: bool>(
        w: &Int4Weight,
        x: &[f32],
        first: usize,
        count: usize,
        out: &mut [f32],
    ) {
        let blocks = w.k / BLOCK;
        // Tables change every `w.group / 16` steps of 16 inputs, or every `blocks_per_group`
        // blocks, counted down (no division in the loop).
        let steps_per_group = w.group / 16;
        let blocks_per_group = (w.group / BLOCK).max(1);
        let mut p = w.words.as_ptr().add(first * blocks * QUAD * 16);
        for q in 0..count {
            let row = (first + q) * QUAD;
            let mut acc = [_mm512_setzero_ps(); QUAD];
            let mut luts = [_mm512_setzero_ps(); QUAD];
            let (mut group, mut left) = (0usize, 0usize);
            let mut xp = x.as_ptr();
            for _ in 0..blocks {
                let mut v = [_mm512_setzero_si512(); QUAD];
                for i in 0..QUAD {
                    // A prefetch past the end of the allocation is a hint, never a fault.
                    crate::quant::team::prefetch_stream(p.add(i * 16) as *const u8);
                    v[i] = _mm512_loadu_si512(p.add(i * 16) as *const __m512i);
                }
                macro_rules! step {
                    ($s:literal) => {{
                        if !WHOLE_BLOCKS || $s == 0 {
                            if left == 0 {
                                for i in 0..QUAD {
                                    luts[i] = lut_at(w, row + i, group);
                                }
                                group += 1;
                                left =
                                    if WHOLE_BLOCKS { blocks_per_group } else { steps_per_group };
                            }
                            left -= 1;
                        }
                        let xv = _mm512_loadu_ps(xp.add($s * 16));
                        for i in 0..QUAD {
                            let idx = nibble::<$s, BYTE_SHIFTS>(v[i]);
                            let wf = _mm512_permutexvar_ps(idx, luts[i]);
                            acc[i] = _mm512_fmadd_ps(wf, xv, acc[i]);
                        }
                    }};
                }
                step!(0);
                step!(1);
                step!(2);
                step!(3);
                step!(4);
                step!(5);
                step!(6);
                step!(7);
                p = p.add(QUAD * 16);
                xp = xp.add(BLOCK);
            }
            for i in 0..QUAD {
                *out.get_unchecked_mut(q * QUAD + i) = _mm512_reduce_add_ps(acc[i]);
            }
        }
    }

    /// The four rows of quad `quad` dequantized into `scratch` `[4, k]` f32.
    ///
    /// SAFETY: as [`gemv`]; `scratch` is `4 · k` long.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dequantize_quad(w: &Int4Weight, quad: usize, scratch: &mut [f32]) {
        let blocks = w.k / BLOCK;
        debug_assert!(scratch.len() == QUAD * w.k);
        let dst = scratch.as_mut_ptr();
        for i in 0..QUAD {
            let row = quad * QUAD + i;
            let mut table = _mm512_setzero_ps();
            for b in 0..blocks {
                let v =
                    _mm512_loadu_si512(w.words.as_ptr().add(((quad * blocks + b) * QUAD + i) * 16)
                        as *const __m512i);
                for s in 0..8u32 {
                    let col = b * BLOCK + s as usize * 16;
                    if col.is_multiple_of(w.group) {
                        let (offset, scale) = w.offset_scale(row, col / w.group);
                        table = lut(offset, scale);
                    }
                    let idx = _mm512_srlv_epi32(v, _mm512_set1_epi32(4 * s as i32));
                    _mm512_storeu_ps(dst.add(i * w.k + col), _mm512_permutexvar_ps(idx, table));
                }
            }
        }
    }

    /// Inputs per pass of [`dot4x4_rows`]: a quad's 4 × 1024 f32 (16 KiB) and four activation
    /// rows' 16 KiB stay in L1 (48 KiB on the EPYC measured) while the groups of four rows pass;
    /// the whole 4 × 4096 quad (64 KiB) did not, and every tile streamed both from L2.
    const K_CHUNK: usize = 1024;

    /// Dot products of the four `k`-long rows of `rows` with each row of `x` (`4 · tiles` rows of
    /// `k`), as 4 × 4 tiles: tile `t`, `[i][j]` = row `i` · x row `4t + j`. The inputs go in
    /// chunks of [`K_CHUNK`], every tile's sixteen accumulators kept in memory between chunks, so
    /// each lane sums its products in the order one pass over `k` would: the result is bit for
    /// bit that of the unchunked loop (tested), only the cache traffic differs.
    ///
    /// SAFETY: AVX-512F+BW; `rows` is `4 · k` and `x` a multiple of `4 · k` long, `k` a multiple
    /// of 16.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot4x4_rows(rows: &[f32], x: &[f32], k: usize) -> Vec<[[f32; 4]; QUAD]> {
        assert!(rows.len() == QUAD * k && k.is_multiple_of(16));
        assert!(x.len().is_multiple_of(4 * k.max(1)));
        let tiles = x.len() / (4 * k).max(1);
        let mut acc = vec![_mm512_setzero_ps(); tiles * 4 * QUAD];
        let (r, xp) = (rows.as_ptr(), x.as_ptr());
        let mut c0 = 0;
        while c0 < k {
            let c1 = (c0 + K_CHUNK).min(k);
            for t in 0..tiles {
                let a = acc.as_mut_ptr().add(t * 4 * QUAD);
                let xt = xp.add(t * 4 * k);
                let mut tile = [[_mm512_setzero_ps(); 4]; QUAD];
                for i in 0..QUAD {
                    for j in 0..4 {
                        tile[i][j] = *a.add(4 * i + j);
                    }
                }
                let mut c = c0;
                while c < c1 {
                    let mut xv = [_mm512_setzero_ps(); 4];
                    for j in 0..4 {
                        xv[j] = _mm512_loadu_ps(xt.add(j * k + c));
                    }
                    for i in 0..QUAD {
                        let wv = _mm512_loadu_ps(r.add(i * k + c));
                        for j in 0..4 {
                            tile[i][j] = _mm512_fmadd_ps(wv, xv[j], tile[i][j]);
                        }
                    }
                    c += 16;
                }
                for i in 0..QUAD {
                    for j in 0..4 {
                        *a.add(4 * i + j) = tile[i][j];
                    }
                }
            }
            c0 = c1;
        }
        let mut out = Vec::with_capacity(tiles);
        for t in acc.chunks_exact(4 * QUAD) {
            let mut dots = [[0f32; 4]; QUAD];
            for i in 0..QUAD {
                for j in 0..4 {
                    dots[i][j] = _mm512_reduce_add_ps(t[4 * i + j]);
                }
            }
            out.push(dots);
        }
        out
    }

    /// The unchunked 4 × 4 tile: the reference [`dot4x4_rows`] is tested against.
    ///
    /// SAFETY: AVX-512F+BW; `rows` and `x` are `4 · k` long, `k` a multiple of 16.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot4x4(rows: &[f32], x: &[f32], k: usize) -> [[f32; 4]; QUAD] {
        assert!(rows.len() == QUAD * k && x.len() == 4 * k && k.is_multiple_of(16));
        let mut acc = [[_mm512_setzero_ps(); 4]; QUAD];
        let (r, xp) = (rows.as_ptr(), x.as_ptr());
        let mut c = 0;
        while c < k {
            let xv = [0, 1, 2, 3].map(|j| _mm512_loadu_ps(xp.add(j * k + c)));
            for i in 0..QUAD {
                let wv = _mm512_loadu_ps(r.add(i * k + c));
                for j in 0..4 {
                    acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
                }
            }
            c += 16;
        }
        acc.map(|row| row.map(|a| _mm512_reduce_add_ps(a)))
    }

    /// Dot products of the four `k`-long rows of `rows` with `x`.
    ///
    /// SAFETY: AVX-512F+BW; `rows` is `4 · k` and `x` `k` long, `k` a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot4(rows: &[f32], x: &[f32], k: usize) -> [f32; QUAD] {
        assert!(rows.len() == QUAD * k && x.len() == k && k.is_multiple_of(16));
        let mut acc = [_mm512_setzero_ps(); QUAD];
        let (r, xp) = (rows.as_ptr(), x.as_ptr());
        let mut c = 0;
        while c < k {
            let xv = _mm512_loadu_ps(xp.add(c));
            for i in 0..QUAD {
                acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(r.add(i * k + c)), xv, acc[i]);
            }
            c += 16;
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn chunked_tiles_equal_the_unchunked_tile_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx512.available() {
            // 2 · 1024 + 48 inputs: two whole chunks and a short one; three tiles of rows.
            let k = 2 * 1024 + 48;
            let rows: Vec<f32> =
                (0..QUAD * k).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
            let x: Vec<f32> = (0..12 * k).map(|i| ((i * 53) % 97) as f32 / 24.0 - 2.0).collect();
            // SAFETY: AVX-512F+BW present (checked); lengths as the functions require.
            let tiles = unsafe { avx512::dot4x4_rows(&rows, &x, k) };
            assert_eq!(tiles.len(), 3);
            for (t, tile) in tiles.iter().enumerate() {
                // SAFETY: as above; four rows of `x`.
                let want = unsafe { avx512::dot4x4(&rows, &x[4 * t * k..4 * (t + 1) * k], k) };
                let bits = |d: &[[f32; 4]; QUAD]| d.map(|r| r.map(f32::to_bits));
                assert_eq!(bits(tile), bits(&want), "tile {t}");
            }
        }
    }

    /// The levels this CPU runs (every test runs at each; an AVX-512 machine also tests AVX2).
    fn levels() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.available()).collect()
    }

    /// A deterministic weight: codes, scales and zero points from a small LCG. `None` exactly
    /// where the kernel refuses the shape (asserted: on a CPU with neither AVX-512F+BW nor
    /// AVX2+FMA, because of the CPU, which is the fallback the packed weight takes there).
    pub(crate) fn weight(
        n: usize,
        k: usize,
        group: usize,
        symmetric: bool,
    ) -> Option<(Vec<u8>, Int4Weight)> {
        let mut state = 12345u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let nibbles: Vec<u8> = (0..n * k / 2).map(|_| next() as u8).collect();
        let groups = k / group;
        let scale: Vec<f32> =
            (0..n * groups).map(|_| (next() % 1000) as f32 * 1e-4 + 1e-3).collect();
        let zp = (!symmetric).then(|| (0..n * groups).map(|_| (next() % 16) as u8).collect());
        let qmin = if symmetric { -8 } else { 0 };
        let w = Int4Weight::from_nibbles(&nibbles, scale, zp, qmin, n, k, group);
        if available() {
            assert!(w.is_some(), "[{n}, {k}] g{group} refused on a CPU with {:?}", Isa::best());
        } else {
            assert!(w.is_none(), "the kernel took a weight on a CPU without AVX-512 or AVX2");
            let reason = unsupported(n, k, group).expect("a reason");
            assert!(reason.contains("AVX2"), "{reason}");
        }
        w.map(|w| (nibbles, w))
    }

    /// The dequantized weight, element by element (the reference arithmetic).
    pub(crate) fn dequantized(w: &Int4Weight, nibbles: &[u8]) -> Vec<f32> {
        let [n, k] = w.shape();
        let mut out = vec![0f32; n * k];
        for row in 0..n {
            for col in 0..k {
                let byte = nibbles[row * k / 2 + col / 2];
                let c = if col % 2 == 0 { byte >> 4 } else { byte & 15 };
                let (offset, scale) = w.offset_scale(row, col / w.group);
                out[row * k + col] = (f32::from(c) - offset) * scale;
            }
        }
        out
    }

    #[test]
    fn layout_round_trips_to_the_portable_nibbles() {
        let Some((nibbles, w)) = weight(8, 256, 128, false) else { return };
        assert_eq!(w.nibbles(), nibbles);
        assert_eq!(w.bytes(), 8 * 256 / 2 + 8 * 2 * 4 + 8 * 2);
    }

    #[test]
    fn matmul_matches_the_dequantized_reference() {
        for (n, k, group, symmetric, m) in [
            (8, 256, 128, false, 1),
            (12, 384, 32, true, 1),
            (16, 512, 64, false, 3),
            (4, 256, 256, false, 5),
            (8, 256, 128, true, 9),
            // Groups of 16 (every step a new table), 48 and 192 (groups that cross the 128-input
            // blocks: a table changes inside a block), decode and prefill.
            (8, 256, 16, false, 1),
            (8, 256, 16, true, 2),
            (8, 384, 48, false, 1),
            (4, 384, 48, true, 6),
            (8, 384, 192, false, 1),
            (12, 768, 192, true, 4),
        ] {
            let Some((nibbles, best)) = weight(n, k, group, symmetric) else { continue };
            for isa in levels() {
                let w = best.clone().with_isa(isa).expect("available level");
                let dense = dequantized(&w, &nibbles);
                let x: Vec<f32> =
                    (0..m * k).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
                let y = w.matmul(&x, m).expect("kernel runs");
                let wide = |v: &[f32]| v.iter().map(|&e| f64::from(e)).collect::<Vec<f64>>();
                let what = format!("{isa:?} [{n}, {k}] g{group}");
                team::assert_matches_f64_reference(&wide(&dense), &wide(&x), &y, n, k, m, &what);
                // The dequantized quads are the reference values exactly.
                let quads = w.dequantize_quads(0, n / QUAD).expect("in range");
                assert_eq!(quads, dense, "{isa:?} [{n}, {k}] g{group}");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn both_shift_mixes_give_the_same_bits() {
        if !Isa::Avx512.available() {
            return;
        }
        // Whole-block groups and groups that change inside a block, symmetric and not.
        for (n, k, group, symmetric) in
            [(16, 512, 128, false), (8, 384, 48, true), (8, 256, 16, false)]
        {
            let Some((_, w)) = weight(n, k, group, symmetric) else { continue };
            let w = w.with_isa(Isa::Avx512).expect("AVX-512 present");
            let x: Vec<f32> = (0..k).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
            let run = |byte_shifts: bool| {
                let mut out = vec![0f32; n];
                let whole = group % BLOCK == 0;
                // SAFETY: AVX-512F+BW present (checked above); every quad of `w`, `x` `k` long,
                // `out` `n` long.
                unsafe {
                    match (whole, byte_shifts) {
                        (true, true) => {
                            avx512::gemv_groups::<true, true>(&w, &x, 0, n / QUAD, &mut out)
                        }
                        (true, false) => {
                            avx512::gemv_groups::<true, false>(&w, &x, 0, n / QUAD, &mut out)
                        }
                        (false, true) => {
                            avx512::gemv_groups::<false, true>(&w, &x, 0, n / QUAD, &mut out)
                        }
                        (false, false) => {
                            avx512::gemv_groups::<false, false>(&w, &x, 0, n / QUAD, &mut out)
                        }
                    }
                }
                out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            };
            assert_eq!(run(true), run(false), "[{n}, {k}] g{group}");
        }
    }

    #[test]
    fn weights_in_one_hand_out_equal_each_alone_bit_for_bit() {
        // Three heights (a range of the hand-out crosses from one weight into the next), group
        // sizes that differ between them, decode and prefill.
        let shapes = [(96, 128, false), (32, 64, true), (160, 128, false)];
        let Some(best) = shapes
            .iter()
            .map(|&(n, group, symmetric)| weight(n, 512, group, symmetric).map(|(_, w)| w))
            .collect::<Option<Vec<_>>>()
        else {
            return;
        };
        for isa in levels() {
            let ws: Vec<Int4Weight> =
                best.iter().map(|w| w.clone().with_isa(isa).expect("available level")).collect();
            let refs: Vec<&Int4Weight> = ws.iter().collect();
            for m in [1, 3] {
                let x: Vec<f32> =
                    (0..m * 512).map(|i| ((i * 29) % 89) as f32 / 44.0 - 1.0).collect();
                let many = Int4Weight::matmul_many(&refs, &x, m).expect("kernel runs");
                let alone = |i: usize| ws[i].matmul(&x, m).expect("kernel runs");
                team::assert_each_equals_alone(&many, ws.len(), alone, &format!("{isa:?} m {m}"));
            }
            // A weight of another width refuses the lot; so does an empty list.
            let (_, wide) = weight(32, 1024, 128, false).expect("supported");
            let x = vec![0.5f32; 512];
            assert!(Int4Weight::matmul_many(&[&ws[0], &wide], &x, 1).is_none());
            assert!(Int4Weight::matmul_many(&[], &x, 1).is_none());
        }
    }

    #[test]
    fn libgomp_and_rayon_teams_give_identical_results() {
        // 64 quads: several ranges, so both teams split the rows between threads.
        let Some((_, best)) = weight(256, 512, 128, false) else { return };
        for isa in levels() {
            let w = best.clone().with_isa(isa).expect("available level");
            for m in [1, 6] {
                let x: Vec<f32> =
                    (0..m * 512).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
                let omp = w.matmul_on(&x, m, team::default_team).expect("libgomp team");
                let rayon = w.matmul_on(&x, m, team::rayon_team).expect("rayon team");
                // Each row is summed by one thread in the same order either way: bit-identical.
                assert_eq!(omp, rayon, "{isa:?} m = {m}");
            }
        }
    }

    #[test]
    fn out_of_range_requests_are_refused_not_wrapped() {
        let Some((_, w)) = weight(8, 256, 128, false) else { return };
        // Past the last quad, and a count whose `(first + count) · 4` would wrap.
        assert!(w.dequantize_quads(1, 2).is_none());
        assert!(w.dequantize_quads(1, usize::MAX).is_none());
        assert!(w.dequantize_quads(usize::MAX / 2, usize::MAX / 2).is_none());
        assert!(w.dequantize_quads(0, 2).is_some());
        // `m · k` that wraps to the length of `x` is refused.
        let x = vec![0f32; 256];
        let wrapping_m = usize::MAX / 256 + 2; // m · 256 wraps to 256
        assert_eq!(wrapping_m.wrapping_mul(256), 256);
        assert!(w.matmul(&x, wrapping_m).is_none());
        assert!(w.matmul(&x, 0).is_none());
        assert!(w.matmul(&x, 1).is_some());
        // Lengths that do not match the shape.
        let too_short = Int4Weight::from_nibbles(&[0; 10], vec![1.0; 16], None, -8, 8, 256, 128);
        assert!(too_short.is_none());
    }

    #[test]
    fn unsupported_shapes_are_named() {
        if !available() {
            let reason = unsupported(4, 128, 128).expect("refused without the features");
            assert!(reason.contains("neither AVX-512F + AVX-512BW nor AVX2 + FMA"), "{reason}");
            return;
        }
        assert!(unsupported(4, 128, 128).is_none());
        assert!(unsupported(6, 128, 128).is_some_and(|r| r.contains("out % 4")));
        assert!(unsupported(4, 96, 32).is_some_and(|r| r.contains("in % 128")));
        assert!(unsupported(4, 256, 24).is_some_and(|r| r.contains("multiple of 16")));
        assert!(unsupported(4, 256, 0).is_some_and(|r| r.contains("multiple of 16")));
    }
}
