//! The decode kernels alone against the memory roof, with weights far above the last-level cache:
//! one decode pass (M = 1) over a stack of LLaVA-7B-shaped linears (about 1 GiB of bf16, or its
//! 4-bit codes), each kernel's pass (best of 3) between two streaming-read roofs (1 GiB, best of
//! 3) and divided by the higher; the ratio is paired round by round, and the median and range over
//! rounds are printed, since the bandwidth of a shared machine drifts within seconds. Each round
//! first prints the roof's read prefetch variants alone (`team::ReadPrefetch`). Criterion's `quant_kernels` bench times one weight,
//! which stays in a large L3; this probe is what a decode step sees.
//!
//! Run: `cargo run -p qvlm-core --example stream_probe [ROUNDS] [THREADS] [GROUP]` (threads: libtorch's
//! team size, default one per core).

use qvlm_core::quant::bf16_own::Bf16Weight;
use qvlm_core::quant::int4_avx512::Int4Weight;
use qvlm_core::quant::int4_vnni;
use qvlm_core::quant::team::{read_bandwidth, read_bandwidth_by_prefetch};
use shared::{best_of, LAYER};

mod shared;

/// The 4-bit weights' group size unless the third argument names another.
const GROUP: usize = 128;

/// A kernel's name, the bytes one pass streams, and the pass.
type Kernel<'a> = (&'a str, usize, Box<dyn Fn() + 'a>);

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    // One thread shows what a single core streams, apart from how the machine shares its memory
    // links between the cores.
    if let Some(threads) = std::env::args().nth(2).and_then(|s| s.parse::<i32>().ok()) {
        tch::set_num_threads(threads);
    }
    // About 1.1 GiB of each: 3 layers of bf16, 12 of 4-bit codes + scales.
    let (bf16_layers, int4_layers) = (3, 12);
    let group: usize = std::env::args().nth(3).and_then(|s| s.parse().ok()).unwrap_or(GROUP);
    let mut next = shared::xorshift();
    let mut bf16 = Vec::new();
    let mut int4 = Vec::new();
    for layer in 0..int4_layers {
        for (n, k) in LAYER {
            let nibbles: Vec<u8> = (0..n * k / 2).map(|_| next() as u8).collect();
            let scale = vec![0.01f32; n * k / group];
            int4.push(
                Int4Weight::from_nibbles(&nibbles, scale, None, -8, n, k, group).expect("int4"),
            );
            if layer >= bf16_layers {
                continue;
            }
            let bits: Vec<u16> = (0..n * k).map(|_| 0x3c00 | (next() as u16 & 0x00ff)).collect();
            bf16.push(Bf16Weight::from_bits(&bits, n, k).expect("bf16 weight"));
        }
    }
    let bf16_bytes: usize = bf16.iter().map(Bf16Weight::bytes).sum();
    let int4_bytes: usize = int4.iter().map(Int4Weight::bytes).sum();
    let xs: Vec<Vec<f32>> = [4096usize, 11008]
        .iter()
        .map(|&k| (0..k).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect())
        .collect();
    let x_for = |k: usize| if k == 4096 { &xs[0] } else { &xs[1] };
    println!(
        "bf16 {:.2} GiB, int4 {:.2} GiB (group {group}), {} rounds, {} threads",
        bf16_bytes as f64 / (1u64 << 30) as f64,
        int4_bytes as f64 / (1u64 << 30) as f64,
        rounds,
        tch::get_num_threads()
    );
    let kernels: Vec<Kernel> = {
        let mut k: Vec<Kernel> = vec![
            (
                "bf16_own",
                bf16_bytes,
                Box::new(|| {
                    for w in &bf16 {
                        std::hint::black_box(w.matmul(x_for(w.shape()[1]), 1));
                    }
                }),
            ),
            (
                "int4 exact",
                int4_bytes,
                Box::new(|| {
                    for w in &int4 {
                        std::hint::black_box(w.matmul(x_for(w.shape()[1]), 1));
                    }
                }),
            ),
        ];
        if int4_vnni::available() {
            k.push((
                "int4 vnni q8",
                int4_bytes,
                Box::new(|| {
                    for w in &int4 {
                        std::hint::black_box(w.matmul_q8(x_for(w.shape()[1]), 1));
                    }
                }),
            ));
        }
        k
    };
    let mut ratios = vec![Vec::new(); kernels.len()];
    for round in 0..rounds {
        // The roof's prefetch variants, each alone: which one wins differs between CPUs.
        let variants = read_bandwidth_by_prefetch(1 << 30, 3);
        let mut line = format!("round {round}: read with prefetch");
        for (prefetch, bw) in variants {
            line += &format!(" {} {:.1}", prefetch.name(), bw / 1e9);
        }
        line += " GB/s |";
        for (i, (name, bytes, pass)) in kernels.iter().enumerate() {
            let before = read_bandwidth(1 << 30, 3);
            let rate = *bytes as f64 / best_of(3, pass);
            let roof = before.max(read_bandwidth(1 << 30, 3));
            ratios[i].push(rate / roof);
            line += &format!(
                " {name} {:.1} GB/s of {:.1} ({:.0} %) |",
                rate / 1e9,
                roof / 1e9,
                100.0 * rate / roof
            );
        }
        println!("{line}");
    }
    for ((name, ..), mut r) in kernels.iter().zip(ratios) {
        r.sort_by(f64::total_cmp);
        let pct = |v: f64| 100.0 * v;
        println!(
            "{name}: median {:.0} % of the roof (range {:.0}–{:.0} %, {} rounds)",
            pct(r[r.len() / 2]),
            pct(r[0]),
            pct(r[r.len() - 1]),
            r.len()
        );
    }
}
