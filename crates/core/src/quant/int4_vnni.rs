//! A second 4-bit decode kernel for [`Int4Weight`], for CPUs with AVX-512 VNNI: the activation
//! row is quantized to int8 on the fly and multiplied with the 4-bit codes in integers by
//! `vpdpbusd` (`_mm512_dpbusd_epi32`: 64 u8 × s8 products per instruction, four of them added
//! into each i32 lane). This is what llama.cpp does for its Q4_0 × Q8_0 dot product,
//! `ggml_vec_dot_q4_0_q8_0` in `ggml/src/ggml-cpu/arch/x86/quants.c`
//! (<https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-cpu/arch/x86/quants.c>),
//! which is the upstream followed here.
//!
//! Why it exists: at decode (one activation row, a GEMV) the exact kernel
//! ([`crate::quant::int4_avx512`]) spends three instructions per 16 weights (shift, `vpermps`,
//! FMA). This one spends one load, three logic instructions and two `vpdpbusd` per 128 weights of
//! a row, so that the codes' streaming from memory stays the only limit.
//!
//! # Numerics: not the exact dequantized matmul
//!
//! The activations are put on an int8 grid, per row and per group of `group` inputs (the
//! weight's own groups): `sx = max|x| / 127`, `xq = round_half_even(x / sx)` clamped to ±127; a
//! group of zeros gets `sx = 0` and `xq = 0` ([`quantize_activations`]). Then, for each output
//! row and group, `y += scale_w · sx · (Σ c·xq − offset · Σxq)` with `c` the stored code (0..15)
//! and `offset = zero_point − qmin` (the dequantized weight is `(c − offset) · scale_w`). The
//! bracket is exact in i32 (the `offset · Σxq` term starts lane 0 of the group's accumulator);
//! each lane is then converted to f32 and multiplied by `scale_w · sx` in an FMA, and the 16
//! lanes are summed at the end of the row. So the result equals, within the rounding of that
//! final f32 scaling, the exact product of the dequantized weight with `xq · sx` (tested) — and
//! differs from the exact f32 matmul with the unquantized `x` ([`crate::quant::int4_avx512`]) by
//! the int8 rounding of the activations. Measured (test `error_against_the_exact_f32_matmul`):
//! random codes, `x ~ N(0, 1)`, `k = 4096`, `n = 256`, groups of 128:
//! ‖y_q8 − y_exact‖ / ‖y_exact‖ = 0.64 % (symmetric grid) and 0.60 % (asymmetric), asserted
//! below [`MAX_RELATIVE_ERROR`]. Activations with a few large outliers per group (LLaVA's
//! projector output, some LLaMA channels) fare worse: the step `max|x| / 127` is set by the
//! outlier.
//!
//! # W4A8 and W4A4: activations on the plan's per-token grid
//!
//! The same loop runs activations that are already on an integer grid by design rather than as
//! an approximation: [`quantize_activations_per_token`] puts each row on a symmetric 8- or 4-bit
//! grid exactly as the crate's dynamic per-token activation quantizer does (same scale rule,
//! same `x · (1/s)` rounding half to even), and repeats the row's scale for each weight group.
//! The integer codes then equal the fake-quant reference's bit for bit and the output equals the
//! fake-quant matmul within the rounding of the final f32 scaling (tested here and against
//! `ActQuantizer` in `tests/core/quant_kernels.rs`). 4-bit values ride in the int8 lanes of
//! `vpdpbusd` (no 4-bit × 4-bit instruction exists on x86); what W4A4 saves over W4A8 on a CPU is
//! nothing but accuracy, and the bench shows it.
//!
//! # How the weight layout is consumed unchanged
//!
//! A 64-byte block of one row ([`Int4Weight`]'s layout) holds in lane `j` the codes of columns
//! `128·b + 16·s + j`, `s` = 0..8, column `s` in bits `4s..4s + 4`. `v & 0x0F0F0F0F` leaves in
//! lane `j` four bytes, the codes of columns `128·b + j + 16·{0, 2, 4, 6}`, and
//! `(v >> 4) & 0x0F0F0F0F` those of columns `128·b + j + 16·{1, 3, 5, 7}`. The int8 activation
//! row is rearranged once per call into that order ([`Q8Activations::packed`]: per block, byte
//! `t` of lane `j` of the "even" half is `xq[128·b + j + 32·t]`, of the "odd" half
//! `xq[128·b + j + 32·t + 16]`), and two `vpdpbusd` per block and row consume 128 weights.
//!
//! # Shapes
//!
//! Only groups that are whole blocks (`group % 128 == 0`: 128, 256, …; one group per row is
//! fine) run here: with smaller groups the four bytes of one lane belong to different groups
//! (group 64: columns `j`, `j + 32` in one group, `j + 64`, `j + 96` in the next), each with its
//! own `sx`, so the lane's integer sum would mix two scales. [`unsupported`] names the reason
//! and the caller keeps the exact f32 kernel for those weights. Groups are also capped at 32768
//! inputs so that the i32 accumulators cannot overflow.
//!
//! # Threads, prefetch, more than one row
//!
//! As in [`crate::quant::int4_avx512`]: ranges of quads (4 rows) go to libtorch's OpenMP team
//! through [`crate::quant::team`]'s atomic counter, each thread streams its quads' contiguous
//! codes with a software prefetch of each line into L2 16 KiB ahead and into L1 4 KiB ahead
//! ([`crate::quant::team::prefetch_stream`], measured there), the scales and zero points two quads
//! ahead (`SIDE_AHEAD`); each group's constants are set up sixteen groups at a time (`SETUP`),
//! and the codes lie on 64-byte-aligned lines ([`crate::quant::int4_avx512`]'s `CacheLines`). The
//! activation row is put on its grid and into the kernel's order by AVX-512 code that gives the
//! scalar definition's values bit for bit (1.8 µs for a 4096-long row against 7.1 µs, Intel Xeon
//! with AVX512-BF16, 2026-12-06). With `m > 1` activation rows each quad
//! is multiplied with every row while its codes are in L1, two rows at a time (each block of
//! codes loaded once for both: 8 i32 and 8 f32 accumulators, within the 32 registers; on one
//! 11008×4096 weight at m = 64 this took 16.7–18.3 ms down to 14.0–15.5 ms, same machine as
//! below). Decode, `m = 1`, is the case this kernel is for.
//!
//! Speed (first measured 2026-12-02 on an AMD EPYC with AVX-512 VNNI, 2 cores, `experiments bench
//! configs/efficiency.toml`, 3 rounds, README "Efficiency"): decode of the LLaVA-1.5-7B shape
//! with every linear on this kernel, 125 ms/token (88–128) with int8-per-group activations
//! (`W4A16 g128 q8`), 3.24× (3.04–3.90×) the own bf16 kernel's decode in the same rounds, against
//! 156 ms/token and 2.34× for the exact f32 kernel; W4A8 and W4A4 (per-token activations) run
//! the same loop at the same speed within that machine's noise (the README has a later run). The
//! prefetch was first the f32 kernel's (one line into L1 6 KiB ahead); the two-level one
//! replaced it on 2026-12-05 (measured in [`crate::quant::team::prefetch_stream`]). The AVX-512 loop's arithmetic is tested bit for bit against the same loop on emulated
//! lanes, which runs on any CPU (and ran on the VNNI CPU: identical).
//!
//! `unsafe` here: the AVX-512 intrinsics and their unaligned loads (every load's range is checked
//! against the slice lengths, with checked arithmetic, before the unchecked loop starts).
#![allow(unsafe_code)]

use super::int4_avx512::{Int4Weight, BLOCK, QUAD};
use super::team::{self, Team};

/// The bound the tests assert on ‖y_q8 − y_exact‖ / ‖y_exact‖ for Gaussian activations, random
/// codes, `k = 4096`, groups of 128 (measured: 0.64 % symmetric, 0.60 % asymmetric).
pub const MAX_RELATIVE_ERROR: f64 = 0.0075;

/// The largest group this kernel takes: `offset · Σxq` (offset ≤ 255 + 8, |xq| ≤ 128) must fit
/// the i32 accumulator (263 · 128 · 2^15 < 2^31).
pub const MAX_GROUP: usize = 1 << 15;

