//! The exact W4A16 kernel's prefill (more than one row of activations) on CPUs with AVX512-BF16:
//! `vdpbf16ps` multiplies pairs of bf16 values into f32 lanes, 32 products an instruction where
//! the f32 path ([`super::int4_avx512`]'s `dot4x4_rows`) has 16 per FMA.
//!
//! Why it is exact: in a bf16 model the activations are bf16 values already, and a weight's
//! centred code `c − (zero_point − qmin)` is a small integer (|·| < 256 on every 4-bit grid; the
//! table builder checks it), so both factors are bf16 values and each product is exact in f32
//! (8 + 8 significant bits). The scale is applied once per group at the group's end,
//! `Σ_g scale_g · Σ_{k∈g} x_k · (c_k − offset_g)`, like the AVX2 decode kernel. The f32 path
//! rounds each dequantized weight `(c − offset) · scale` to f32 and sums its products; this path
//! never forms that weight, so the two differ by that rounding and by the order and grouping of
//! the sums' f32 roundings (both within 1e-6 of the terms' magnitude of the exact f64 sum,
//! tested). `vdpbf16ps` also flushes subnormal inputs and outputs to zero (bf16 activations
//! below 1.2e-38), and a group's unscaled sum overflows f32 sooner (activations above ~1e36).
//! Where any activation is not a bf16 value (an f32 model), a group is not a multiple of 32
//! inputs, or the weight is held at the AVX2 level, the f32 path runs (each case tested);
//! `Int4Weight::paired_prefill_refused` says which.
//!
//! Layout: the 32 inputs `32c .. 32c + 32` of a row go into one register as 16 pairs, pair `j` =
//! inputs `(32c + j, 32c + 16 + j)` — the order in which two nibbles `2p, 2p + 1` of the codes'
//! lanes (`int4_avx512`'s layout: lane `j`, nibble `s` = input `128b + 16s + j`) come out of one
//! `vpermw` lookup. The activations are put in that order once per call ([`PairedRows`]); the
//! sums over lanes do not care about the order, as long as both factors share it.
//!
//! Measured (AMD EPYC with AVX512-BF16, Zen 5, 2 cores): see README "Prefill".
#![allow(unsafe_code)]

/// Rows per quad and inputs per 64-byte block of `int4_avx512`'s layout (asserted equal there).
pub(crate) const QUAD: usize = 4;
pub(crate) const BLOCK: usize = 128;

/// A 4-bit weight `[n, k]` in `int4_avx512`'s layout (`Int4Weight`'s fields), as the paired
/// prefill reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Codes<'a> {
    /// `[n/4, k/128, 4, 16]` u32, 8 codes a word.
    pub(crate) words: &'a [u32],
    /// `[n, k/group]`.
    pub(crate) scale: &'a [f32],
    /// `[n, k/group]`; `None`: symmetric, zero points 0.
    pub(crate) zero_point: Option<&'a [u8]>,
    pub(crate) qmin: i32,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) group: usize,
}

/// Inputs per pair register.
const PAIRS: usize = 32;

/// Whether this CPU has what the paired prefill needs: AVX-512F+BW and AVX512-BF16.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The activations `[m, k]` as bf16 bits in the pair layout (the module doc).
#[derive(Debug, Clone)]
pub(crate) struct PairedRows {
    bits: Vec<u16>,
    m: usize,
    k: usize,
}

impl PairedRows {
    /// `None` when some value of `x` is not a bf16 value (its low 16 bits are not zero), `k` is
    /// not a multiple of 32 or `x` is not `m · k` long.
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(PAIRS) || Some(x.len()) != m.checked_mul(k) {
            return None;
        }
        let mut bits = vec![0u16; x.len()];
        for (src, dst) in x.chunks_exact(PAIRS).zip(bits.chunks_exact_mut(PAIRS)) {
            for j in 0..PAIRS / 2 {
                for (half, at) in [(0, 2 * j), (PAIRS / 2, 2 * j + 1)] {
                    let v = src[half + j].to_bits();
                    if v & 0xffff != 0 {
                        return None;
                    }
                    dst[at] = (v >> 16) as u16;
                }
            }
        }
        Some(Self { bits, m, k })
    }
}

