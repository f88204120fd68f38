//! Quantizers (RTN, NF4, fake-quant) and the real low-bit kernels against f32 and bf16 matmuls at
//! LLaVA-7B's linear shapes, for decode (1 token) and prefill (64 tokens). Short measurement
//! windows keep `cargo bench -p qvlm-core` to a few minutes on 2 cores.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use qvlm_core::quant::bf16_own::Bf16Weight;
use qvlm_core::quant::int4_vnni;
use qvlm_core::quant::packed::{Kernel, PackedSpec, PackedWeight};
use qvlm_core::quant::spec::{Granularity, WeightSpec};
use qvlm_core::quant::uniform::{Grid, QParams};
use qvlm_core::quant::weight::QuantizedWeight;
use tch::{Device, Kind, Tensor};

/// `[out, in]` of LLaVA-7B's decoder linears (LLaMA-7B): q/k/v/o, gate/up, down.
const SHAPES: [(i64, i64); 3] = [(4096, 4096), (11008, 4096), (4096, 11008)];
/// Tokens per call: decode and prefill.
const TOKENS: [i64; 2] = [1, 64];
const GROUP: i64 = 128;

fn weight(n: i64, k: i64) -> Tensor {
    Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.02
}

fn quantizers(c: &mut Criterion) {
    let _guard = tch::no_grad_guard();
    let rtn = WeightSpec::Rtn {
        grid: Grid { bits: 4, symmetric: false },
        granularity: Granularity::PerGroup { size: GROUP },
    };
    let nf4 = WeightSpec::Nf4 { block: 64, double_quant: false };
    let mut group = c.benchmark_group("quantize");
    for (n, k) in SHAPES {
        let w = weight(n, k);
        let shape = format!("{n}x{k}");
        group.bench_function(BenchmarkId::new("rtn_w4_g128", &shape), |b| {
            b.iter(|| QuantizedWeight::quantize(&w, &rtn, "bench").map(|q| q.bytes()))
        });
        group.bench_function(BenchmarkId::new("nf4_b64", &shape), |b| {
            b.iter(|| QuantizedWeight::quantize(&w, &nf4, "bench").map(|q| q.bytes()))
        });
        let grouped = w.reshape([n, k / GROUP, GROUP]);
        let qp = QParams::from_range(
            Grid { bits: 4, symmetric: false },
            &grouped.amin(-1, true),
            &grouped.amax(-1, true),
        );
        group.bench_function(BenchmarkId::new("fake_quant_w4_g128", &shape), |b| {
            b.iter(|| qp.fake_quant(&grouped))
        });
    }
    group.finish();
}

fn kernels(c: &mut Criterion) {
    let _guard = tch::no_grad_guard();
    let mut group = c.benchmark_group("matmul");
    for (n, k) in SHAPES {
        let w = weight(n, k);
        let wb = w.to_kind(Kind::BFloat16);
        let pack = |spec: PackedSpec| {
            let p = PackedWeight::quantize(&w, spec, "bench").expect("pack");
            assert_ne!(p.kernel(), Kernel::Dequantized, "{:?}", p.fallback_reason());
            p
        };
        // W4A16 on the default kernel (the own AVX-512 one where the CPU has it) and on libtorch's.
        let w4 = pack(PackedSpec::w4a16(GROUP).expect("spec"));
        let w4_torch = pack(PackedSpec::w4a16(GROUP).expect("spec"))
            .with_kernel(Kernel::Int4Cpu)
            .expect("libtorch int4");
        // The own kernel's AVX2 variant, forced where the default is the AVX-512 one.
        let w4_avx2 = (w4.kernel() == Kernel::Int4Avx512).then(|| {
            pack(PackedSpec::w4a16(GROUP).expect("spec"))
                .with_kernel(Kernel::Int4Avx2)
                .expect("AVX2 variant")
        });
        // The own VNNI kernel (CPUs with AVX-512 VNNI) on the same codes: float activations
        // rounded to int8 per group (`w4a16_q8`), per-token int8 (W4A8) and int4 (W4A4).
        let vnni: Vec<(&str, PackedWeight)> = if int4_vnni::available() {
            let specs = [
                ("w4a16_q8_g128_int4_vnni", PackedSpec::w4a16(GROUP).expect("spec")),
                ("w4a8_g128_int4_vnni", PackedSpec::w4a8(GROUP).expect("spec")),
                ("w4a4_g128_int4_vnni", PackedSpec::w4a4(GROUP).expect("spec")),
            ];
            specs
                .into_iter()
                .map(|(name, spec)| {
                    let p = pack(spec).with_kernel(Kernel::Int4Vnni).expect("VNNI kernel");
                    (name, p)
                })
                .collect()
        } else {
            Vec::new()
        };
        let w8 = pack(PackedSpec::w8a16());
        let w8a8 = pack(PackedSpec::w8a8());
        for m in TOKENS {
            let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu));
            let xb = x.to_kind(Kind::BFloat16);
            let id = |name: &str| BenchmarkId::new(name, format!("{n}x{k}/M={m}"));
            group.bench_function(id("f32"), |b| b.iter(|| x.matmul(&w.tr())));
            group.bench_function(id("bf16"), |b| b.iter(|| xb.matmul(&wb.tr())));
            // The same bf16 weights on the own memory-bound kernel (AVX-512 or AVX2 CPUs).
            if let Ok(own) = Bf16Weight::from_tensor(&wb, "bench") {
                let name = format!("bf16_{}", own.isa().name());
                group.bench_function(id(&name), |b| b.iter(|| own.matmul_tensor(&xb)));
            }
            group.bench_function(id(&format!("w4a16_g128_{}", w4.kernel().name())), |b| {
                b.iter(|| w4.matmul(&x))
            });
            // bf16 activations (as in a bf16 model, and as libtorch's int4 kernel takes them):
            // with M > 1 on an AVX512-BF16 CPU the own kernel's prefill runs in bf16 pairs
            // (`int4_pairs`), where f32 activations take its f32 path.
            let name = format!("w4a16_g128_{}_bf16_x", w4.kernel().name());
            group.bench_function(id(&name), |b| b.iter(|| w4.matmul(&xb)));
            group.bench_function(id("w4a16_g128_int4_cpu"), |b| b.iter(|| w4_torch.matmul(&x)));
            if let Some(w) = &w4_avx2 {
                group.bench_function(id("w4a16_g128_int4_avx2"), |b| b.iter(|| w.matmul(&x)));
            }
            for (name, w) in &vnni {
                group.bench_function(id(name), |b| b.iter(|| w.matmul(&x)));
            }
            group.bench_function(id("w8a16"), |b| b.iter(|| w8.matmul(&x)));
            group.bench_function(id("w8a8"), |b| b.iter(|| w8a8.matmul(&x)));
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = quantizers, kernels
}
criterion_main!(benches);
