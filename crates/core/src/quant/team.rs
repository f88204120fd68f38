//! The thread team the crate's own CPU kernels ([`crate::quant::int4_avx512`],
//! [`crate::quant::bf16_own`]) run on, and the one way they share work on it: disjoint ranges of
//! rows handed out through an atomic counter.
//!
//! The team is libtorch's own OpenMP team where the process has GNU OpenMP (libgomp, which the
//! libtorch wheels load): `GOMP_parallel` is the call `#pragma omp parallel` compiles to, so the
//! kernels run on the threads libtorch's operators use (as many as `tch::set_num_threads` says),
//! which are still spinning from the previous operator and start at once. A second pool beside
//! them would compete with those spinning threads for the cores: measured on the 2-core
//! development machine, decode of an 8-layer LLaVA-7B-shaped W4 model took 77 ms with a rayon
//! pool, 58 ms with it once OpenMP's threads stopped spinning (`OMP_WAIT_POLICY=passive`), and
//! 51 ms on libtorch's team. Without libgomp, a rayon pool of one thread per core runs the team.
//!
//! Soundness: no thread number or team size is asked of any OpenMP runtime. A process can hold two
//! (libgomp and LLVM's libomp both export `omp_get_thread_num`), and a number from the wrong one
//! would let two threads write the same rows. Every thread instead takes the next unclaimed range
//! from one atomic counter, so each index is given to exactly one call whatever the team's size.
#![allow(unsafe_code)]

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The SIMD level an own CPU kernel runs at, detected at run time: the best one the CPU has is the
/// default, a lower one can be forced (to test it on a machine that has both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// AVX2 + FMA: 256-bit vectors (most laptops, older servers, some AMD EPYC VMs).
    Avx2,
    /// AVX-512F + AVX-512BW: 512-bit vectors.
    Avx512,
}

impl Isa {
    /// Every level, best first.
    pub const ALL: [Isa; 2] = [Isa::Avx512, Isa::Avx2];

    /// Whether this CPU runs code of this level.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                }
                Isa::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// The best level this CPU has, if any.
    pub fn best() -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.available())
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
        }
    }
}

/// `f()` compiled for SIMD level `isa`, for plain Rust loops the compiler vectorises: `f` (a
/// closure marked `#[inline(always)]`, the functions its loops call inlined too) is inlined into
/// a function with the level's target features, so its loops get that level's registers; with
/// `None`, the default target's (SSE2 on x86-64). Rust never contracts a multiply and an add into
/// an FMA (even where the level has one: AVX-512F implies FMA) nor reorders a float sum, so the
/// operations and their order are the Rust code's at every level: the results are the same bit for
/// bit (tested where it is used).
///
/// Panics when the CPU lacks `isa`.
#[inline(always)]
pub(crate) fn at_isa<R>(isa: Option<Isa>, f: impl FnOnce() -> R) -> R {
    assert!(isa.is_none_or(Isa::available), "{isa:?} is not on this CPU");
    #[cfg(target_arch = "x86_64")]
    {
        /// SAFETY: the CPU has AVX-512F and AVX-512BW.
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        /// SAFETY: the CPU has AVX2.
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match isa {
            // SAFETY: the CPU has the level's features (asserted above).
            Some(Isa::Avx512) => return unsafe { avx512(f) },
            // SAFETY: as above.
            Some(Isa::Avx2) => return unsafe { avx2(f) },
            None => {}
        }
    }
    f()
}

/// Why no own CPU kernel runs here (`None` when one does).
pub fn no_isa_reason() -> Option<String> {
    Isa::best().is_none().then(|| "the CPU has neither AVX-512F + AVX-512BW nor AVX2 + FMA".into())
}

/// A way of running `f` once on every thread of a team, the caller included (libgomp's or
/// rayon's); returns when all are done.
pub(crate) type Team = fn(&(dyn Fn() + Sync));

/// The default team: libgomp's where the process has it, else rayon's.
pub(crate) fn default_team(f: &(dyn Fn() + Sync)) {
    match omp::team() {
        Some(team) => team.run(f),
        None => rayon_team(f),
    }
}

/// The team without libgomp: a rayon pool of one thread per core.
pub(crate) fn rayon_team(f: &(dyn Fn() + Sync)) {
    match rayon_pool() {
        Some(p) if p.current_num_threads() > 1 => p.scope(|s| {
            for _ in 0..p.current_num_threads() {
                s.spawn(move |_| f());
            }
        }),
        _ => f(),
    }
}

