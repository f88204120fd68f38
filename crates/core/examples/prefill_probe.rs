//! The own exact W4A16 kernel's prefill against libtorch's int4 kernel: one LLaMA-7B decoder
//! layer's linears (q, k, v, o, gate, up, down; group 128) on `M` rows of bf16 activations, as a
//! bf16 model's prefill gives them — the own kernel in bf16 pairs (`int4_pairs`, where the CPU
//! has AVX512-BF16) and forced to f32 (`Prefill::F32`), and `_weight_int4pack_mm_for_cpu` on the
//! same codes. Each pass is timed best of 3; the three alternate, round after round, and the
//! median and range over rounds are printed (a shared machine's speed drifts within seconds).
//!
//! Run: `cargo run -p qvlm-core --example prefill_probe [ROUNDS] [M]`.

use qvlm_core::quant::int4_avx512::Prefill;
use qvlm_core::quant::packed::{Kernel, PackedSpec, PackedWeight};
use shared::{best_of, LAYER};
use tch::{Device, Kind, Tensor};

mod shared;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map_or(Ok(5), |a| a.parse())?;
    let m: i64 = args.get(2).map_or(Ok(64), |a| a.parse())?;
    let _guard = tch::no_grad_guard();
    tch::manual_seed(0);
    let spec = PackedSpec::w4a16(128)?;
    let mut own = Vec::new();
    let mut own_f32 = Vec::new();
    let mut torch = Vec::new();
    for (n, k) in LAYER.map(|(n, k)| (n as i64, k as i64)) {
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.02;
        let p = PackedWeight::quantize(&w, spec, "probe")?;
        anyhow::ensure!(
            p.kernel() == Kernel::Int4Avx512,
            "the own AVX-512 kernel: {:?}",
            p.kernel()
        );
        own_f32.push(PackedWeight::quantize(&w, spec, "probe")?.with_prefill(Prefill::F32)?);
        torch.push(PackedWeight::quantize(&w, spec, "probe")?.with_kernel(Kernel::Int4Cpu)?);
        own.push(p);
    }
    let inputs: Vec<Tensor> = [4096, 11008]
        .iter()
        .map(|&k| Tensor::randn([m, k], (Kind::BFloat16, Device::Cpu)))
        .collect();
    let x = |k: i64| &inputs[usize::from(k != 4096)];
    let pass = |ws: &[PackedWeight]| {
        for (w, (_, k)) in ws.iter().zip(LAYER) {
            let _ = std::hint::black_box(w.matmul(x(k as i64)));
        }
    };
    let macs: f64 = LAYER.iter().map(|&(n, k)| (n * k) as f64 * m as f64).sum();
    println!("one LLaMA-7B layer's linears, M = {m} bf16 rows, {rounds} rounds (best of 3 each)");
    let mut times: [Vec<f64>; 3] = Default::default();
    for r in 0..rounds {
        let ms = |ws: &[PackedWeight]| best_of(3, || pass(ws)) * 1e3;
        let t = [ms(&own), ms(&own_f32), ms(&torch)];
        println!(
            "round {r}: own pairs {:.1} ms, own f32 {:.1} ms, libtorch int4 {:.1} ms",
            t[0], t[1], t[2]
        );
        for (all, one) in times.iter_mut().zip(t) {
            all.push(one);
        }
    }
    for (name, t) in ["own, bf16 pairs", "own, f32", "libtorch int4"].iter().zip(&mut times) {
        let (lo, hi) = (
            t.iter().copied().fold(f64::INFINITY, f64::min),
            t.iter().copied().fold(0.0, f64::max),
        );
        let med = median(t);
        println!(
            "{name}: {med:.1} ms a layer ({lo:.1}–{hi:.1}), {:.0} GMAC/s; a 32-layer 7B prefill of {m} tokens ≈ {:.1} tokens/s from the linears alone",
            macs / med / 1e6,
            m as f64 / (32.0 * med / 1e3)
        );
    }
    Ok(())
}