/// The CPU features this kernel needs that this CPU lacks (empty: it runs here).
fn missing_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut missing = Vec::new();
        if !std::arch::is_x86_feature_detected!("avx512f") {
            missing.push("AVX-512F");
        }
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            missing.push("AVX-512BW");
        }
        if !std::arch::is_x86_feature_detected!("avx512vnni") {
            missing.push("AVX-512 VNNI");
        }
        missing
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec!["x86-64", "AVX-512F", "AVX-512BW", "AVX-512 VNNI"]
    }
}

/// Whether this CPU runs the kernel (AVX-512F, AVX-512BW and AVX-512 VNNI).
pub fn available() -> bool {
    missing_features().is_empty()
}

/// Why this kernel cannot take a weight `[n, k]` in groups of `group` on this CPU, if it cannot.
pub fn unsupported(n: usize, k: usize, group: usize) -> Option<String> {
    let missing = missing_features();
    if !missing.is_empty() {
        return Some(format!(
            "the CPU has no {} (int4_vnni needs AVX-512F + AVX-512BW + AVX-512 VNNI)",
            missing.join(" + ")
        ));
    }
    unsupported_shape(n, k, group)
}

/// The shape rules alone (whatever the CPU).
fn unsupported_shape(n: usize, k: usize, group: usize) -> Option<String> {
    if !n.is_multiple_of(QUAD) {
        return Some(format!("int4_vnni needs out % {QUAD} == 0, out = {n}"));
    }
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return Some(format!("int4_vnni needs in % {BLOCK} == 0, in = {k}"));
    }
    if group == 0 || !group.is_multiple_of(BLOCK) || !k.is_multiple_of(group) {
        return Some(format!(
            "int4_vnni needs a group that is a multiple of {BLOCK} and divides in = {k}, got \
             {group} (a smaller group would mix two groups' activation scales in one 32-bit lane \
             of vpdpbusd; the exact f32 kernel takes it)"
        ));
    }
    if group > MAX_GROUP {
        return Some(format!(
            "int4_vnni takes groups of at most {MAX_GROUP} inputs (i32 accumulators), got {group}"
        ));
    }
    None
}

/// Activation rows on the int8 grid of [`quantize_activations`].
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Activations {
    /// Rows.
    pub m: usize,
    /// Inputs per row.
    pub k: usize,
    /// Inputs per scale.
    pub group: usize,
    /// `[m, k]` int8 values, in the input order.
    pub q: Vec<i8>,
    /// `[m, k/group]` f32 scales `sx` (`x ≈ xq · sx`).
    pub scale: Vec<f32>,
    /// `[m, k/group]` `Σ xq` of each group.
    pub sum: Vec<i32>,
    /// `q` in the kernel's order, `[m, k/128, 2, 16, 4]`: block `b`, half `h`, lane `j`, byte `t`
    /// is `q[128·b + j + 16·(2t + h)]` of the row. Empty when `k % 128 != 0`.
    pub packed: Vec<i8>,
}

/// `x` (`[m, k]` f32, row-major) on an int8 grid per row and per group of `group` inputs:
/// `sx = max|x| / 127`, `xq = round_half_even(x / sx)` clamped to ±127, and a group of zeros gets
/// `sx = 0`, `xq = 0` (NaNs are ignored by the max and become 0). `None` when `k` or `group` is 0,
/// `group` does not divide `k`, or `x` is not a whole number of rows.
pub fn quantize_activations(x: &[f32], k: usize, group: usize) -> Option<Q8Activations> {
    if k == 0 || group == 0 || !k.is_multiple_of(group) || !x.len().is_multiple_of(k) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if group.is_multiple_of(BLOCK) && available() {
        // SAFETY: the CPU has the features (checked); `group` is a multiple of 128 and divides
        // `k`, which divides `x.len()` (checked above).
        return Some(unsafe { prepare::per_group(x, k, group) });
    }
    Some(quantize_activations_scalar(x, k, group))
}

/// [`quantize_activations`] value by value, on any CPU (the reference its AVX-512 path is tested
/// against bit for bit). The caller checked that `group` divides `k` and `k` divides `x.len()`.
fn quantize_activations_scalar(x: &[f32], k: usize, group: usize) -> Q8Activations {
    let m = x.len() / k;
    let groups = m * (k / group);
    let mut q = vec![0i8; x.len()];
    let (mut scale, mut sum) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
    for (xg, qg) in x.chunks_exact(group).zip(q.chunks_exact_mut(group)) {
        let amax = xg.iter().fold(0f32, |a, v| a.max(v.abs()));
        let sx = amax / 127.0;
        let mut s = 0i32;
        if sx > 0.0 {
            for (v, o) in xg.iter().zip(qg.iter_mut()) {
                // `as` sends NaN to 0.
                *o = round_ties_even_small((v / sx).clamp(-127.0, 127.0)) as i8;
                // At most 127 · group: `group` ≤ `x.len()`, far below 2^31 / 127 in practice, and
                // wrapping (never a panic) beyond.
                s = s.wrapping_add(i32::from(*o));
            }
        }
        scale.push(sx);
        sum.push(s);
    }
    let packed = if k.is_multiple_of(BLOCK) {
        let mut packed = vec![0i8; q.len()];
        kernel_order_scalar(&q, &mut packed);
        packed
    } else {
        Vec::new()
    };
    Q8Activations { m, k, group, q, scale, sum, packed }
}

/// `y.round_ties_even()` for |y| ≤ 2²² (and NaN → NaN): adding and subtracting 1.5 · 2²³ leaves
/// the integer nearest to `y` in round-to-nearest-even, the default (and only) rounding mode Rust
/// code runs in. Why not `round_ties_even`: on the default x86-64 target (SSE2, no `roundps`) it
/// is a call to libm's `rintf` per element, 1.5 % of a W4A16-q8 decode step by itself (perf,
/// AMD EPYC, 2026-12-02); this compiles to two vector adds. Tested equal on ties and the clamp
/// range.
#[inline]
fn round_ties_even_small(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³
    (y + MAGIC) - MAGIC
}

/// `q` (`[m, k]`, input order) rearranged into the kernel's order (see [`Q8Activations::packed`]);
/// empty when `k % 128 != 0`.
fn kernel_order(q: &[i8], k: usize) -> Vec<i8> {
    if !k.is_multiple_of(BLOCK) {
        return Vec::new();
    }
    let mut packed = vec![0i8; q.len()];
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the features (checked); `q.len()` is a multiple of 128 (`k` is)
        // and `packed` as long.
        unsafe { prepare::kernel_order(q, &mut packed) };
        return packed;
    }
    kernel_order_scalar(q, &mut packed);
    packed
}

/// [`kernel_order`] element by element (any CPU; the reference the AVX-512 one is tested
/// against).
fn kernel_order_scalar(q: &[i8], packed: &mut [i8]) {
    for (src, dst) in q.chunks_exact(BLOCK).zip(packed.chunks_exact_mut(BLOCK)) {
        for h in 0..2 {
            for j in 0..16 {
                for t in 0..4 {
                    dst[h * 64 + 4 * j + t] = src[j + 16 * (2 * t + h)];
                }
            }
        }
    }
}

/// The activations' preparation on AVX-512: the same values as the scalar code above, bit for bit
/// (tested), at a fraction of its time. Why: the scalar preparation of one 4096-long row took
/// 7.1 µs (Intel Xeon with AVX512-BF16, 2026-12-06) — before every one of the 224 linears of a
/// LLaVA-7B decode step, on one thread, with memory idle: about 1.5 % of the step.
#[cfg(target_arch = "x86_64")]
mod prepare {
    use std::arch::x86_64::*;

    use super::{Q8Activations, BLOCK};