/// Whether the process has GNU OpenMP's team (it does wherever libtorch's wheels are linked).
pub fn has_libgomp() -> bool {
    omp::team().is_some()
}

/// Calls `f(range)` on `team` for disjoint ranges that cover `0..items`, each at most `chunk` long
/// (`chunk` ≥ 1): every index goes to exactly one call. Ranges are handed out in ascending order,
/// so a thread streams contiguous memory within a range.
pub(crate) fn for_each_range(
    team: Team,
    items: usize,
    chunk: usize,
    f: &(dyn Fn(Range<usize>) + Sync),
) {
    let chunk = chunk.max(1);
    let next = AtomicUsize::new(0);
    let work = || loop {
        // `fetch_add` past `items` is harmless: the loop stops at the first start ≥ items, and
        // `items + threads · chunk` cannot wrap for any slice length.
        let start = next.fetch_add(chunk, Ordering::Relaxed);
        if start >= items {
            break;
        }
        f(start..items.min(start + chunk));
    };
    team(&work);
}

/// `x Wᵢᵀ` `[m, n_i]` f32 (row-major) for each weight `Wᵢ` of `weights` (`n_i` = `rows_of(Wᵢ)`
/// output rows), all on the same activations `x`, from a kernel that computes `quad` weight rows
/// at a time: `rows(Wᵢ, first, count, out)` fills `out` `[quad · count, m]` (each weight row's `m`
/// outputs together) for quads `first..first + count` of `Wᵢ`. The weights' quads are one
/// sequence handed to `on`'s threads in ranges of at least `min_chunk` quads (long enough a
/// stream for a prefetch to run ahead; a range is cut into one call per weight it covers), each result transposed at the end. With several weights (a layer's q, k and v
/// projections; its gate and up) the team is started and drained once for all of them rather
/// than once each; every output is computed by the same call on the same quad either way, so the
/// results are those of one hand-out per weight, bit for bit. `None` when a size overflows.
pub(crate) fn quads_matmul_many<W: Sync>(
    on: Team,
    weights: &[&W],
    rows_of: impl Fn(&W) -> usize,
    m: usize,
    quad: usize,
    min_chunk: usize,
    rows: impl Fn(&W, usize, usize, &mut [f32]) + Sync,
) -> Option<Vec<Vec<f32>>> {
    // Where each weight's quads start in the sequence, and its rows in the output buffer.
    let (mut first_quad, mut first_row) = (Vec::with_capacity(weights.len() + 1), Vec::new());
    let (mut quads, mut total_rows) = (0usize, 0usize);
    for &w in weights {
        first_quad.push(quads);
        first_row.push(total_rows);
        quads = quads.checked_add(rows_of(w) / quad)?;
        total_rows = total_rows.checked_add(rows_of(w))?;
    }
    first_quad.push(quads);
    first_row.push(total_rows);
    let mut y_t = vec![0f32; total_rows.checked_mul(m)?];
    let out = SharedOut::new(&mut y_t);
    for_each_range(on, quads, chunk_for(quads, min_chunk), &|r| {
        let mut at = r.start;
        while at < r.end {
            // The weight quad `at` belongs to, and the end of this range within it.
            let p = first_quad.partition_point(|&start| start <= at) - 1;
            let end = r.end.min(first_quad[p + 1]);
            let (local, count) = (at - first_quad[p], end - at);
            let row = first_row[p] + local * quad;
            // SAFETY: `for_each_range` gives every quad to one range only, and quad `q` of weight
            // `p` owns rows `first_row[p] + q · quad ..` of `y_t` (`n_p` ≥ its quads · `quad`
            // rows), so the rows written here are this call's alone; they end at or before
            // `first_row[p + 1] · m` ≤ the buffer's length.
            let part = unsafe { out.range(row * m..(row + count * quad) * m) };
            rows(weights[p], local, count, part);
            at = end;
        }
    });
    let mut ys = Vec::with_capacity(weights.len());
    for (p, &w) in weights.iter().enumerate().rev() {
        let mine = y_t.split_off(first_row[p] * m);
        ys.push(if m == 1 { mine } else { transposed(&mine, rows_of(w), m) });
    }
    ys.reverse();
    Some(ys)
}

