//! This crate's own W4A16 matmul for AVX-512 CPUs: 4-bit codes in a register-friendly layout,
//! dequantized through a 16-entry lookup table held in one register and multiplied in f32.
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
//! low 4 bits (a lane shift or a byte shift, see `nibble`), `vpermps` with that as indices into the row's current lookup table (`vpermps` reads only the
//! low 4 bits of each index), `vfmadd` with 16 activations. The table of a group is
//! `(c − (zero_point − qmin)) · scale` for `c` = 0..16, in f32 — the same values
//! [`crate::quant::packed::PackedWeight::dequantize`] computes, so only the summation order
//! differs from a dequantized f32 matmul. Each thread streams a contiguous range of quads with a
//! software prefetch [`PREFETCH_BYTES`] ahead (measured on a prototype of this loop: 4.7 → 11.4
//! GB/s on one core of the development machine, where the hardware prefetcher alone leaves the
//! core waiting on memory). The threads are libtorch's OpenMP team (see `parallel`).
//!
//! More than one row of activations (prefill): each quad is dequantized once into a scratch row
//! of f32 and multiplied with every activation row from there.
//!
//! This is the workspace's only `unsafe` code: the AVX-512 intrinsics and their unaligned loads
//! (every load's range is checked against the slice lengths before the unchecked loop starts),
//! and the calls into libgomp found with `dlsym`.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// Inputs per 64-byte block of one row.
pub const BLOCK: usize = 128;
/// Rows per quad.
pub const QUAD: usize = 4;
/// How far ahead of the current block a thread prefetches its own stream (bytes). Chosen by a
/// sweep on the development machine (2-thread GEMV over 512 MiB of codes, 4096 × 4096 blocks):
/// 512 → 13.2 GB/s, 1024 → 14.6, 3072 → 17.6, 6144 → 18.2, 8192 → 15.9.
pub const PREFETCH_BYTES: usize = 4096;

/// Why this kernel cannot take a weight `[n, k]` in groups of `group`, if it cannot.
pub fn unsupported(n: usize, k: usize, group: usize) -> Option<String> {
    if !available() {
        return Some("the CPU has no AVX-512F + AVX-512BW".into());
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

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f(thread, threads)` on every thread of a team, the caller included; returns when all are done.
///
/// The team is libtorch's own OpenMP team where the process has GNU OpenMP (libgomp, which the
/// libtorch wheels load): `GOMP_parallel` is the call `#pragma omp parallel` compiles to, so the
/// kernel runs on the threads libtorch's operators use (as many as `tch::set_num_threads` says),
/// which are still spinning from the previous operator and start at once. A second pool beside
/// them would compete with those spinning threads for the cores: measured on the 2-core
/// development machine, decode of an 8-layer LLaVA-7B-shaped W4 model took 77 ms with a rayon
/// pool, 58 ms with it once OpenMP's threads stopped spinning (`OMP_WAIT_POLICY=passive`), and
/// 51 ms on libtorch's team. Without libgomp, a rayon pool of one thread per core runs the team.
fn parallel(f: &(dyn Fn(usize, usize) + Sync)) {
    match omp::team() {
        Some(team) => team.run(f),
        None => parallel_rayon(f),
    }
}

/// The team without libgomp: a rayon pool of one thread per core.
fn parallel_rayon(f: &(dyn Fn(usize, usize) + Sync)) {
    match rayon_pool() {
        Some(p) if p.current_num_threads() > 1 => {
            let threads = p.current_num_threads();
            p.scope(|s| {
                for t in 0..threads {
                    s.spawn(move |_| f(t, threads));
                }
            })
        }
        _ => f(0, 1),
    }
}

/// A way of running a team (libgomp's or rayon's).
type Parallel = fn(&(dyn Fn(usize, usize) + Sync));

fn rayon_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("qvlm-int4-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// GNU OpenMP's team entry points, looked up in the running process (never loaded by us).
#[cfg(unix)]
mod omp {
    use std::ffi::{c_int, c_uint, c_void, CStr};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    type Body = extern "C" fn(*mut c_void);
    type Parallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
    type Query = unsafe extern "C" fn() -> c_int;

    pub struct Team {
        parallel: Parallel,
        thread_num: Query,
        num_threads: Query,
    }

    struct Job<'a> {
        f: &'a (dyn Fn(usize, usize) + Sync),
        team: &'a Team,
        panicked: AtomicBool,
    }

    /// The process's libgomp, if it has one.
    pub fn team() -> Option<&'static Team> {
        static TEAM: OnceLock<Option<Team>> = OnceLock::new();
        TEAM.get_or_init(|| {
            let find = |name: &CStr| {
                // SAFETY: `dlsym` with RTLD_DEFAULT only reads the loaded objects' symbol tables.
                let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                (!p.is_null()).then_some(p)
            };
            let parallel = find(c"GOMP_parallel")?;
            let thread_num = find(c"omp_get_thread_num")?;
            let num_threads = find(c"omp_get_num_threads")?;
            // SAFETY: the libgomp ABI of these symbols (GOMP_4.0 / OMP_1.0): `void
            // GOMP_parallel(void (*)(void *), void *, unsigned, unsigned)`, `int (void)`.
            unsafe {
                Some(Team {
                    parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
                    thread_num: std::mem::transmute::<*mut c_void, Query>(thread_num),
                    num_threads: std::mem::transmute::<*mut c_void, Query>(num_threads),
                })
            }
        })
        .as_ref()
    }

    extern "C" fn body(data: *mut c_void) {
        // SAFETY: `data` is the `Job` that `run` keeps alive until `GOMP_parallel` returns.
        let job = unsafe { &*(data as *const Job) };
        // SAFETY: called inside the parallel region, as the OpenMP API allows.
        let (t, n) = unsafe { ((job.team.thread_num)(), (job.team.num_threads)()) };
        // A panic must not unwind through C frames: it is recorded and re-raised by the caller.
        if catch_unwind(AssertUnwindSafe(|| (job.f)(t.max(0) as usize, n.max(1) as usize))).is_err()
        {
            job.panicked.store(true, Ordering::Relaxed);
        }
    }

    impl Team {
        pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
            let job = Job { f, team: self, panicked: AtomicBool::new(false) };
            // SAFETY: `body` matches GOMP's outlined-function signature; `job` outlives the call
            // (GOMP_parallel returns after every thread finished). 0 threads: OpenMP's current
            // team size; flags 0: no proc_bind.
            unsafe { (self.parallel)(body, &job as *const Job as *mut c_void, 0, 0) };
            assert!(!job.panicked.load(Ordering::Relaxed), "own int4 kernel panicked on a thread");
        }
    }
}