    /// The eight 16-lane rows `r` of one block of 128 codes (lane `j` = code `j + 16·r`, as i32)
    /// into the kernel's order at `dst` (128 bytes): half `h`, lane `j`, byte `t` = row `2t + h`.
    ///
    /// SAFETY: AVX-512F; `dst..dst + 128` writable.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn pack_block(rows: &[__m512i; 8], dst: *mut i8) {
        let byte = _mm512_set1_epi32(0xff);
        for h in 0..2 {
            let b = |t: usize| _mm512_and_si512(rows[2 * t + h], byte);
            let word = _mm512_or_si512(
                _mm512_or_si512(b(0), _mm512_slli_epi32::<8>(b(1))),
                _mm512_or_si512(_mm512_slli_epi32::<16>(b(2)), _mm512_slli_epi32::<24>(b(3))),
            );
            _mm512_storeu_si512(dst.add(64 * h) as *mut __m512i, word);
        }
    }

    /// [`super::kernel_order_scalar`].
    ///
    /// SAFETY: AVX-512 VNNI CPU; `q.len()` a multiple of 128, `packed` as long.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn kernel_order(q: &[i8], packed: &mut [i8]) {
        assert!(q.len().is_multiple_of(BLOCK) && packed.len() == q.len());
        for (src, dst) in q.chunks_exact(BLOCK).zip(packed.chunks_exact_mut(BLOCK)) {
            let mut rows = [_mm512_setzero_si512(); 8];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = _mm512_cvtepi8_epi32(_mm_loadu_si128(src.as_ptr().add(16 * r).cast()));
            }
            pack_block(&rows, dst.as_mut_ptr());
        }
    }

    /// [`super::quantize_activations`]'s loop for groups that are whole blocks: per group the
    /// largest magnitude (`vmaxps` with the running maximum second: a NaN input keeps it, as
    /// `f32::max` does), `sx = max / 127`, then per value `x / sx` clamped to ±127 (`vmaxps`,
    /// `vminps` with the value second: a NaN stays NaN, as `f32::clamp` keeps it), rounded by the
    /// same `1.5 · 2²³` addition, NaN → 0; the codes in input order, in the kernel's order, and
    /// their sum.
    ///
    /// SAFETY: AVX-512 VNNI CPU (the bounds are asserted).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn per_group(x: &[f32], k: usize, group: usize) -> Q8Activations {
        assert!(group > 0 && group.is_multiple_of(BLOCK) && k.is_multiple_of(group));
        assert!(k > 0 && x.len().is_multiple_of(k));
        let (mut q, mut packed) = (vec![0i8; x.len()], vec![0i8; x.len()]);
        let groups = x.len() / group;
        let (mut scale, mut sum) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
        let magnitude = _mm512_set1_epi32(0x7fff_ffff);
        let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        let magic = _mm512_set1_ps(12_582_912.0); // `round_ties_even_small`'s 1.5 · 2²³
        for (g, xg) in x.chunks_exact(group).enumerate() {
            let mut amax = _mm512_setzero_ps();
            for v in xg.chunks_exact(16) {
                let v = _mm512_castps_si512(_mm512_loadu_ps(v.as_ptr()));
                amax = _mm512_max_ps(_mm512_castsi512_ps(_mm512_and_si512(v, magnitude)), amax);
            }
            let sx = _mm512_reduce_max_ps(amax) / 127.0;
            let mut total = _mm512_setzero_si512();
            if sx > 0.0 {
                let step = _mm512_set1_ps(sx);
                for b in 0..group / BLOCK {
                    let at = g * group + b * BLOCK;
                    let mut rows = [_mm512_setzero_si512(); 8];
                    for (r, row) in rows.iter_mut().enumerate() {
                        let v = _mm512_loadu_ps(x.as_ptr().add(at + 16 * r));
                        let c = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_div_ps(v, step)));
                        let y = _mm512_sub_ps(_mm512_add_ps(c, magic), magic);
                        let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y);
                        *row = _mm512_maskz_cvttps_epi32(ordered, y);
                        total = _mm512_add_epi32(total, *row);
                        _mm_storeu_si128(
                            q.as_mut_ptr().add(at + 16 * r).cast(),
                            _mm512_cvtepi32_epi8(*row),
                        );
                    }
                    pack_block(&rows, packed.as_mut_ptr().add(at));
                }
            }
            scale.push(sx);
            sum.push(_mm512_reduce_add_epi32(total));
        }
        Q8Activations { m: x.len() / k, k, group, q, scale, sum, packed }
    }
}

/// `x` (`[m, k]` f32, row-major) on a symmetric `bits`-bit grid per row (token), exactly as the
/// crate's dynamic per-token activation quantizer puts it (`ActQuantizer` with
/// `Granularity::PerToken`: [`crate::quant::uniform::QParams::from_range`] on the row's min and
/// max, then [`crate::quant::reference::fake_quant_reference`]'s arithmetic), so that the integer
/// codes are those of the fake-quant reference bit for bit (tested): non-finite inputs made
/// finite first (NaN → 0, ±inf → ±`f32::MAX`), `s = max(amax / ((qmax − qmin) / 2),
/// MIN_SCALE)` with `amax` the row's largest magnitude, `xq = clamp(round_half_even(x · (1/s)),
/// qmin, qmax)` with `[qmin, qmax] = [−2^(bits−1), 2^(bits−1) − 1]`. The row's scale is repeated
/// for each of its groups of `group` inputs (the weight's groups, the kernel's bookkeeping).
/// `None` when `bits` is outside 2..=8, or as [`quantize_activations`].
///
/// Where it is used: W4A8 (`bits = 8`) and W4A4 (`bits = 4`, the paper's Table 4 setting) decode
/// on [`Int4Weight::matmul_quantized`].
pub fn quantize_activations_per_token(
    x: &[f32],
    k: usize,
    group: usize,
    bits: u8,
) -> Option<Q8Activations> {
    if !(2..=8).contains(&bits)
        || k == 0
        || group == 0
        || !k.is_multiple_of(group)
        || !x.len().is_multiple_of(k)
    {
        return None;
    }
    let (qmin, qmax) = (-(1i32 << (bits - 1)), (1i32 << (bits - 1)) - 1);
    // `QParams::from_range`'s symmetric rule: the f32 tensor `amax` divided by the f64 scalar
    // `(qmax − qmin) / 2`, which torch applies in f32 (a wrapped scalar takes the tensor's dtype).
    let half_width = ((qmax - qmin) as f32) / 2.0;
    let min_scale = super::uniform::MIN_SCALE as f32;
    let m = x.len() / k;
    let groups_per_row = k / group;
    let mut q = vec![0i8; x.len()];
    let (mut scale, mut sum) =
        (Vec::with_capacity(m * groups_per_row), Vec::with_capacity(m * groups_per_row));
    for (xr, qr) in x.chunks_exact(k).zip(q.chunks_exact_mut(k)) {
        let finite = |v: f32| if v.is_nan() { 0.0 } else { v.clamp(f32::MIN, f32::MAX) };
        let (lo, hi) =
            xr.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(finite(v)), hi.max(finite(v))));
        let s = (lo.abs().max(hi) / half_width).max(min_scale);
        let inv = 1.0 / s;
        for (v, o) in xr.iter().zip(qr.iter_mut()) {
            // In [qmin, qmax] ⊂ [−128, 127]: the cast is exact.
            *o = round_ties_even_small((finite(*v) * inv).clamp(qmin as f32, qmax as f32)) as i8;
        }
        for qg in qr.chunks_exact(group) {
            scale.push(s);
            sum.push(qg.iter().map(|&v| i32::from(v)).sum());
        }
    }
    let packed = kernel_order(&q, k);
    Some(Q8Activations { m, k, group, q, scale, sum, packed })
}

impl Int4Weight {
    /// `x Wᵀ` for `x` `[m, k]` f32 (row-major) with the activations on an int8 grid per group
    /// (see the [module](crate::quant::int4_vnni) for how this differs from [`Self::matmul`]):
    /// `[m, n]` f32, on the kernel's threads. `None` when [`unsupported`] refuses the weight on
    /// this CPU or `x` is not `m · k` long (`m` ≥ 1).
    pub fn matmul_q8(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        matmul_q8_on(self, x, m, team::default_team, Lanes::Avx512)
    }