/// `y_t` `[n, m]` as `[m, n]`.
fn transposed(y_t: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut y = vec![0f32; y_t.len()];
    for row in 0..n {
        for r in 0..m {
            y[r * n + row] = y_t[row * m + r];
        }
    }
    y
}

/// A chunk size for `items` rows: about four ranges per libtorch thread (a thread that finishes
/// early takes another), never below `min`.
pub(crate) fn chunk_for(items: usize, min: usize) -> usize {
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1);
    items.div_ceil(4 * threads).max(min).max(1)
}

/// How far ahead of the current block a thread prefetches its own stream into L1 (bytes), for the
/// AVX2 kernels (int4 and bf16) and the read roof; every AVX-512 kernel used it too until
/// [`prefetch_stream`] replaced it there (2026-12-05). Two sweeps: on the Intel Xeon development machine (2-thread GEMV over
/// 512 MiB of codes, 4096 × 4096 blocks) 512 → 13.2 GB/s, 1024 → 14.6, 3072 → 17.6, 6144 → 18.2,
/// 8192 → 15.9; on the AMD EPYC with AVX-512 VNNI (2026-12-02, `examples/stream_probe`: the
/// kernels over ~1.1 GiB of LLaVA-7B-shaped weights, median % of the paired read roof over 7–9
/// rounds; the machine's bandwidth moved by ±30 % between seconds, so only medians of repeated
/// runs are compared) 4096 → VNNI 69–82 %, exact f32 75–81 %, bf16 90–95 %; 6144 → 85–86 %,
/// 71–85 %, 91–92 %; 8192 → 86–89 %, 81–87 %, 80–96 %; 16384 → 82 %, 82 %, 87 %.
pub const PREFETCH_BYTES: usize = 6144;

/// How far ahead [`prefetch_stream`] asks for a line into L2 (`prefetcht1`).
pub const PREFETCH_FAR_BYTES: usize = 16384;
/// How far ahead [`prefetch_stream`] asks for the same line again into L1 (`prefetcht0`).
pub const PREFETCH_NEAR_BYTES: usize = 4096;

/// The software prefetch of the AVX-512 kernels (the VNNI kernel [`crate::quant::int4_vnni`],
/// the exact int4 kernel [`crate::quant::int4_avx512`], the bf16 kernel
/// [`crate::quant::bf16_own`]): each line of the stream is asked for twice, into L2
/// [`PREFETCH_FAR_BYTES`] ahead (`prefetcht1`) and into L1 [`PREFETCH_NEAR_BYTES`] ahead
/// (`prefetcht0`), where the AVX2 kernels and the read roof ask once, into L1,
/// [`PREFETCH_BYTES`] ahead. Why: one core of the AMD EPYC with AVX-512 VNNI (2026-12-05,
/// `examples/stream_probe 3 1`, one thread, ~1.1 GiB, median % of the paired read roof over 3
/// rounds, variants alternated within each round) streamed with T0 at 6144 bytes: bf16 63–65 %,
/// VNNI q8 76–81 %; T1 at 12288: 65 %, 82–87 %; T1 at 16384 + T0 at 4096: 72–74 %, 81–85 %; and
/// on both cores (4 rounds; the machine's read roof switched between ~36 and ~55 GB/s between
/// rows) T0 6144: bf16 82 % (63–83), q8 88 % (68–89); T1 16384 + T0 4096: 88 % (73–93), 92 %
/// (80–95) — the rounds at the high roof gained most (bf16 63 → 78 %, q8 68 → 80 %). The read
/// roof itself stays on one T0 prefetch: it read 34–42 GB/s with the two-level prefetch against
/// 36–56 with one, and a roof must be the fastest read known. A kernel whose loop does more work
/// per line than the roof's sum keeps fewer demand loads in flight, so it leans on its prefetches
/// more: the far one starts the DRAM transfer early without holding one of L1's few miss buffers
/// for the whole trip. The exact int4 kernel, compute-bound on that machine (31.7 GB/s from L3 on
/// both cores), gained too: 70–72 % → 75–80 % of the roof on both cores (4 rounds each), 44 → 47 %
/// on one. The AVX2 kernels were not measured with it (no AVX2-only machine at hand) and keep the
/// single prefetch.
/// Any `p` is fine: the addresses are formed with wrapping arithmetic and a prefetch is a hint
/// that never faults.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_stream(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    // SAFETY: `prefetcht0/1` are SSE (baseline on x86-64) and never fault.
    unsafe {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH_FAR_BYTES) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_NEAR_BYTES) as *const i8);
    }
}