/// Without `dlsym` (non-Unix targets) there is no libgomp to find: the rayon team runs.
#[cfg(not(unix))]
mod omp {
    pub struct Team;

    impl Team {
        pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
            f(0, 1)
        }
    }

    pub fn team() -> Option<&'static Team> {
        None
    }
}

/// Rows of the output shared by the team: each thread writes only its own rows.
struct SharedOut(*mut f32);
// SAFETY: threads write disjoint ranges (see `Int4Weight::matmul`), and the buffer outlives them.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// A 4-bit weight `[n, k]` with one f32 scale and one zero point per `group` inputs of a row, in
/// the kernel's layout. It is the only copy of the codes: [`Int4Weight::nibbles`] gives back
/// the portable storage order.
#[derive(Debug, Clone)]
pub struct Int4Weight {
    n: usize,
    k: usize,
    group: usize,
    /// `[n/4, k/128, 4, 16]` u32, 8 codes per word.
    words: Vec<u32>,
    /// `[n, k/group]` f32.
    scale: Vec<f32>,
    /// `[n, k/group]` u8 (asymmetric grids); `None`: symmetric, zero points 0.
    zero_point: Option<Vec<u8>>,
    /// The grid's lowest integer (`c = q − qmin`).
    qmin: i32,
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
        if unsupported(n, k, group).is_some()
            || nibbles.len() != n * k / 2
            || scale.len() != n * (k / group)
            || zero_point.as_ref().is_some_and(|z| z.len() != scale.len())
        {
            return None;
        }
        let blocks = k / BLOCK;
        let mut words = vec![0u32; n * k / 8];
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
        Some(Self { n, k, group, words, scale, zero_point, qmin })
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
        self.matmul_on(x, m, parallel)
    }

    fn matmul_on(&self, x: &[f32], m: usize, parallel: Parallel) -> Option<Vec<f32>> {
        if !available() || m == 0 || x.len() != m * self.k {
            return None;
        }
        let quads = self.n / QUAD;
        // Rows are split between threads; each writes `[its rows, m]`, transposed at the end.
        let mut y_t = vec![0f32; self.n * m];
        let out = SharedOut(y_t.as_mut_ptr());
        let work = |t: usize, threads: usize| {
            let (first, end) = (quads * t / threads, quads * (t + 1) / threads);
            if first < end {
                let len = (end - first) * QUAD * m;
                // SAFETY: thread `t` alone writes quads `first..end`, inside `y_t`.
                let rows = unsafe { std::slice::from_raw_parts_mut(out.at(first * QUAD * m), len) };
                self.rows(x, m, first, end - first, rows);
            }
        };
        parallel(&work);
        if m == 1 {
            return Some(y_t);
        }
        let mut y = vec![0f32; m * self.n];
        for row in 0..self.n {
            for r in 0..m {
                y[r * self.n + row] = y_t[row * m + r];
            }
        }
        Some(y)
    }

    /// Rows `4·first .. 4·(first + count)` dequantized, `[4·count, k]` f32 row-major (the values
    /// of [`crate::quant::packed::PackedWeight::dequantize`]). `None` without AVX-512F+BW or past
    /// the last quad.
    pub fn dequantize_quads(&self, first: usize, count: usize) -> Option<Vec<f32>> {
        if !available() || (first + count) * QUAD > self.n {
            return None;
        }
        let mut out = vec![0f32; count * QUAD * self.k];
        #[cfg(target_arch = "x86_64")]
        for (q, rows) in out.chunks_mut(QUAD * self.k).enumerate() {
            // SAFETY: AVX-512F+BW is present and quad `first + q` exists (checked above); `rows` is
            // `4 · k` long.
            unsafe { avx512::dequantize_quad(self, first + q, rows) };
        }
        Some(out)
    }

    /// Quads `first..first + count` into `out` `[count · 4, m]`.
    fn rows(&self, x: &[f32], m: usize, first: usize, count: usize, out: &mut [f32]) {
        assert!(available());
        let blocks = self.k / BLOCK;
        assert!((first + count) * blocks * QUAD * 16 <= self.words.len());
        assert!((first + count) * QUAD * (self.k / self.group) <= self.scale.len());
        assert!(x.len() == m * self.k && out.len() == count * QUAD * m);
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: AVX-512F+BW is present (asserted above); every index the loops form is below
            // the lengths asserted above.
            if m == 1 {
                unsafe { avx512::gemv(self, x, first, count, out) }
            } else {
                let mut scratch = vec![0f32; QUAD * self.k];
                for q in 0..count {
                    unsafe { avx512::dequantize_quad(self, first + q, &mut scratch) };
                    // Four activation rows at a time (16 accumulators), the rest one by one.
                    let whole = m / 4 * 4;
                    for r in (0..whole).step_by(4) {
                        let xr = &x[r * self.k..(r + 4) * self.k];
                        // SAFETY: four rows of `k` in both operands.
                        let dots = unsafe { avx512::dot4x4(&scratch, xr, self.k) };
                        for (i, row) in dots.into_iter().enumerate() {
                            out[(q * QUAD + i) * m + r..][..4].copy_from_slice(&row);
                        }
                    }
                    for r in whole..m {
                        let xr = &x[r * self.k..(r + 1) * self.k];
                        let dots = unsafe { avx512::dot4(&scratch, xr, self.k) };
                        for (i, d) in dots.into_iter().enumerate() {
                            out[(q * QUAD + i) * m + r] = d;
                        }
                    }
                }
            }
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Int4Weight, BLOCK, PREFETCH_BYTES, QUAD};

    /// The 16-entry table `(c − offset) · scale`, c = 0..16 (same f32 operations as the
    /// dequantization: an exact small integer times the scale).
    #[target_feature(enable = "avx512f,avx512bw")]
    fn lut(offset: f32, scale: f32) -> __m512 {
        let iota =
            _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
        _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(offset)), _mm512_set1_ps(scale))
    }

    /// Lanes whose low 4 bits are nibble `S` of `v`'s lanes (`vpermps` ignores the upper bits).
    /// Half of the steps shift each lane (`vpsrld`, port 0, which also runs the FMAs on a CPU
    /// with one 512-bit FMA unit), half shift each 128-bit lane by whole bytes (`vpsrldq`, port
    /// 5, beside the `vpermps`). Measured on the development machine against shifts alone: one
    /// core, weights in cache, 12.3 → 13.1 GB/s; two cores from memory 21.0 → 21.7 GB/s.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn nibble<const S: i32>(v: __m512i) -> __m512i {
        match S {
            0 => v,
            2 => _mm512_bsrli_epi128::<1>(v),
            4 => _mm512_bsrli_epi128::<2>(v),
            6 => _mm512_bsrli_epi128::<3>(v),
            1 => _mm512_srli_epi32::<4>(v),
            3 => _mm512_srli_epi32::<12>(v),
            5 => _mm512_srli_epi32::<20>(v),
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
        if w.group.is_multiple_of(BLOCK) {
            gemv_groups::<true>(w, x, first, count, out)
        } else {
            gemv_groups::<false>(w, x, first, count, out)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn gemv_groups<const WHOLE_BLOCKS: bool>(
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
                    let ahead = (p.add(i * 16) as *const i8).wrapping_add(PREFETCH_BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
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
                            let idx = nibble::<$s>(v[i]);
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

    /// Dot products of the four `k`-long rows of `rows` with the four `k`-long rows of `x`:
    /// `[row][x row]`.
    ///
    /// SAFETY: AVX-512F+BW; `rows` and `x` are `4 · k` long, `k` a multiple of 16.
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
        debug_assert!(rows.len() == QUAD * k && x.len() == k && k.is_multiple_of(16));
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
mod tests {
    use super::*;

    /// A deterministic weight: codes, scales and zero points from a small LCG.
    fn weight(n: usize, k: usize, group: usize, symmetric: bool) -> (Vec<u8>, Int4Weight) {
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
        let w = Int4Weight::from_nibbles(&nibbles, scale, zp, qmin, n, k, group)
            .expect("supported shape");
        (nibbles, w)
    }

    /// The dequantized weight, element by element (the reference arithmetic).
    fn dequantized(w: &Int4Weight, nibbles: &[u8]) -> Vec<f32> {
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
        if !available() {
            return;
        }
        let (nibbles, w) = weight(8, 256, 128, false);
        assert_eq!(w.nibbles(), nibbles);
        assert_eq!(w.bytes(), 8 * 256 / 2 + 8 * 2 * 4 + 8 * 2);
    }

    #[test]
    fn matmul_matches_the_dequantized_reference() {
        if !available() {
            return;
        }
        for (n, k, group, symmetric, m) in [
            (8, 256, 128, false, 1),
            (12, 384, 32, true, 1),
            (16, 512, 64, false, 3),
            (4, 256, 256, false, 5),
            (8, 256, 128, true, 9),
        ] {
            let (nibbles, w) = weight(n, k, group, symmetric);
            let dense = dequantized(&w, &nibbles);
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
            let y = w.matmul(&x, m).expect("kernel runs");
            for r in 0..m {
                for row in 0..n {
                    let terms =
                        (0..k).map(|c| f64::from(dense[row * k + c]) * f64::from(x[r * k + c]));
                    let exact: f64 = terms.clone().sum();
                    let magnitude: f64 = terms.map(f64::abs).sum();
                    let got = f64::from(y[r * n + row]);
                    // f32 accumulation in another order: a few ulps of the sum of magnitudes.
                    assert!(
                        (got - exact).abs() <= 1e-6 * magnitude,
                        "[{n}, {k}] g{group} m{m} row {row}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn libgomp_and_rayon_teams_give_identical_results() {
        if !available() {
            return;
        }
        // The test binary links libtorch, which loads libgomp: the default team is OpenMP's.
        #[cfg(target_os = "linux")]
        assert!(omp::team().is_some(), "libgomp not found in a process that links libtorch");
        let (_, w) = weight(64, 512, 128, false);
        for m in [1, 6] {
            let x: Vec<f32> = (0..m * 512).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
            let omp = w.matmul_on(&x, m, parallel).expect("libgomp team");
            let rayon = w.matmul_on(&x, m, parallel_rayon).expect("rayon team");
            // Each row is summed by one thread in the same order either way: bit-identical.
            assert_eq!(omp, rayon, "m = {m}");
        }
    }

    #[test]
    fn unsupported_shapes_are_named() {
        if !available() {
            assert!(unsupported(4, 128, 128).is_some());
            return;
        }
        assert!(unsupported(4, 128, 128).is_none());
        assert!(unsupported(6, 128, 128).is_some_and(|r| r.contains("out % 4")));
        assert!(unsupported(4, 96, 32).is_some_and(|r| r.contains("in % 128")));
        assert!(unsupported(4, 256, 24).is_some_and(|r| r.contains("multiple of 16")));
    }
}