    /// `x Wᵀ` for activations already on an integer grid (`[a.m, n]` f32): the per-group int8
    /// rows of [`quantize_activations`] or the per-token ones of
    /// [`quantize_activations_per_token`] (W4A8, W4A4). The integer part is exact; the result is
    /// the dequantized weight times `xq · sx` within the rounding of the final f32 scaling.
    /// `None` when [`unsupported`] refuses the weight on this CPU or `a` was quantized for
    /// another shape.
    pub fn matmul_quantized(&self, a: &Q8Activations) -> Option<Vec<f32>> {
        matmul_quantized_on(&[self], a, team::default_team, Lanes::Avx512)?.pop()
    }

    /// [`Self::matmul_quantized`] of several weights on the same activations in one hand-out of
    /// the thread team (`team::quads_matmul_many`: a layer's q, k and v projections, its gate
    /// and up): each weight's `[a.m, n_i]`, bit for bit what one call each gives. `None` when
    /// any of them would be refused alone, or `weights` is empty.
    pub fn matmul_quantized_many(weights: &[&Self], a: &Q8Activations) -> Option<Vec<Vec<f32>>> {
        matmul_quantized_on(weights, a, team::default_team, Lanes::Avx512)
    }
}

/// Which implementation of the lane operations runs the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lanes {
    /// The AVX-512 VNNI instructions.
    Avx512,
    /// The same loop on arrays of 16 lanes in plain Rust (tests: it checks the loop and its
    /// arithmetic on any CPU, and the AVX-512 one against it bit for bit).
    #[cfg(test)]
    Emulated,
}

fn matmul_q8_on(w: &Int4Weight, x: &[f32], m: usize, on: Team, lanes: Lanes) -> Option<Vec<f32>> {
    if m == 0
        || Some(x.len()) != m.checked_mul(w.k)
        || unsupported_shape(w.n, w.k, w.group).is_some()
    {
        return None;
    }
    if lanes == Lanes::Avx512 && !available() {
        return None;
    }
    let a = quantize_activations(x, w.k, w.group)?;
    matmul_quantized_on(&[w], &a, on, lanes)?.pop()
}

fn matmul_quantized_on(
    weights: &[&Int4Weight],
    a: &Q8Activations,
    on: Team,
    lanes: Lanes,
) -> Option<Vec<Vec<f32>>> {
    for w in weights {
        let groups = a.m.checked_mul(w.k / w.group.max(1))?;
        if a.m == 0
            || a.k != w.k
            || a.group != w.group
            || unsupported_shape(w.n, w.k, w.group).is_some()
            || Some(a.packed.len()) != a.m.checked_mul(w.k)
            || a.scale.len() != groups
            || a.sum.len() != groups
        {
            return None;
        }
    }
    if weights.is_empty() || (lanes == Lanes::Avx512 && !available()) {
        return None;
    }
    team::quads_matmul_many(
        on,
        weights,
        |w| w.n,
        a.m,
        QUAD,
        16,
        |w, first, count, out| quads_into(w, a, first, count, out, lanes),
    )
}

/// Quads `first..first + count` against every row of `a`, into `out` `[count · 4, m]`.
fn quads_into(
    w: &Int4Weight,
    a: &Q8Activations,
    first: usize,
    count: usize,
    out: &mut [f32],
    lanes: Lanes,
) {
    // Every bound the unchecked loop relies on, with checked products: a wrapped bound would let
    // it run past the slices in a release build.
    assert!(unsupported_shape(w.n, w.k, w.group).is_none(), "shape outside the kernel's rules");
    assert!(a.k == w.k && a.group == w.group, "activations quantized for another shape");
    let (blocks, groups) = (w.k / BLOCK, w.k / w.group);
    let end = first.checked_add(count).expect("quad range overflows");
    let words = end.checked_mul(blocks).and_then(|v| v.checked_mul(QUAD * 16));
    let scales = end.checked_mul(QUAD).and_then(|v| v.checked_mul(groups));
    assert!(words.is_some_and(|v| v <= w.words.len()), "quads past the codes");
    assert!(scales.is_some_and(|v| v <= w.scale.len()), "quads past the scales");
    assert!(w.zero_point.as_ref().is_none_or(|z| z.len() == w.scale.len()), "zero points ≠ scales");
    let m = a.m;
    assert!(Some(a.packed.len()) == m.checked_mul(w.k), "packed activations not m · k long");
    let act_groups = m.checked_mul(groups);
    assert!(
        act_groups.is_some_and(|g| g == a.scale.len() && g == a.sum.len()),
        "activation scales"
    );
    assert!(Some(out.len()) == count.checked_mul(QUAD * m), "out is not 4 · count · m long");
    match lanes {
        Lanes::Avx512 => {
            assert!(available(), "int4_vnni on a CPU without AVX-512 VNNI");
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU features are present (asserted above); every index the loop forms is
            // below the lengths asserted above.
            unsafe {
                avx512::quads(w, a, first, count, out);
            }
        }
        #[cfg(test)]
        // SAFETY: as above (plain Rust, no CPU feature needed).
        Lanes::Emulated => unsafe { emulated::quads(w, a, first, count, out) },
    }
}

/// The 16 lanes summed in a fixed tree order (both implementations, so that they agree bit for
/// bit).
#[inline]
fn tree_sum(v: [f32; 16]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|j| v[j] + v[j + 8]);
    let b: [f32; 4] = std::array::from_fn(|j| a[j] + a[j + 4]);
    (b[0] + b[2]) + (b[1] + b[3])
}

/// How many groups' constants (`scale_w · sx` and the i32 start `−offset · Σxq` of each output
/// row and activation row) are computed together, as plain loops over arrays that vectorize,
/// before the codes of those groups stream. One group at a time this set-up was about ten scalar
/// instructions per row and group — with groups of 128 as many as the streaming itself takes per
/// 64-byte line. Measured on the Intel Xeon with AVX512-BF16 (2026-12-06, 2 threads): one
/// `[256, 4096]` weight in cache, 19.8 → 9.3 µs a call (with the faster activation preparation
/// below); from memory (`examples/stream_probe`) the set-up alone changed nothing measurable —
/// with the set-up removed altogether (a wrong-result experiment) the kernel read 93–95 % of the
/// roof against 88–92 % with it — and only with [`SIDE_AHEAD`]'s prefetch did the two together
/// gain (see there).
const SETUP: usize = 16;

/// How many quads ahead the scales and zero points of a quad are prefetched (into L1, one hint
/// per line). They are a second stream beside the codes (4 bytes of scale per 128 codes: 6 % of
/// the bytes with groups of 128), which the codes' own prefetch does not reach; without it the
/// batched set-up of [`SETUP`] met each quad's scales as demand misses. Two quads are 16 KiB of
/// codes at LLaVA's `k` = 4096, as far ahead as the codes' far prefetch. Measured with
/// `examples/stream_probe` (Intel Xeon with AVX512-BF16, 2026-12-06, 2 threads, median % of the
/// paired roof, binaries alternated): before both changes 87–90 %, with the batched set-up alone
/// 84–88 %, with both 88 % — noise on that machine was ±2 points — and in the same process,
/// variants alternated within each round, 1–2 points above the kernel without it (two runs of 4
/// rounds).
const SIDE_AHEAD: usize = 2;

/// The lane operations the loop is written in.
trait LaneOps {
    /// 16 i32 lanes (also 64 bytes of codes or activations).
    type I: Copy;
    /// 16 f32 lanes.
    type F: Copy;
    /// 64 bytes at `p` (unaligned). SAFETY: `p..p + 64` is readable.
    unsafe fn load(p: *const u8) -> Self::I;
    /// The prefetch hints for the stream at `p`: the line further on (never faults).
    unsafe fn prefetch(p: *const u8);
    /// The line at `p` into L1 (never faults).
    unsafe fn prefetch_line(p: *const u8);
    /// `c` in lane 0, zeros elsewhere.
    unsafe fn lane0(c: i32) -> Self::I;
    /// `acc + dpbusd(v & 0x0F.., xe) + dpbusd((v >> 4) & 0x0F.., xo)`.
    unsafe fn dot(acc: Self::I, v: Self::I, xe: Self::I, xo: Self::I) -> Self::I;
    unsafe fn fzero() -> Self::F;
    /// `f + f32(acc) · s`, lane by lane, fused.
    unsafe fn scale_add(acc: Self::I, s: f32, f: Self::F) -> Self::F;
    unsafe fn lanes(f: Self::F) -> [f32; 16];
}