/// How a streaming read asks for its lines ahead of use. The read roof times every variant and
/// keeps the fastest: which one is fastest differs between CPUs. Measured (`examples/stream_probe`,
/// 2 threads, 1 GiB): the AMD EPYC with AVX-512 VNNI (2026-12-05) read 36–56 GB/s with
/// [`ReadPrefetch::L1`] against 34–42 with [`ReadPrefetch::TwoLevel`]; on the Intel Xeon with
/// AVX512-BF16 and AMX (2026-12-05, 2 cores, 480 MiB L3) the roof read with `L1` alone was
/// 27.1–27.8 GB/s while the own bf16 kernel, which prefetches two-level, streamed 30.9–31.2 GB/s
/// (111–114 % of that roof) — so a roof on one variant is not a roof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPrefetch {
    /// No software prefetch: the hardware prefetchers alone.
    None,
    /// One `prefetcht0` [`PREFETCH_BYTES`] ahead (the AVX2 kernels' scheme).
    L1,
    /// [`prefetch_stream`]'s: `prefetcht1` [`PREFETCH_FAR_BYTES`] and `prefetcht0`
    /// [`PREFETCH_NEAR_BYTES`] ahead (the AVX-512 kernels' scheme).
    TwoLevel,
    /// [`ReadPrefetch::TwoLevel`]'s prefetch, each line also consumed the way the own bf16
    /// kernel consumes its weights (a shift, a mask and two FMAs per 64-byte line into eight f32
    /// accumulators) beside the integer sum. A read that does a little work per line streamed
    /// faster than the bare sum on the Intel Xeon with AVX512-BF16 (2026-12-06,
    /// `examples/stream_probe`, 2 threads, 1 GiB, variants alternated within each round): this
    /// loop 31.1–32.5 GB/s against 28.9–30.2 for [`ReadPrefetch::TwoLevel`] (3 rounds; a
    /// prototype without the integer sum 32.5–33.1 against 30.0–30.5 in 4), where the own bf16
    /// kernel had read 101–107 % of the bare-sum roof that morning. Other paces, 2 rounds each
    /// over the bare sum: one float add per line +1.0–1.1 GB/s, four to eight FMAs per line
    /// 0–1.3, two (this one) +1.3–2.2. Without AVX-512 it is [`ReadPrefetch::TwoLevel`]'s loop.
    TwoLevelPaced,
}

impl ReadPrefetch {
    pub const ALL: [ReadPrefetch; 4] =
        [ReadPrefetch::None, ReadPrefetch::L1, ReadPrefetch::TwoLevel, ReadPrefetch::TwoLevelPaced];

    pub fn name(self) -> &'static str {
        match self {
            ReadPrefetch::None => "none",
            ReadPrefetch::L1 => "L1",
            ReadPrefetch::TwoLevel => "L2+L1",
            ReadPrefetch::TwoLevelPaced => "L2+L1 paced",
        }
    }
}

/// The memory roof a decode kernel can reach: bytes per second of a pure streaming read (a
/// vectorised sum of a `bytes`-long buffer, far above the last-level cache) by the kernels' own
/// team, the best over `repeats` rounds of every [`ReadPrefetch`] variant (alternated within each
/// round, so drift reaches them alike) after one untimed pass that touches the pages. Nothing is
/// written back, so no cache line is read for ownership: this is the rate at which a GEMV's
/// weights can arrive, which a copy (read + write) and a libtorch GEMV (compute-bound on some
/// CPUs) are not.
pub fn read_bandwidth(bytes: usize, repeats: usize) -> f64 {
    ReadRoof::new(bytes).read(repeats)
}

/// [`read_bandwidth`] per [`ReadPrefetch`] variant: `(variant, bytes per second)`, best of
/// `repeats` each.
pub fn read_bandwidth_by_prefetch(bytes: usize, repeats: usize) -> Vec<(ReadPrefetch, f64)> {
    ReadRoof::new(bytes).by_prefetch(repeats)
}

/// A streaming-read roof that is read again and again from one buffer, allocated and touched
/// once: the bench reads it right after every decode step (`measure.roof_each_step_mib`), where
/// [`read_bandwidth`] would allocate and fill its buffer for every read.
pub struct ReadRoof {
    buf: Vec<u64>,
}