/// The bf16 bits of `(c − offset)` for `c` = 0..16, or `None` when one is not a bf16 value.
fn centred_table(offset: f32) -> Option<[u16; 32]> {
    let mut t = [0u16; 32];
    for (c, e) in t.iter_mut().take(16).enumerate() {
        let v = c as f32 - offset;
        let bits = v.to_bits();
        if bits & 0xffff != 0 {
            return None;
        }
        *e = (bits >> 16) as u16;
    }
    Some(t)
}

/// Why a prefill on `w` cannot take the paired path on this CPU whatever the activations, if it
/// cannot: the CPU, a group that splits a pair register, a zero point far off the grid.
pub(crate) fn refused(w: &Codes) -> Option<String> {
    if !available() {
        return Some("the CPU lacks AVX512-BF16 (or AVX-512F+BW)".into());
    }
    if !w.group.is_multiple_of(PAIRS) {
        return Some(format!("its groups of {} inputs split a pair register of 32", w.group));
    }
    // Each distinct zero point's table checked once.
    let exact: Vec<bool> =
        (0..=255).map(|z: i32| centred_table((z - w.qmin) as f32).is_some()).collect();
    let zero_points = w.zero_point.unwrap_or(&[0]);
    if zero_points.iter().any(|&z| !exact[usize::from(z)]) {
        return Some("a centred code is not a bf16 value (a zero point far off the grid)".into());
    }
    None
}