/// The loop over quads, one expansion per [`LaneOps`] implementation (an expansion, not a generic
/// function: the AVX-512 one must be compiled inside a `#[target_feature]` function, the emulated
/// one outside any).
///
/// SAFETY of the expanded function: the caller ([`quads_into`]) checked every bound it reads.
macro_rules! quad_loop {
    ($(#[$attr:meta])* $L:ty) => {
        $(#[$attr])*
        pub(super) unsafe fn quads(
            w: &Int4Weight,
            a: &Q8Activations,
            first: usize,
            count: usize,
            out: &mut [f32],
        ) {
            let m = a.m;
            let groups = w.k / w.group;
            for q in 0..count {
                // The scales and zero points of the quad `SIDE_AHEAD` on: a second, small stream
                // the codes' prefetch does not cover (hints: addresses past the end never fault).
                let ahead = (first + q + super::SIDE_AHEAD) * QUAD * groups;
                let scales = w.scale.as_ptr().wrapping_add(ahead) as *const u8;
                let mut at = 0;
                while at < QUAD * groups * 4 {
                    <$L>::prefetch_line(scales.wrapping_add(at));
                    at += 64;
                }
                if let Some(z) = &w.zero_point {
                    let z = z.as_ptr().wrapping_add(ahead);
                    let mut at = 0;
                    while at < QUAD * groups {
                        <$L>::prefetch_line(z.wrapping_add(at));
                        at += 64;
                    }
                }
                // Activation rows two at a time (each quad's codes loaded and split into nibbles
                // once for both), the last one alone when `m` is odd. Each (row, output) pair
                // sees the same operations in the same order either way: bit-identical results.
                let mut r = 0;
                while r + 2 <= m {
                    rows::<2>(w, a, first + q, r, &mut out[q * QUAD * m..(q + 1) * QUAD * m]);
                    r += 2;
                }
                if r < m {
                    rows::<1>(w, a, first + q, r, &mut out[q * QUAD * m..(q + 1) * QUAD * m]);
                }
            }
        }

        /// Activation rows `r0..r0 + R` against quad `quad`, into `out` `[4, m]` (the quad's
        /// slice of the output).
        $(#[$attr])*
        #[inline]
        unsafe fn rows<const R: usize>(
            w: &Int4Weight,
            a: &Q8Activations,
            quad: usize,
            r0: usize,
            out: &mut [f32],
        ) {
            let (blocks, groups) = (w.k / BLOCK, w.k / w.group);
            let blocks_per_group = w.group / BLOCK;
            let quad_words = blocks * QUAD * 16;
            let scale = w.scale.as_ptr();
            let zero_point = w.zero_point.as_ref().map(|z| z.as_ptr());
            let m = a.m;
            let row0 = quad * QUAD;
            let mut p = w.words.as_ptr().add(quad * quad_words) as *const u8;
            let mut xp: [*const u8; R] =
                std::array::from_fn(|j| a.packed.as_ptr().add((r0 + j) * w.k) as *const u8);
            let mut f = [[<$L>::fzero(); QUAD]; R];
            // Each group's constants, `SETUP` groups at a time, ahead of the streaming loop: as
            // plain loops over arrays they vectorize, where one group at a time they were ~10
            // scalar instructions per row and group of 128 weights (see [`SETUP`]).
            let mut g0 = 0;
            while g0 < groups {
                let len = super::SETUP.min(groups - g0);
                let mut start = [[[0i32; super::SETUP]; QUAD]; R];
                let mut s = [[[0f32; super::SETUP]; QUAD]; R];
                for j in 0..R {
                    let at_x = (r0 + j) * groups + g0;
                    let sx = std::slice::from_raw_parts(a.scale.as_ptr().add(at_x), len);
                    let sum = std::slice::from_raw_parts(a.sum.as_ptr().add(at_x), len);
                    for i in 0..QUAD {
                        let at = (row0 + i) * groups + g0;
                        let sw = std::slice::from_raw_parts(scale.add(at), len);
                        for t in 0..len {
                            s[j][i][t] = sw[t] * sx[t];
                        }
                        match zero_point {
                            // `−offset · Σxq` starts lane 0: the bracket stays exact in i32.
                            Some(z) => {
                                let zp = std::slice::from_raw_parts(z.add(at), len);
                                for t in 0..len {
                                    let offset = i32::from(zp[t]).wrapping_sub(w.qmin);
                                    start[j][i][t] = offset.wrapping_mul(sum[t]).wrapping_neg();
                                }
                            }
                            None => {
                                let offset = w.qmin.wrapping_neg();
                                for t in 0..len {
                                    start[j][i][t] = offset.wrapping_mul(sum[t]).wrapping_neg();
                                }
                            }
                        }
                    }
                }
                for t in 0..len {
                    let mut acc = [[<$L>::lane0(0); QUAD]; R];
                    for j in 0..R {
                        for i in 0..QUAD {
                            acc[j][i] = <$L>::lane0(start[j][i][t]);
                        }
                    }
                    for _ in 0..blocks_per_group {
                        // Filled by a loop, not `array::from_fn`: a closure would not inherit the
                        // function's target features, and the loads would not be inlined.
                        let mut x = [(<$L>::lane0(0), <$L>::lane0(0)); R];
                        for j in 0..R {
                            x[j] = (<$L>::load(xp[j]), <$L>::load(xp[j].add(64)));
                        }
                        for i in 0..QUAD {
                            let pi = p.add(64 * i);
                            // A prefetch past the end of the allocation is a hint, never a fault.
                            <$L>::prefetch(pi);
                            let v = <$L>::load(pi);
                            for j in 0..R {
                                acc[j][i] = <$L>::dot(acc[j][i], v, x[j].0, x[j].1);
                            }
                        }
                        p = p.add(QUAD * 64);
                        for x in xp.iter_mut() {
                            *x = x.add(BLOCK);
                        }
                    }
                    for j in 0..R {
                        for i in 0..QUAD {
                            f[j][i] = <$L>::scale_add(acc[j][i], s[j][i][t], f[j][i]);
                        }
                    }
                }
                g0 += len;
            }
            for j in 0..R {
                for i in 0..QUAD {
                    *out.get_unchecked_mut(i * m + r0 + j) = super::tree_sum(<$L>::lanes(f[j][i]));
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Int4Weight, LaneOps, Q8Activations, BLOCK, QUAD};

    pub(super) struct Avx512;

    impl LaneOps for Avx512 {
        type I = __m512i;
        type F = __m512;

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn load(p: *const u8) -> __m512i {
            _mm512_loadu_si512(p as *const __m512i)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn prefetch(p: *const u8) {
            crate::quant::team::prefetch_stream(p)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn prefetch_line(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn lane0(c: i32) -> __m512i {
            // `vmovd` zeroes the other lanes: one instruction.
            _mm512_zextsi128_si512(_mm_cvtsi32_si128(c))
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn dot(acc: __m512i, v: __m512i, xe: __m512i, xo: __m512i) -> __m512i {
            let low = _mm512_set1_epi8(0x0F);
            let even = _mm512_and_si512(v, low);
            let odd = _mm512_and_si512(_mm512_srli_epi32::<4>(v), low);
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, even, xe), odd, xo)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn fzero() -> __m512 {
            _mm512_setzero_ps()
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn scale_add(acc: __m512i, s: f32, f: __m512) -> __m512 {
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(s), f)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn lanes(f: __m512) -> [f32; 16] {
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), f);
            out
        }
    }

    quad_loop!(
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        Avx512
    );
}

#[cfg(test)]
mod emulated {
    use super::{Int4Weight, LaneOps, Q8Activations, BLOCK, QUAD};

    /// `vpdpbusd` and friends on plain arrays (little-endian bytes, like the registers).
    pub(super) struct Emulated;

    impl LaneOps for Emulated {
        type I = [u32; 16];
        type F = [f32; 16];

        unsafe fn load(p: *const u8) -> [u32; 16] {
            std::ptr::read_unaligned(p as *const [u32; 16])
        }

        unsafe fn prefetch(_: *const u8) {}

        unsafe fn prefetch_line(_: *const u8) {}

        unsafe fn lane0(c: i32) -> [u32; 16] {
            let mut v = [0u32; 16];
            v[0] = c as u32;
            v
        }

        unsafe fn dot(acc: [u32; 16], v: [u32; 16], xe: [u32; 16], xo: [u32; 16]) -> [u32; 16] {
            std::array::from_fn(|j| {
                let (even, odd) = (v[j] & 0x0F0F_0F0F, (v[j] >> 4) & 0x0F0F_0F0F);
                let mut s = acc[j] as i32;
                for t in 0..4 {
                    let byte = |w: u32| (w >> (8 * t)) & 0xFF;
                    s = s.wrapping_add(byte(even) as i32 * i32::from(byte(xe[j]) as u8 as i8));
                    s = s.wrapping_add(byte(odd) as i32 * i32::from(byte(xo[j]) as u8 as i8));
                }
                s as u32
            })
        }

        unsafe fn fzero() -> [f32; 16] {
            [0.0; 16]
        }

        unsafe fn scale_add(acc: [u32; 16], s: f32, f: [f32; 16]) -> [f32; 16] {
            std::array::from_fn(|j| (acc[j] as i32 as f32).mul_add(s, f[j]))
        }

        unsafe fn lanes(f: [f32; 16]) -> [f32; 16] {
            f
        }
    }

    quad_loop!(Emulated);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_small_rounding_equals_round_ties_even_on_the_clamp_range() {
        let mut y = -130.0f32;
        while y <= 130.0 {
            for v in [y, y + 0.5, y - 0.5, y + 0.49999997, y + 0.50000006] {
                let c = v.clamp(-127.0, 127.0);
                assert_eq!(round_ties_even_small(c), c.round_ties_even(), "{v}");
            }
            y += 0.25;
        }
        assert!(round_ties_even_small(f32::NAN).is_nan());
        assert_eq!(round_ties_even_small(-0.4), 0.0);
    }

    /// Lane implementations this CPU runs: the emulated one everywhere, AVX-512 where present.
    fn lanes_here() -> Vec<Lanes> {
        let mut lanes = vec![Lanes::Emulated];
        if available() {
            lanes.push(Lanes::Avx512);
        }
        lanes
    }

    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        fn uniform(&mut self) -> f64 {
            (f64::from(self.next()) + 0.5) / f64::from(1u32 << 31)
        }

        fn normal(&mut self) -> f32 {
            let (u, v) = (self.uniform(), self.uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        }
    }

    /// The documented layout of [`Int4Weight::words`], built here on any CPU (`from_nibbles`
    /// refuses without AVX-512F+BW); checked against `from_nibbles` where that runs.
    fn pack(nibbles: &[u8], n: usize, k: usize) -> Vec<u32> {
        let blocks = k / BLOCK;
        let mut words = vec![0u32; n * k / 8];
        for row in 0..n {
            for col in 0..k {
                let byte = nibbles[row * k / 2 + col / 2];
                let code = if col % 2 == 0 { byte >> 4 } else { byte & 15 };
                let (b, s, j) = (col / BLOCK, col % BLOCK / 16, col % 16);
                words[((row / QUAD * blocks + b) * QUAD + row % QUAD) * 16 + j] |=
                    u32::from(code) << (4 * s);
            }
        }
        words
    }

    /// A deterministic weight and its portable nibbles: random codes, scales in [1e-3, 1.1e-2),
    /// zero points 0..16 with `qmin = 0` (asymmetric) or none with `qmin = −8` (symmetric).
    fn weight(
        n: usize,
        k: usize,
        group: usize,
        symmetric: bool,
        seed: u64,
    ) -> (Vec<u8>, Int4Weight) {
        let mut rng = Lcg(seed);
        let nibbles: Vec<u8> = (0..n * k / 2).map(|_| rng.next() as u8).collect();
        let groups = n * (k / group);
        let scale: Vec<f32> =
            (0..groups).map(|_| (rng.next() % 1000) as f32 * 1e-5 + 1e-3).collect();
        let zero_point =
            (!symmetric).then(|| (0..groups).map(|_| (rng.next() % 16) as u8).collect());
        let qmin = if symmetric { -8 } else { 0 };
        let words = pack(&nibbles, n, k);
        if crate::quant::int4_avx512::available() {
            let w = Int4Weight::from_nibbles(
                &nibbles,
                scale.clone(),
                zero_point.clone(),
                qmin,
                n,
                k,
                group,
            )
            .expect("the f32 kernel takes the shape");
            assert!(w.words[..] == words[..], "the layout as this module reads it");
        }
        // `isa` is the f32 kernel's level; the VNNI path and its portable twin do not read it.
        let isa = crate::quant::team::Isa::Avx2;
        let words = super::super::int4_avx512::CacheLines::from_words(&words).expect("whole lines");
        let prefill = super::super::int4_avx512::Prefill::Auto;
        (nibbles, Int4Weight { n, k, group, words, scale, zero_point, qmin, isa, prefill })
    }

    /// The dequantized weight in f64, `(c − (zero_point − qmin)) · scale` (exact).
    fn dequantized(w: &Int4Weight, nibbles: &[u8]) -> Vec<f64> {
        let (n, k, groups) = (w.n, w.k, w.k / w.group);
        let mut out = vec![0f64; n * k];
        for row in 0..n {
            for col in 0..k {
                let byte = nibbles[row * k / 2 + col / 2];
                let c = if col % 2 == 0 { byte >> 4 } else { byte & 15 };
                let at = row * groups + col / w.group;
                let zp = w.zero_point.as_ref().map_or(0, |z| i32::from(z[at]));
                out[row * k + col] =
                    f64::from(i32::from(c) - (zp - w.qmin)) * f64::from(w.scale[at]);
            }
        }
        out
    }

    fn gaussian(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = Lcg(seed);
        (0..len).map(|_| rng.normal()).collect()
    }

    #[test]
    fn availability_and_refusals_are_named() {
        if available() {
            assert!(unsupported(4, 128, 128).is_none());
            assert!(unsupported(8, 4096, 4096).is_none());
        } else {
            // The reason names every missing feature, and the kernel refuses to run.
            let reason = unsupported(4, 128, 128).expect("refused without the features");
            assert!(reason.contains("the CPU has no"), "{reason}");
            for feature in missing_features() {
                assert!(reason.contains(feature), "{reason} does not name {feature}");
            }
            let (_, w) = weight(4, 128, 128, true, 1);
            assert!(w.matmul_q8(&[0.5; 128], 1).is_none());
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            available(),
            std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
        );
        // Shape rules, whatever the CPU.
        assert!(unsupported_shape(4, 128, 128).is_none());
        assert!(unsupported_shape(4, 768, 256).is_none());
        assert!(unsupported_shape(6, 128, 128).is_some_and(|r| r.contains("out % 4")));
        assert!(unsupported_shape(4, 96, 32).is_some_and(|r| r.contains("in % 128")));
        assert!(unsupported_shape(4, 0, 128).is_some_and(|r| r.contains("in % 128")));
        for group in [0, 16, 32, 64, 192, 384] {
            // Below a block, across blocks (192), or not dividing the 512 inputs (384).
            let reason = unsupported_shape(4, 512, group);
            assert!(reason.is_some_and(|r| r.contains("multiple of 128")), "group {group}");
        }
        let big = 2 * MAX_GROUP;
        assert!(unsupported_shape(4, big, big).is_some_and(|r| r.contains("at most")));
    }

    #[test]
    fn activations_follow_the_documented_grid_and_order() {
        // Group 0: max 127 → sx = 1 exactly; halves round to even. Group 1: zeros.
        let mut x = vec![0f32; 256];
        x[..6].copy_from_slice(&[127.0, 2.5, 3.5, -2.5, -0.5, 1.49]);
        x[100] = -127.0;
        let a = quantize_activations(&x, 256, 128).expect("valid shape");
        assert_eq!((a.m, a.scale.clone()), (1, vec![1.0, 0.0]));
        assert_eq!(&a.q[..6], &[127, 2, 4, -2, 0, 1]);
        assert_eq!(a.q[100], -127);
        assert!(a.q[128..].iter().all(|&v| v == 0));
        assert_eq!(a.sum, vec![127 + 2 + 4 - 2 + 1 - 127, 0]);
        // Random rows: the grid, the sums and the kernel's byte order.
        let x = gaussian(3 * 512, 7);
        for group in [128, 256, 512] {
            let a = quantize_activations(&x, 512, group).expect("valid shape");
            assert_eq!((a.m, a.scale.len(), a.packed.len()), (3, 3 * 512 / group, 3 * 512));
            for (g, (xg, qg)) in x.chunks(group).zip(a.q.chunks(group)).enumerate() {
                let amax = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(a.scale[g], amax / 127.0);
                assert!(qg.iter().any(|&v| v.abs() == 127), "the max lands on ±127");
                for (v, q) in xg.iter().zip(qg) {
                    assert!((v / a.scale[g] - f32::from(*q)).abs() <= 0.5 + 1e-4);
                }
                assert_eq!(a.sum[g], qg.iter().map(|&v| i32::from(v)).sum::<i32>());
            }
            for (b, (q, packed)) in a.q.chunks(128).zip(a.packed.chunks(128)).enumerate() {
                for j in 0..16 {
                    for t in 0..4 {
                        assert_eq!(packed[4 * j + t], q[j + 32 * t], "block {b}");
                        assert_eq!(packed[64 + 4 * j + t], q[j + 32 * t + 16], "block {b}");
                    }
                }
            }
        }
        // Refusals.
        assert!(quantize_activations(&x, 0, 128).is_none());
        assert!(quantize_activations(&x, 512, 0).is_none());
        assert!(quantize_activations(&x, 512, 96).is_none());
        assert!(quantize_activations(&x[..100], 512, 128).is_none());
        // k not a multiple of 128: values but no kernel order.
        let a = quantize_activations(&x[..96], 96, 32).expect("valid shape");
        assert!(a.packed.is_empty() && a.q.len() == 96);
    }

    /// Rows with what a real activation can hold besides Gaussian values: ties at the grid's
    /// half steps, a zero group, NaN, ±inf, subnormals, values at ±max.
    fn awkward_rows(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut x = gaussian(m * k, seed);
        for (i, v) in x.iter_mut().enumerate() {
            match i % 97 {
                3 => *v = f32::NAN,
                5 => *v = 2.5,
                7 => *v = -0.5,
                11 => *v = 1e-40,
                _ => {}
            }
        }
        x[300] = -f32::MAX;
        x[k + 17] = f32::INFINITY; // row 1's groups: one with an infinite max
        x[2 * k..2 * k + 128].fill(0.0); // row 2: a zero group
        x[2 * k + 200] = f32::NEG_INFINITY;
        x
    }

    #[test]
    fn avx512_preparation_equals_the_scalar_one_bit_for_bit() {
        let (m, k) = (3, 1024);
        let x = awkward_rows(m, k, 11);
        for group in [128, 256, 1024] {
            let scalar = quantize_activations_scalar(&x, k, group);
            let chosen = quantize_activations(&x, k, group).expect("valid shape");
            let bits = |v: &[f32]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&chosen.scale), bits(&scalar.scale), "group {group}");
            assert!(chosen.q == scalar.q, "group {group}: codes differ");
            assert_eq!(chosen.sum, scalar.sum, "group {group}");
            assert!(chosen.packed == scalar.packed, "group {group}: kernel order differs");
            let codes = scalar.q.iter().filter(|&&v| v != 0).count();
            assert!(group > 128 || codes > scalar.q.len() / 2, "mostly nonzero codes ({codes})");
            assert!(scalar.scale.contains(&f32::INFINITY), "an infinite max is covered");
            assert!(group > 128 || scalar.scale.contains(&0.0), "a zero group is covered");
        }
        // The per-token preparation shares the reordering.
        let q: Vec<i8> = (0..m * k).map(|i| (i * 37 % 256) as u8 as i8).collect();
        let mut scalar = vec![0i8; q.len()];
        kernel_order_scalar(&q, &mut scalar);
        assert!(kernel_order(&q, k) == scalar, "kernel order differs");
        // Which path ran: the AVX-512 one wherever the kernel runs (`available`), else the scalar.
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the features are present (checked).
            let fast = unsafe { prepare::per_group(&x, k, 128) };
            assert_eq!(fast.q, quantize_activations_scalar(&x, k, 128).q);
        }
    }

    #[test]
    fn kernel_is_exact_on_the_quantized_activations() {
        for (n, k, group, symmetric, m) in [
            (8, 256, 128, true, 1),
            (8, 256, 128, false, 1),
            (8, 256, 128, false, 3),
            (12, 512, 256, true, 1),
            (12, 512, 256, false, 3),
            (4, 768, 256, false, 1),
            (8, 768, 768, true, 3),
            (16, 1024, 128, false, 1),
        ] {
            let (nibbles, w) = weight(n, k, group, symmetric, (n * k + group) as u64);
            let dense = dequantized(&w, &nibbles);
            let mut x = gaussian(m * k, k as u64);
            // An all-zero group (sx = 0) in the first row.
            x[..group].fill(0.0);
            let a = quantize_activations(&x, k, group).expect("valid shape");
            let xq: Vec<f64> =
                (0..m * k).map(|i| f64::from(a.q[i]) * f64::from(a.scale[i / group])).collect();
            for lanes in lanes_here() {
                let y = matmul_q8_on(&w, &x, m, team::default_team, lanes).expect("kernel runs");
                let what = format!("{lanes:?} [{n}, {k}] g{group} sym {symmetric}");
                team::assert_matches_f64_reference(&dense, &xq, &y, n, k, m, &what);
            }
        }
    }

    #[test]
    fn per_token_activations_follow_the_fake_quant_rule() {
        // Row 0: amax 7.5 → s = 1 on the 4-bit grid (7.5 / 7.5): halves round to even, −amax
        // lands on qmin = −8, +amax clamps to 7. Row 1: zeros → s = MIN_SCALE, codes 0. Row 2:
        // NaN counts as 0, +inf as f32::MAX (so every finite value rounds to 0 but the inf).
        let k = 128;
        let mut x = vec![0f32; 3 * k];
        x[..7].copy_from_slice(&[7.5, -7.5, 0.5, 1.5, 2.5, -3.5, 6.9]);
        x[2 * k] = f32::NAN;
        x[2 * k + 1] = f32::INFINITY;
        x[2 * k + 2] = 1.0e30;
        let a = quantize_activations_per_token(&x, k, 128, 4).expect("valid shape");
        assert_eq!(a.scale[0], 1.0);
        assert_eq!(&a.q[..7], &[7, -8, 0, 2, 2, -4, 7]);
        assert_eq!(a.sum[0], 7 - 8 + 2 + 2 - 4 + 7);
        assert_eq!((a.scale[1], a.sum[1]), (crate::quant::uniform::MIN_SCALE as f32, 0));
        assert!(a.q[k..2 * k].iter().all(|&v| v == 0));
        assert_eq!(&a.q[2 * k..2 * k + 3], &[0, 7, 0]);
        // 8 bits: amax 127.5 → s = 1, and −127.5 rounds (half to even) to −128, the one code
        // outside ±127 (the kernel's i32 bound allows for it).
        let mut x = gaussian(2 * 256, 3);
        x[5] = -127.5;
        let a = quantize_activations_per_token(&x, 256, 128, 8).expect("valid shape");
        assert_eq!(a.q[5], -128);
        assert_eq!((a.scale.len(), a.sum.len()), (4, 4));
        assert_eq!(a.scale[0], a.scale[1], "one scale per row, repeated per group");
        for (g, qg) in a.q.chunks(128).enumerate() {
            assert_eq!(a.sum[g], qg.iter().map(|&v| i32::from(v)).sum::<i32>());
        }
        assert_eq!(a.packed, kernel_order(&a.q, 256));
        // Refusals.
        assert!(quantize_activations_per_token(&x, 256, 128, 1).is_none());
        assert!(quantize_activations_per_token(&x, 256, 128, 9).is_none());
        assert!(quantize_activations_per_token(&x, 256, 96, 8).is_none());
        assert!(quantize_activations_per_token(&x[..100], 256, 128, 8).is_none());
    }

    #[test]
    fn kernel_is_exact_on_per_token_activations() {
        for (bits, symmetric, m) in [(8, false, 1), (8, true, 3), (4, false, 3), (4, true, 1)] {
            let (n, k, group) = (16, 512, 128);
            let (nibbles, w) = weight(n, k, group, symmetric, 40 + u64::from(bits));
            let dense = dequantized(&w, &nibbles);
            let mut x = gaussian(m * k, 41);
            // The grid's lowest code in the first row (amax (qmax − qmin)/2 → s = 1).
            x[3] = -(((1 << bits) - 1) as f32) / 2.0;
            let a = quantize_activations_per_token(&x, k, group, bits).expect("valid shape");
            let xq: Vec<f64> =
                (0..m * k).map(|i| f64::from(a.q[i]) * f64::from(a.scale[i / group])).collect();
            for lanes in lanes_here() {
                let y = matmul_quantized_on(&[&w], &a, team::default_team, lanes)
                    .and_then(|mut y| y.pop())
                    .expect("runs");
                let what = format!("{lanes:?} W4A{bits} sym {symmetric} m {m}");
                team::assert_matches_f64_reference(&dense, &xq, &y, n, k, m, &what);
            }
            // Activations quantized for another group are refused.
            let other = quantize_activations_per_token(&x, k, 256, bits).expect("valid shape");
            assert!(
                matmul_quantized_on(&[&w], &other, team::default_team, Lanes::Emulated).is_none()
            );
        }
    }

    #[test]
    fn weights_in_one_hand_out_equal_each_alone_bit_for_bit() {
        // Three weights of different heights on the same activations (a range of the hand-out
        // crosses from one into the next), one row and three.
        let k = 512;
        let ws: Vec<Int4Weight> = [(96, 21), (32, 22), (160, 23)]
            .iter()
            .map(|&(n, s)| weight(n, k, 128, true, s).1)
            .collect();
        let refs: Vec<&Int4Weight> = ws.iter().collect();
        for m in [1, 3] {
            let a = quantize_activations(&gaussian(m * k, 24), k, 128).expect("valid shape");
            for lanes in lanes_here() {
                let many = matmul_quantized_on(&refs, &a, team::default_team, lanes).expect("runs");
                let alone = |i| {
                    matmul_quantized_on(&[refs[i]], &a, team::default_team, lanes)
                        .and_then(|mut y| y.pop())
                        .expect("runs")
                };
                team::assert_each_equals_alone(&many, ws.len(), alone, &format!("{lanes:?} m {m}"));
            }
            // One weight quantized for another shape refuses the lot.
            let (_, wide) = weight(32, 1024, 128, false, 25);
            let mixed = [&ws[0], &wide];
            assert!(matmul_quantized_on(&mixed, &a, team::default_team, Lanes::Emulated).is_none());
        }
        assert!(matmul_quantized_on(
            &[],
            &quantize_activations(&gaussian(k, 1), k, 128).expect("shape"),
            team::default_team,
            Lanes::Emulated
        )
        .is_none());
    }

    #[test]
    fn rows_in_pairs_equal_rows_alone_bit_for_bit() {
        // m = 5: two pairs and a last row alone; each row's outputs as if it came alone.
        let (n, k, m) = (16, 512, 5);
        let (_, w) = weight(n, k, 128, false, 13);
        let x = gaussian(m * k, 14);
        for lanes in lanes_here() {
            let all = matmul_q8_on(&w, &x, m, team::default_team, lanes).expect("runs");
            for r in 0..m {
                let row = &x[r * k..(r + 1) * k];
                let alone = matmul_q8_on(&w, row, 1, team::default_team, lanes).expect("runs");
                assert_eq!(&all[r * n..(r + 1) * n], &alone[..], "{lanes:?} row {r}");
            }
        }
    }

    #[test]
    fn avx512_and_emulated_lanes_agree_bit_for_bit() {
        // Runs where the CPU has the features; elsewhere it checks that the AVX-512 path refuses.
        let (_, w) = weight(64, 1024, 256, false, 3);
        let x = gaussian(3 * 1024, 4);
        for m in [1, 3] {
            let emulated = matmul_q8_on(&w, &x[..m * 1024], m, team::default_team, Lanes::Emulated);
            let avx = matmul_q8_on(&w, &x[..m * 1024], m, team::default_team, Lanes::Avx512);
            if available() {
                assert_eq!(avx, emulated, "m = {m}");
            } else {
                assert!(avx.is_none() && emulated.is_some());
            }
        }
    }

    /// ‖y_q8 − y_exact‖ / ‖y_exact‖ against the exact f32 matmul with the unquantized `x`.
    fn relative_error(symmetric: bool) -> f64 {
        let (n, k, group) = (256, 4096, 128);
        let (nibbles, w) = weight(n, k, group, symmetric, 11);
        let dense = dequantized(&w, &nibbles);
        let x = gaussian(k, 12);
        // The AVX-512 lanes where present; the emulated ones (bit-identical, tested above)
        // elsewhere.
        let lanes = *lanes_here().last().expect("one at least");
        let y = matmul_q8_on(&w, &x, 1, team::default_team, lanes).expect("kernel runs");
        let (mut err, mut norm) = (0f64, 0f64);
        for row in 0..n {
            let exact: f64 = (0..k).map(|c| dense[row * k + c] * f64::from(x[c])).sum();
            err += (f64::from(y[row]) - exact).powi(2);
            norm += exact * exact;
        }
        (err / norm).sqrt()
    }

    #[test]
    fn error_against_the_exact_f32_matmul() {
        for symmetric in [true, false] {
            let e = relative_error(symmetric);
            eprintln!("int4_vnni relative error (symmetric {symmetric}): {:.4} %", 100.0 * e);
            assert!(e < MAX_RELATIVE_ERROR, "symmetric {symmetric}: {e}");
            // Not suspiciously small either: the activations really are on the int8 grid.
            assert!(e > 0.001, "symmetric {symmetric}: {e}");
        }
    }

    #[test]
    fn libgomp_and_rayon_teams_give_identical_results() {
        // 64 quads: several ranges, so both teams split the rows between threads.
        let (_, w) = weight(256, 512, 128, false, 5);
        for lanes in lanes_here() {
            for m in [1, 3] {
                let x = gaussian(m * 512, 6);
                let omp = matmul_q8_on(&w, &x, m, team::default_team, lanes).expect("libgomp team");
                let rayon = matmul_q8_on(&w, &x, m, team::rayon_team, lanes).expect("rayon team");
                // Each row is summed by one thread in the same order either way: bit-identical.
                assert_eq!(omp, rayon, "{lanes:?} m = {m}");
            }
        }
    }

    #[test]
    fn bad_requests_are_refused_not_wrapped() {
        let (_, w) = weight(8, 256, 128, false, 9);
        let x = vec![0.25f32; 256];
        for lanes in lanes_here() {
            let run = |x: &[f32], m| matmul_q8_on(&w, x, m, team::default_team, lanes);
            // `m · k` that wraps to the length of `x`.
            let wrapping_m = usize::MAX / 256 + 2;
            assert_eq!(wrapping_m.wrapping_mul(256), 256);
            assert!(run(&x, wrapping_m).is_none());
            assert!(run(&x, 0).is_none());
            assert!(run(&x[..255], 1).is_none());
            assert!(run(&x, 1).is_some());
            // A weight in groups the kernel does not take.
            let small =
                Int4Weight { group: 64, scale: vec![1.0; 32], zero_point: None, ..w.clone() };
            assert!(matmul_q8_on(&small, &x, 1, team::default_team, lanes).is_none());
        }
    }
}