impl ReadRoof {
    /// A buffer of `bytes` (at least one word), filled, then read once untimed. Aborts when the
    /// memory is not there, like any allocation; [`ReadRoof::try_new`] does not.
    pub fn new(bytes: usize) -> Self {
        match Self::try_new(bytes) {
            Ok(roof) => roof,
            Err(e) => panic!("the roof's buffer of {bytes} bytes: {e}"),
        }
    }

    /// [`ReadRoof::new`], or an error when the buffer cannot be allocated.
    pub fn try_new(bytes: usize) -> Result<Self, std::collections::TryReserveError> {
        let words = (bytes / 8).max(1);
        let mut buf = Vec::new();
        buf.try_reserve_exact(words)?;
        buf.extend(0..words as u64);
        let roof = Self { buf };
        roof.pass(ReadPrefetch::L1);
        Ok(roof)
    }

    /// The buffer's length in bytes.
    pub fn bytes(&self) -> usize {
        self.buf.len() * 8
    }

    /// One read of the whole buffer on the kernels' team, `prefetch`'s way.
    fn pass(&self, prefetch: ReadPrefetch) {
        // 1 MiB per range: long enough for the hardware prefetcher, many ranges per thread.
        let chunk = (1 << 20) / 8;
        let total = std::sync::atomic::AtomicU64::new(0);
        for_each_range(default_team, self.buf.len(), chunk, &|r| {
            total.fetch_add(sum_words(&self.buf[r], prefetch), Ordering::Relaxed);
        });
        std::hint::black_box(total.into_inner());
    }

    /// Bytes per second per [`ReadPrefetch`] variant, best of `repeats` reads each (the variants
    /// alternated within each repeat, so drift reaches them alike).
    pub fn by_prefetch(&self, repeats: usize) -> Vec<(ReadPrefetch, f64)> {
        let mut best = [f64::INFINITY; ReadPrefetch::ALL.len()];
        for _ in 0..repeats.max(1) {
            for (k, &prefetch) in ReadPrefetch::ALL.iter().enumerate() {
                let t = std::time::Instant::now();
                self.pass(prefetch);
                best[k] = best[k].min(t.elapsed().as_secs_f64());
            }
        }
        ReadPrefetch::ALL.iter().zip(best).map(|(&p, t)| (p, self.bytes() as f64 / t)).collect()
    }

    /// The fastest of [`ReadRoof::by_prefetch`]: the roof, bytes per second.
    pub fn read(&self, repeats: usize) -> f64 {
        self.by_prefetch(repeats).iter().map(|&(_, bw)| bw).fold(0.0, f64::max)
    }
}

/// Wrapping sum of `v` at the kernels' SIMD level, read the way the kernels read their weights:
/// four independent vector accumulators and `prefetch`'s software prefetch. A roof must be the
/// fastest pure read known on the machine, or a kernel can exceed it: measured on the AMD EPYC
/// with AVX-512 VNNI (2 cores, 2026-12-02, 1 GiB, best of 5, alternated), the
/// compiler-vectorised fold without prefetch read 36–44 GB/s and this loop (one `L1` prefetch)
/// 45–48 GB/s, while the VNNI kernel alone streamed its codes at 42–44 GB/s (103 % of the old
/// roof). An older note: the default target has only SSE2, whose 16-byte loads fell short (AMD
/// EPYC with AVX2: 14.6–18.1 GB/s).
fn sum_words(v: &[u64], prefetch: ReadPrefetch) -> u64 {
    // SAFETY: `Isa::best` is a level the CPU has (detected).
    unsafe { sum_words_at(Isa::best(), v, prefetch) }
}