/// Quads `first..first + count` of `w` times every row of `x`, into `out` `[count · 4, m]` (the
/// layout of `Int4Weight::rows`); `prefetch(q)` is called for quad `q + 1` before quad `q` is
/// multiplied. The caller has found [`refused`] `None` for `w` (once per call, not per range:
/// it scans every zero point); what the unsafe code's memory safety rests on is checked here
/// before it runs, and a violation panics: the CPU's features, the shape's divisibility, the
/// quads in range, the lengths.
pub(crate) fn quads(
    w: &Codes,
    x: &PairedRows,
    first: usize,
    count: usize,
    out: &mut [f32],
    prefetch: &dyn Fn(usize),
) {
    assert!(available(), "the paired prefill needs AVX-512F+BW and AVX512-BF16");
    let (k, m, group) = (w.k, x.m, w.group);
    assert!(group > 0 && group.is_multiple_of(PAIRS), "groups are not whole pair registers");
    assert!(k.is_multiple_of(BLOCK) && k.is_multiple_of(group), "k is not whole blocks and groups");
    assert!(x.k == k && Some(x.bits.len()) == m.checked_mul(k), "activations of another width");
    let end = first.checked_add(count).and_then(|e| e.checked_mul(QUAD));
    assert!(end.is_some_and(|e| e <= w.n), "quads past the weight");
    let groups = k / group;
    let quad_words = (k / BLOCK) * QUAD * 16;
    let words = end.and_then(|e| (e / QUAD).checked_mul(quad_words));
    assert!(words.is_some_and(|words| words <= w.words.len()), "quads past the codes");
    let scales_end = end.and_then(|e| e.checked_mul(groups));
    assert!(scales_end.is_some_and(|s| s <= w.scale.len()), "quads past the scales");
    assert!(w.zero_point.is_none_or(|z| z.len() == w.scale.len()), "zero points ≠ scales");
    assert!(Some(out.len()) == count.checked_mul(QUAD * m), "out is not 4 · count · m long");
    debug_assert!(refused(w).is_none(), "the caller checks `refused` once per call");
    let mut scratch = vec![0u16; QUAD * k];
    let mut scales = vec![0f32; QUAD * groups];
    // The tiles' totals, zeroed per quad: allocated once per range.
    let mut totals = vec![0f32; avx512bf16_totals_len(m)];
    for q in 0..count {
        let quad = first + q;
        // The next quad's codes on their way to L2 while this one is multiplied.
        prefetch(quad + 1);
        for i in 0..QUAD {
            let row = quad * QUAD + i;
            scales[i * groups..][..groups]
                .copy_from_slice(&w.scale[row * groups..(row + 1) * groups]);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F+BW+BF16 present, the group a multiple of 32, `k` of 128 and of the
        // group, the quad's codes, scales and zero points in range (all asserted above);
        // `scratch` is `4 · k` long, `x` `m · k`, `scales` `4 · groups`, `totals` as
        // `quad_times_rows` needs and `out`'s slice `4 · m`.
        unsafe {
            avx512bf16::centred_quad(w, quad, &mut scratch);
            avx512bf16::quad_times_rows(
                &scratch,
                &scales,
                &x.bits,
                m,
                k,
                group,
                &mut totals,
                &mut out[q * QUAD * m..][..QUAD * m],
            );
        }
    }
}

/// Activation rows per tile of `avx512bf16::quad_times_rows`.
const TILE_ROWS: usize = 4;

/// f32s of the tiles' totals for `m` activation rows (`avx512bf16::quad_times_rows`): 16 lanes
/// for each weight row of the quad by each activation row of a whole number of tiles.
fn avx512bf16_totals_len(m: usize) -> usize {
    m.div_ceil(TILE_ROWS) * TILE_ROWS * QUAD * 16
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use std::arch::x86_64::*;

    use super::{Codes, BLOCK, PAIRS, QUAD, TILE_ROWS};

    /// Inputs per pass over the activation rows: a quad's 4 × 2048 bf16 (16 KiB) stays in L1
    /// while every tile of activation rows passes (their 2048-input slices from L2).
    const K_CHUNK: usize = 2048;

    /// The four rows of quad `quad` as centred codes `c − offset` in bf16, pair layout, into
    /// `scratch` `[4, k]`.
    ///
    /// SAFETY: AVX-512F+BW+BF16; the quad is in range, `scratch` is `4 · k` long, the group a
    /// multiple of 32 and every centred table exact (`super::refused` is None).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn centred_quad(w: &Codes, quad: usize, scratch: &mut [u16]) {
        let blocks = w.k / BLOCK;
        let groups = w.k / w.group;
        debug_assert!(scratch.len() == QUAD * w.k);
        let dst = scratch.as_mut_ptr();
        let low = _mm512_set1_epi32(0xf);
        let high = _mm512_set1_epi32(0xf_0000);
        for i in 0..QUAD {
            let row = quad * QUAD + i;
            let mut table = _mm512_setzero_si512();
            for b in 0..blocks {
                let v =
                    _mm512_loadu_si512(w.words.as_ptr().add(((quad * blocks + b) * QUAD + i) * 16)
                        as *const __m512i);
                for p in 0..BLOCK / PAIRS {
                    let col = b * BLOCK + p * PAIRS;
                    if col.is_multiple_of(w.group) {
                        let g = row * groups + col / w.group;
                        let zp = match &w.zero_point {
                            Some(z) => i32::from(*z.get_unchecked(g)),
                            None => 0,
                        };
                        table = centred_lut((zp - w.qmin) as f32);
                    }
                    // Nibble 2p of each lane into the low half, nibble 2p + 1 into the high half:
                    // 16-bit index 2j = input col + j, 2j + 1 = input col + 16 + j.
                    let s = _mm512_srlv_epi32(v, _mm512_set1_epi32(8 * p as i32));
                    let idx = _mm512_or_si512(
                        _mm512_and_si512(s, low),
                        _mm512_and_si512(_mm512_slli_epi32::<12>(s), high),
                    );
                    let vals = _mm512_permutexvar_epi16(idx, table);
                    _mm512_storeu_si512(dst.add(i * w.k + col) as *mut __m512i, vals);
                }
            }
        }
    }

    /// [`centred_table`] in a register (its 16 entries in the low half): `c − offset` in f32,
    /// converted to bf16 — exact, since `refused` checked every table of the weight.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn centred_lut(offset: f32) -> __m512i {
        let iota =
            _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
        let half = _mm512_cvtneps_pbh(_mm512_sub_ps(iota, _mm512_set1_ps(offset)));
        // SAFETY: 32 bytes of plain lanes either way.
        let half = unsafe { std::mem::transmute::<__m256bh, __m256i>(half) };
        _mm512_zextsi256_si512(half)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 64 bytes of plain lanes.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// A quad of centred rows (`quad` `[4, k]` pair layout, `scales` `[4, k/group]`) times the
    /// `m` rows of `x` (`[m, k]` pair layout), into `out` `[4, m]`: tiles of the four weight rows
    /// by four activation rows, each group's products summed by `vdpbf16ps` into sixteen fresh
    /// registers and added into the tile's totals (in memory, in L1) times the group's scale at
    /// the group's end. Sixteen independent sums keep `vdpbf16ps` (latency ≈ 6 cycles, two a
    /// cycle on the Zen 5 EPYC measured) busy; a 4 × 2 tile with its totals in registers ran at
    /// 35 % of the instruction's peak there. The inputs go in chunks of [`K_CHUNK`] (a multiple of
    /// the group), so each tile's slices of `x` come from L2 while the quad's chunk stays in L1.
    ///
    /// SAFETY: AVX-512F+BW+BF16; lengths as above; `k` a multiple of `group`, `group` of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn quad_times_rows(
        quad: &[u16],
        scales: &[f32],
        x: &[u16],
        m: usize,
        k: usize,
        group: usize,
        totals: &mut [f32],
        out: &mut [f32],
    ) {
        debug_assert!(quad.len() == QUAD * k && x.len() == m * k && out.len() == QUAD * m);
        debug_assert!(totals.len() == super::avx512bf16_totals_len(m));
        let groups = k / group;
        let chunk = (K_CHUNK / group).max(1) * group;
        let tiles = m.div_ceil(TILE_ROWS);
        // Per tile, `[i][j]`: weight row i by the tile's activation row j, 16 lanes each.
        totals.fill(0.0);
        let tp = totals.as_mut_ptr();
        let (w, xp, sp) = (quad.as_ptr(), x.as_ptr(), scales.as_ptr());
        let mut c0 = 0;
        while c0 < k {
            let c1 = (c0 + chunk).min(k);
            for t in 0..tiles {
                let tot = tp.add(t * TILE_ROWS * QUAD * 16);
                // The last tile of an `m` that is not a multiple of four repeats its last row
                // (those sums are not stored).
                let mut rows = [0usize; TILE_ROWS];
                for (j, r) in rows.iter_mut().enumerate() {
                    *r = (TILE_ROWS * t + j).min(m - 1) * k;
                }
                let mut g = c0 / group;
                let mut g0 = c0;
                while g0 < c1 {
                    let mut acc = [[_mm512_setzero_ps(); TILE_ROWS]; QUAD];
                    let mut c = g0;
                    while c < g0 + group {
                        let mut xv = [bh(_mm512_setzero_si512()); TILE_ROWS];
                        for j in 0..TILE_ROWS {
                            xv[j] = bh(_mm512_loadu_si512(xp.add(rows[j] + c).cast()));
                        }
                        for i in 0..QUAD {
                            let wv = bh(_mm512_loadu_si512(w.add(i * k + c).cast()));
                            for j in 0..TILE_ROWS {
                                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv[j]);
                            }
                        }
                        c += PAIRS;
                    }
                    for i in 0..QUAD {
                        let s = _mm512_set1_ps(*sp.add(i * groups + g));
                        for j in 0..TILE_ROWS {
                            let at = tot.add((i * TILE_ROWS + j) * 16);
                            let sum = _mm512_fmadd_ps(acc[i][j], s, _mm512_loadu_ps(at));
                            _mm512_storeu_ps(at, sum);
                        }
                    }
                    g += 1;
                    g0 += group;
                }
            }
            c0 = c1;
        }
        for t in 0..tiles {
            for i in 0..QUAD {
                for j in 0..TILE_ROWS {
                    let r = TILE_ROWS * t + j;
                    if r < m {
                        let at = ((t * QUAD + i) * TILE_ROWS + j) * 16;
                        out[i * m + r] = _mm512_reduce_add_ps(_mm512_loadu_ps(tp.add(at)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int4_avx512::tests::{dequantized, weight};
    use crate::quant::int4_avx512::{Int4Weight, Prefill};
    use crate::quant::team::{self, Isa};

    /// `m · k` activations that are bf16 values (f32 with the low 16 bits cleared).
    fn bf16_rows(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| f32::from_bits((((i * 7919) % 97) as f32 / 48.0 - 1.0).to_bits() & !0xffff))
            .collect()
    }

    fn wide(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&e| f64::from(e)).collect()
    }

    #[test]
    fn pairs_keep_each_input_beside_the_one_sixteen_later() {
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let p = PairedRows::new(&x, 2, 32).expect("bf16 values");
        assert_eq!((p.m, p.k), (2, 32));
        for r in 0..2 {
            for j in 0..16 {
                let bits = |i: usize| (x[r * 32 + i].to_bits() >> 16) as u16;
                assert_eq!(p.bits[r * 32 + 2 * j], bits(j));
                assert_eq!(p.bits[r * 32 + 2 * j + 1], bits(16 + j));
            }
        }
        // A value that is not a bf16, a width that is not whole pair registers, a wrong length.
        let mut off = x.clone();
        off[5] = 1.0 + f32::EPSILON;
        assert!(PairedRows::new(&off, 2, 32).is_none());
        assert!(PairedRows::new(&x[..48], 1, 48).is_none());
        assert!(PairedRows::new(&x, 3, 32).is_none());
    }

    #[test]
    fn paired_prefill_matches_the_dequantized_reference() {
        for (n, k, group, symmetric, m) in [
            (8, 256, 128, false, 2),
            (12, 384, 32, true, 3),
            (16, 512, 64, false, 5),
            (4, 256, 256, false, 4),
            (12, 768, 192, true, 7),
            // Past one chunk of 2048 inputs (the totals carried between chunks), with groups
            // that do not divide the chunk (96: chunks of 2016; 192: of 1920) and one larger
            // than it (4096: chunks of one group).
            (8, 2304, 128, false, 3),
            (4, 4608, 256, true, 2),
            (8, 2304, 96, false, 5),
            (4, 2304, 192, true, 3),
            (4, 8192, 4096, false, 2),
            // 64 quads: the thread team hands out several ranges, so quads start past 0.
            (256, 256, 64, false, 3),
        ] {
            let Some((nibbles, w)) = weight(n, k, group, symmetric) else { continue };
            if !available() {
                // The CPU's refusal, named; the f32 path runs (tested with the kernel).
                let reason = w.paired_prefill_refused().expect("refused without AVX512-BF16");
                assert!(reason.contains("AVX512-BF16"), "{reason}");
                continue;
            }
            assert_eq!(w.paired_prefill_refused(), None, "[{n}, {k}] g{group}");
            let x = bf16_rows(m, k);
            let y = w.matmul(&x, m).expect("kernel runs");
            let what = format!("paired [{n}, {k}] g{group}");
            let dense = dequantized(&w, &nibbles);
            team::assert_matches_f64_reference(&wide(&dense), &wide(&x), &y, n, k, m, &what);
            // It was the paired path: the same bits as calling it directly.
            let paired = PairedRows::new(&x, m, k).expect("bf16 values");
            let mut out = vec![0f32; n * m];
            quads(&w.codes(), &paired, 0, n / QUAD, &mut out, &|_| {});
            for r in 0..m {
                for row in 0..n {
                    assert_eq!(y[r * n + row].to_bits(), out[row * m + r].to_bits(), "{what}");
                }
            }
        }
    }

    /// Where the paired path cannot run, the f32 one does: the result is the forced f32 path's,
    /// bit for bit, and the reason is named.
    #[test]
    fn prefill_runs_in_f32_where_pairs_cannot() {
        let f32_of = |w: &Int4Weight, x: &[f32], m: usize| {
            w.clone().with_prefill(Prefill::F32).matmul(x, m).expect("kernel runs")
        };
        let Some((_, w)) = weight(8, 384, 128, false) else { return };
        let forced = w.clone().with_prefill(Prefill::F32);
        let reason = forced.paired_prefill_refused().expect("forced");
        assert!(reason.contains("set to f32"), "{reason}");
        // Activations that are not bf16 values.
        let x: Vec<f32> = (0..3 * 384).map(|i| i as f32 / 7.0 + 1e-3).collect();
        assert_eq!(w.matmul(&x, 3), Some(f32_of(&w, &x, 3)));
        let bf16_x = bf16_rows(3, 384);
        // Groups that split a pair register (16, 48): refused, whatever the CPU.
        for group in [16, 48] {
            let Some((_, w)) = weight(8, 384, group, true) else { continue };
            let reason = w.paired_prefill_refused().expect("refused");
            let why = if available() { "split a pair register" } else { "AVX512-BF16" };
            assert!(reason.contains(why), "g{group}: {reason}");
            assert_eq!(w.matmul(&bf16_x, 3), Some(f32_of(&w, &bf16_x, 3)));
        }
        if !available() {
            return;
        }
        // A weight held at the AVX2 level.
        let avx2 = w.clone().with_isa(Isa::Avx2).expect("AVX2 beside AVX-512");
        let reason = avx2.paired_prefill_refused().expect("refused at AVX2");
        assert!(reason.contains("avx2"), "{reason}");
        // A zero point far off the 4-bit grid: `c − (255 + 8)` needs 9 significant bits.
        let mut far = w.clone();
        far.qmin = -8;
        far.zero_point.as_mut().expect("asymmetric")[3] = 255;
        let reason = far.paired_prefill_refused().expect("refused");
        assert!(reason.contains("off the grid"), "{reason}");
        assert_eq!(far.matmul(&bf16_x, 3), Some(f32_of(&far, &bf16_x, 3)));
    }

    #[test]
    fn paired_weights_in_one_hand_out_equal_each_alone_bit_for_bit() {
        let shapes = [(96, 128, false), (32, 64, true), (160, 128, false)];
        let Some(mut ws) = shapes
            .iter()
            .map(|&(n, group, symmetric)| weight(n, 512, group, symmetric).map(|(_, w)| w))
            .collect::<Option<Vec<_>>>()
        else {
            return;
        };
        let x = bf16_rows(3, 512);
        for what in ["all paired", "the middle one in f32"] {
            if what != "all paired" {
                ws[1] = ws[1].clone().with_prefill(Prefill::F32);
            }
            let expect_paired = |i: usize| available() && (i != 1 || what == "all paired");
            for (i, w) in ws.iter().enumerate() {
                assert_eq!(w.paired_prefill_refused().is_none(), expect_paired(i), "{what} {i}");
            }
            let refs: Vec<&Int4Weight> = ws.iter().collect();
            let many = Int4Weight::matmul_many(&refs, &x, 3).expect("kernel runs");
            let alone = |i: usize| ws[i].matmul(&x, 3).expect("kernel runs");
            team::assert_each_equals_alone(&many, ws.len(), alone, what);
        }
    }
}
