//! How the share of the memory roof a decode kernel streams depends on the size of each call:
//! the same ~544 MiB of 4-bit codes (group 128, `k` = 4096) as 256 weights of 1024 rows (2 MiB a
//! call), 64 of 4096 (8.5 MiB: LLaVA-7B's q, k, v and o), 16 of 16384 (34 MiB) and 4 of 65536
//! (136 MiB), each set passed through the VNNI q8 kernel (activations already on their int8 grid,
//! so only the kernel runs), best of 3, against a streaming-read roof read just before it (1 GiB,
//! best of 2). Median and range over rounds per set.
//!
//! Measured on the AMD EPYC (Zen 5, 2 cores, 2026-12-06 14:56–15:05 UTC), `% of the roof`:
//! - roof 45–51 GB/s: 2 MiB calls 75–87 %, 8.5 MiB 81–91 %, 34 MiB 86–98 %, 136 MiB 89–102 %;
//! - roof 64–73 GB/s: 61–71 %, 75–88 %, 84–95 %, 86–97 %;
//! - one thread (roof 34–38 GB/s): 72–84 %, 75–87 %, 82–93 %, 82–91 %.
//!
//! So at the bandwidth of the machine's fast spells the kernel still streams ~90 % of the roof on
//! large calls, and the 7B decode's calls (8.5–46 MB) lose most of their gap to call size. Tried
//! against it, none above the noise (same probe, variants alternated within each round): one range
//! per thread instead of four; a burst of prefetches over a range's first 16 KiB; the far prefetch
//! 32 or 64 KiB ahead instead of 16 (slightly worse); transparent huge pages for every allocation
//! (`/sys/kernel/mm/transparent_hugepage/enabled` = always, 1.5 GB of huge pages in use). The
//! steady-state rate inside a call, not only its start, is lower for the smaller weights (timed
//! inside the kernel: 26–28 GB/s 256 KiB into a 2 MiB weight's range against 31–32 deep into a
//! 136 MiB one, one thread); why is not established.
//!
//! Run: `cargo run -p qvlm-core --example call_size_probe [ROUNDS] [THREADS]`.

use qvlm_core::quant::int4_avx512::Int4Weight;
use qvlm_core::quant::int4_vnni;
use qvlm_core::quant::team::read_bandwidth;
use shared::best_of;

mod shared;

/// `(rows, weights)`: the same bytes cut into calls of four sizes.
const SETS: [(usize, usize); 4] = [(1024, 256), (4096, 64), (16384, 16), (65536, 4)];
const K: usize = 4096;
const GROUP: usize = 128;

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    if let Some(threads) = std::env::args().nth(2).and_then(|s| s.parse::<i32>().ok()) {
        tch::set_num_threads(threads);
    }
    if !int4_vnni::available() {
        eprintln!("call_size_probe times the VNNI kernel; this CPU lacks AVX-512 VNNI");
        std::process::exit(2);
    }
    let mut next = shared::xorshift();
    let x: Vec<f32> = (0..K).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
    let a = int4_vnni::quantize_activations(&x, K, GROUP).expect("activations");
    let sets: Vec<Vec<Int4Weight>> = SETS
        .iter()
        .map(|&(rows, count)| {
            (0..count)
                .map(|_| {
                    let nibbles: Vec<u8> = (0..rows * K / 2).map(|_| next() as u8).collect();
                    let scale = vec![0.01f32; rows * K / GROUP];
                    Int4Weight::from_nibbles(&nibbles, scale, None, -8, rows, K, GROUP)
                        .expect("int4 weight")
                })
                .collect()
        })
        .collect();
    println!(
        "{rounds} rounds, {} threads; % of the roof read just before each set",
        tch::get_num_threads()
    );
    let mut shares = vec![Vec::new(); SETS.len()];
    for round in 0..rounds {
        let mut line = format!("round {round}:");
        for (i, ws) in sets.iter().enumerate() {
            let roof = read_bandwidth(1 << 30, 2);
            let bytes: usize = ws.iter().map(Int4Weight::bytes).sum();
            let seconds = best_of(3, || {
                for w in ws {
                    std::hint::black_box(w.matmul_quantized(&a));
                }
            });
            let share = bytes as f64 / seconds / roof;
            shares[i].push(share);
            line += &format!(
                " {}×{}: {:.0} % of {:.1} GB/s |",
                SETS[i].1,
                SETS[i].0,
                100.0 * share,
                roof / 1e9
            );
        }
        println!("{line}");
    }
    for ((rows, count), mut s) in SETS.into_iter().zip(shares) {
        s.sort_by(f64::total_cmp);
        println!(
            "{count} calls of {rows} rows: median {:.0} % of the roof (range {:.0}–{:.0} %)",
            100.0 * s[s.len() / 2],
            100.0 * s[0],
            100.0 * s[s.len() - 1]
        );
    }
}