/// [`sum_words`] at SIMD level `isa` (`None`: scalar).
///
/// SAFETY: the CPU has `isa`; the functions only read `v`.
unsafe fn sum_words_at(isa: Option<Isa>, v: &[u64], prefetch: ReadPrefetch) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use stream_sum::{avx2, avx512};
        const NONE: u8 = ReadPrefetch::None as u8;
        const L1: u8 = ReadPrefetch::L1 as u8;
        const TWO: u8 = ReadPrefetch::TwoLevel as u8;
        const PACED: u8 = ReadPrefetch::TwoLevelPaced as u8;
        match (isa, prefetch) {
            (Some(Isa::Avx512), ReadPrefetch::None) => return avx512::<NONE>(v),
            (Some(Isa::Avx512), ReadPrefetch::L1) => return avx512::<L1>(v),
            (Some(Isa::Avx512), ReadPrefetch::TwoLevel) => return avx512::<TWO>(v),
            (Some(Isa::Avx512), ReadPrefetch::TwoLevelPaced) => return avx512::<PACED>(v),
            (Some(Isa::Avx2), ReadPrefetch::None) => return avx2::<NONE>(v),
            (Some(Isa::Avx2), ReadPrefetch::L1) => return avx2::<L1>(v),
            (Some(Isa::Avx2), ReadPrefetch::TwoLevel | ReadPrefetch::TwoLevelPaced) => {
                return avx2::<TWO>(v)
            }
            (None, _) => {}
        }
    }
    let _ = (isa, prefetch);
    v.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

#[cfg(target_arch = "x86_64")]
mod stream_sum {
    use std::arch::x86_64::*;

    use super::{prefetch_stream, ReadPrefetch, PREFETCH_BYTES};

    /// The prefetches for the 64-byte line at `line` ([`ReadPrefetch`] as its `u8`).
    #[inline(always)]
    fn ask<const PREFETCH: u8>(line: *const i8) {
        // SAFETY: `prefetcht0/1` are SSE (baseline on x86-64) and never fault; the addresses are
        // formed with wrapping arithmetic.
        unsafe {
            if PREFETCH == ReadPrefetch::L1 as u8 {
                _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(PREFETCH_BYTES));
            } else if PREFETCH == ReadPrefetch::TwoLevel as u8
                || PREFETCH == ReadPrefetch::TwoLevelPaced as u8
            {
                // The AVX-512 kernels' own call: the roof reads exactly as they do.
                prefetch_stream(line as *const u8);
            }
        }
    }

    /// Four 64-byte lines per step into four accumulators, each line's prefetches asked for.
    ///
    /// SAFETY: AVX-512F; reads `v` only (prefetches past its end are hints, never faults).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512<const PREFETCH: u8>(v: &[u64]) -> u64 {
        const STEP: usize = 32;
        let p = v.as_ptr();
        let mut acc = [_mm512_setzero_si512(); 4];
        // The paced variant's bf16-kernel work (`TwoLevelPaced`): even and odd halves FMA'd.
        let (high, one) = (_mm512_set1_epi32(0xffff_0000u32 as i32), _mm512_set1_ps(1.0));
        let mut even = [_mm512_setzero_ps(); 4];
        let mut odd = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + STEP <= v.len() {
            for (j, a) in acc.iter_mut().enumerate() {
                let line = p.add(i + 8 * j);
                ask::<PREFETCH>(line as *const i8);
                let w = _mm512_loadu_si512(line as *const __m512i);
                *a = _mm512_add_epi64(*a, w);
                if PREFETCH == ReadPrefetch::TwoLevelPaced as u8 {
                    let we = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
                    let wo = _mm512_castsi512_ps(_mm512_and_si512(w, high));
                    even[j] = _mm512_fmadd_ps(we, one, even[j]);
                    odd[j] = _mm512_fmadd_ps(wo, one, odd[j]);
                }
            }
            i += STEP;
        }
        if PREFETCH == ReadPrefetch::TwoLevelPaced as u8 {
            let f = even.iter().chain(&odd).fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
            std::hint::black_box(_mm512_reduce_add_ps(f));
        }
        let sum =
            _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
        let tail = v[i..].iter().fold(0u64, |a, &b| a.wrapping_add(b));
        (_mm512_reduce_add_epi64(sum) as u64).wrapping_add(tail)
    }

    /// As [`avx512`] on 32-byte halves: eight accumulators, two per line.
    ///
    /// SAFETY: AVX2; reads `v` only.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2<const PREFETCH: u8>(v: &[u64]) -> u64 {
        const STEP: usize = 32;
        let p = v.as_ptr();
        let mut acc = [_mm256_setzero_si256(); 8];
        let mut i = 0;
        while i + STEP <= v.len() {
            for line in 0..4 {
                ask::<PREFETCH>(p.add(i + 8 * line) as *const i8);
            }
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_epi64(*a, _mm256_loadu_si256(p.add(i + 4 * j) as *const __m256i));
            }
            i += STEP;
        }
        let mut lanes = [0u64; 4];
        let sum = acc.iter().fold(_mm256_setzero_si256(), |s, &a| _mm256_add_epi64(s, a));
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sum);
        lanes.iter().chain(&v[i..]).fold(0u64, |a, &b| a.wrapping_add(b))
    }
}

fn rayon_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("qvlm-kernel-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// GNU OpenMP's team entry point, looked up in the running process (never loaded by us).
#[cfg(unix)]
mod omp {
    use std::ffi::{c_uint, c_void};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    type Body = extern "C" fn(*mut c_void);
    type Parallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);

    pub struct Team {
        parallel: Parallel,
    }

    struct Job<'a> {
        f: &'a (dyn Fn() + Sync),
        panicked: AtomicBool,
    }

    /// The process's libgomp, if it has one.
    pub fn team() -> Option<&'static Team> {
        static TEAM: OnceLock<Option<Team>> = OnceLock::new();
        TEAM.get_or_init(|| {
            // SAFETY: `dlsym` with RTLD_DEFAULT only reads the loaded objects' symbol tables.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr()) };
            if p.is_null() {
                return None;
            }
            // SAFETY: the libgomp ABI of this symbol (GOMP_4.0): `void GOMP_parallel(void
            // (*)(void *), void *, unsigned, unsigned)`.
            Some(Team { parallel: unsafe { std::mem::transmute::<*mut c_void, Parallel>(p) } })
        })
        .as_ref()
    }

    extern "C" fn body(data: *mut c_void) {
        // SAFETY: `data` is the `Job` that `run` keeps alive until `GOMP_parallel` returns.
        let job = unsafe { &*(data as *const Job) };
        // A panic must not unwind through C frames: it is recorded and re-raised by the caller.
        if catch_unwind(AssertUnwindSafe(|| (job.f)())).is_err() {
            job.panicked.store(true, Ordering::Relaxed);
        }
    }

    impl Team {
        pub fn run(&self, f: &(dyn Fn() + Sync)) {
            let job = Job { f, panicked: AtomicBool::new(false) };
            // SAFETY: `body` matches GOMP's outlined-function signature; `job` outlives the call
            // (GOMP_parallel returns after every thread finished). 0 threads: OpenMP's current
            // team size; flags 0: no proc_bind.
            unsafe { (self.parallel)(body, &job as *const Job as *mut c_void, 0, 0) };
            assert!(!job.panicked.load(Ordering::Relaxed), "a kernel panicked on a team thread");
        }
    }
}

/// Without `dlsym` (non-Unix targets) there is no libgomp to find: the rayon team runs.
#[cfg(not(unix))]
mod omp {
    pub struct Team;

    impl Team {
        pub fn run(&self, f: &(dyn Fn() + Sync)) {
            f()
        }
    }

    pub fn team() -> Option<&'static Team> {
        None
    }
}

/// A buffer the team's ranges write into, each range its own disjoint part.
struct SharedOut<T>(*mut T, usize);
// SAFETY: the only access is `SharedOut::range`, whose callers hold disjoint ranges (handed out by
// `for_each_range`), and the buffer outlives the team.
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    fn new(buf: &mut [T]) -> Self {
        Self(buf.as_mut_ptr(), buf.len())
    }

    /// Elements `range` of the buffer.
    ///
    /// SAFETY: no other live slice overlaps `range` (the caller's range came from
    /// `for_each_range`, scaled by a constant stride).
    // A `&mut` from `&self` is the point: disjointness is the caller's contract above.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.1, "range outside the buffer");
        std::slice::from_raw_parts_mut(self.0.add(range.start), range.end - range.start)
    }
}

/// The own kernels' shared test check of a hand-out of several weights
/// ([`quads_matmul_many`]): `many` holds one output per weight, each the same bits as
/// `alone(i)`, weight `i` multiplied on its own. `what` names the case in a failure.
#[cfg(test)]
pub(crate) fn assert_each_equals_alone(
    many: &[Vec<f32>],
    weights: usize,
    alone: impl Fn(usize) -> Vec<f32>,
    what: &str,
) {
    assert_eq!(many.len(), weights, "{what}: one output per weight");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (i, got) in many.iter().enumerate() {
        assert_eq!(bits(got), bits(&alone(i)), "{what}: weight {i}");
    }
}

/// The own kernels' shared test check: `y` `[m, n]` (f32, row-major) against `x Wᵀ` computed in
/// f64 from `dense` `[n, k]` and `x` `[m, k]`, within 1e-6 of the sum of the terms' magnitudes (f32
/// accumulation in another order: a few ulps of that sum). `what` names the case in a failure.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn assert_matches_f64_reference(
    dense: &[f64],
    x: &[f64],
    y: &[f32],
    n: usize,
    k: usize,
    m: usize,
    what: &str,
) {
    for r in 0..m {
        for row in 0..n {
            let terms = (0..k).map(|c| dense[row * k + c] * x[r * k + c]);
            let exact: f64 = terms.clone().sum();
            let magnitude: f64 = terms.map(f64::abs).sum();
            let got = f64::from(y[r * n + row]);
            assert!(
                (got - exact).abs() <= 1e-6 * magnitude,
                "{what} m{m} row {row}: {got} vs {exact}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_index_goes_to_exactly_one_range_on_both_teams() {
        for team in [default_team as Team, rayon_team] {
            for (items, chunk) in [(0, 3), (1, 1), (10, 3), (1000, 7), (64, 64), (5, 100)] {
                let seen = Mutex::new(vec![0u32; items]);
                for_each_range(team, items, chunk, &|r| {
                    assert!(r.len() <= chunk && !r.is_empty());
                    let mut s = seen.lock().expect("lock");
                    for i in r {
                        s[i] += 1;
                    }
                });
                assert!(
                    seen.into_inner().expect("lock").iter().all(|&c| c == 1),
                    "{items}/{chunk}"
                );
            }
        }
    }

    #[test]
    fn the_read_roof_is_a_plausible_rate_and_the_sum_is_exact() {
        let words: Vec<u64> = (0..100_003u64).collect();
        for prefetch in ReadPrefetch::ALL {
            assert_eq!(sum_words(&words, prefetch), 100_003 * 100_002 / 2, "{prefetch:?}");
        }
        // Scalar and both SIMD levels where the CPU has them, every prefetch variant, on lengths
        // around their 32-word step, and wrapping past u64::MAX.
        #[cfg(target_arch = "x86_64")]
        for len in [0usize, 1, 31, 32, 33, 95, 1000] {
            let v: Vec<u64> = (0..len as u64).map(|i| u64::MAX - i).collect();
            let want = v.iter().fold(0u64, |a, &b| a.wrapping_add(b));
            let levels = Isa::ALL.into_iter().filter(|i| i.available()).map(Some);
            for isa in std::iter::once(None).chain(levels) {
                for prefetch in ReadPrefetch::ALL {
                    // SAFETY: the CPU has `isa` (checked; `None` is scalar).
                    let got = unsafe { sum_words_at(isa, &v, prefetch) };
                    assert_eq!(got, want, "{isa:?} {prefetch:?}, {len}");
                }
            }
        }
        // 64 MiB: a real memory system streams it at well over 100 MB/s and below 10 TB/s, and the
        // roof is the best of its variants.
        let by_prefetch = read_bandwidth_by_prefetch(64 << 20, 2);
        assert_eq!(
            by_prefetch.iter().map(|&(p, _)| p).collect::<Vec<_>>(),
            ReadPrefetch::ALL.to_vec()
        );
        for &(prefetch, bw) in &by_prefetch {
            assert!((1e8..1e13).contains(&bw), "{prefetch:?}: {bw} B/s");
        }
        let roof = read_bandwidth(64 << 20, 2);
        assert!((1e8..1e13).contains(&roof), "{roof} B/s");
        // One buffer read again and again (the bench's roof after every step).
        let reader = ReadRoof::new(64 << 20);
        assert_eq!(reader.bytes(), 64 << 20);
        for _ in 0..3 {
            let roof = reader.read(1);
            assert!((1e8..1e13).contains(&roof), "{roof} B/s");
        }
        assert_eq!(ReadRoof::new(3).bytes(), 8, "at least one word");
        assert!(ReadRoof::try_new(usize::MAX).is_err(), "an impossible buffer is an error");
    }

    #[test]
    fn the_test_process_has_libgomp() {
        // The test binary links libtorch, which loads libgomp: the default team is OpenMP's.
        #[cfg(target_os = "linux")]
        assert!(has_libgomp(), "libgomp not found in a process that links libtorch");
    }
}
