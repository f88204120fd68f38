//! `experiments bench` on a tiny LLaVA shape: every configuration row is produced, weight bytes
//! are exactly the analytic storage sizes, the bandwidth is positive and the table and figure are
//! written. No timing is asserted (speed is measured by the bench itself, never in tests).

use std::path::{Path, PathBuf};

use experiments::bench::scheme::{self, Scheme};
use experiments::bench::{self, config, report};
use qvlm_core::quant::team::Isa;
use qvlm_core::quant::{bf16_own, int4_vnni};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A results folder under the target directory, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

const TINY: &str = r#"
[bench]
name = "tiny-bench"
device = "cpu"
threads = 1

[model]
memory_headroom_gib = 0.0
shapes = ["tiny"]
fp32_layers = 1
schemes = ["fp32", "bf16", "bf16_own", "w8a16", "w8a8", "w4a16_libtorch", "w4a16", "w4a16_vnni", "w4a8", "w4a4"]
w4_group = 128

[measure]
prefill_tokens = 8
warmup_tokens = 1
decode_tokens = 2
rounds = 2
step_paired_16bit = true
roof_each_step_mib = 16

[bandwidth]
mib = 16
repeats = 2

[[shape]]
name = "tiny"
vision_hidden = 64
vision_layers = 2
vision_heads = 2
vision_intermediate = 128
image_size = 28
patch_size = 14
text_hidden = 256
text_layers = 2
text_heads = 4
text_intermediate = 512
vocab = 320
"#;

fn tiny_config(results: &Path) -> config::BenchConfig {
    let text = TINY.replace(
        "name = \"tiny-bench\"",
        &format!("name = \"tiny-bench\"\nresults_dir = \"{}\"", results.display()),
    );
    config::parse(&text, Path::new("tiny-bench.toml")).expect("tiny config")
}

#[test]
fn bench_on_a_tiny_shape_reports_every_configuration_with_exact_bytes() {
    let results = scratch("tiny");
    let cfg = tiny_config(&results);
    let out = bench::run(&cfg).expect("bench run");

    // Every configuration, in the config's order, on the kernels (no fallback); the own bf16
    // kernel is listed as not run where the CPU lacks AVX-512 and AVX2, the VNNI rows where it
    // lacks AVX-512 VNNI (each once, whatever the number of rounds).
    let schemes: Vec<Scheme> = out.rows.iter().map(|r| r.scheme).collect();
    let own16 = bf16_own::available();
    let vnni = int4_vnni::available();
    let expected: Vec<Scheme> = Scheme::ALL
        .into_iter()
        .filter(|&s| own16 || s != Scheme::Bf16Own)
        .filter(|&s| vnni || !s.on_vnni())
        .collect();
    assert_eq!(schemes, expected);
    // Without the own bf16 kernel, its row and the W4 rows' step-paired partner are not run.
    let skipped = 2 * usize::from(!own16) + if vnni { 0 } else { 3 };
    assert_eq!(out.info.skipped.len(), skipped, "{:?}", out.info.skipped);
    for s in &out.info.skipped {
        assert!(s.reason.contains("AVX2") || s.reason.contains("VNNI"), "{s:?}");
    }
    for r in &out.rows {
        assert_eq!(r.fallback_linears, 0, "{}: {}", r.label, r.kernel);
        assert_eq!(r.layers, 2);
        assert!(r.decode.total_ms() > 0.0 && r.prefill.total_ms() > 0.0);
        assert_eq!(r.prefill_positions, 8);
    }
    let kernel = |s: Scheme| out.rows.iter().find(|r| r.scheme == s).map(|r| r.kernel.clone());
    let own = match Isa::best() {
        Some(Isa::Avx512) => "int4_avx512",
        Some(Isa::Avx2) => "int4_avx2",
        None => "int4_cpu",
    };
    assert_eq!(kernel(Scheme::W4a16).as_deref(), Some(own));
    assert_eq!(kernel(Scheme::W4a16Libtorch).as_deref(), Some("int4_cpu"));
    assert_eq!(kernel(Scheme::W8a16).as_deref(), Some("int8_weight"));
    assert_eq!(kernel(Scheme::W8a8).as_deref(), Some("int8_int8"));
    assert_eq!(kernel(Scheme::Bf16).as_deref(), Some("dense"));
    if vnni {
        for s in [Scheme::W4a16Vnni, Scheme::W4a8, Scheme::W4a4] {
            assert_eq!(kernel(s).as_deref(), Some("int4_vnni"), "{s:?}");
        }
    }
    if own16 {
        let want = format!("bf16_{}", Isa::best().map_or("", Isa::name));
        assert_eq!(kernel(Scheme::Bf16Own), Some(want));
    }

    // Analytic bytes of the decoder linears: 2 layers × (q, k, v, o [256, 256]; gate, up
    // [512, 256]; down [256, 512]).
    let shapes: Vec<(i64, i64)> =
        [(256, 256), (256, 256), (256, 256), (256, 256), (512, 256), (512, 256), (256, 512)]
            .repeat(2);
    let dense = |elt: i64| shapes.iter().map(|(o, i)| o * i * elt).sum::<i64>();
    // W4 g128: two codes a byte, an f32 scale and a u8 zero point per 128 inputs of a row.
    let w4: i64 = shapes.iter().map(|(o, i)| o * i / 2 + o * (i / 128) * (4 + 1)).sum();
    // W8 per channel: a byte a code, one f32 scale per row.
    let w8: i64 = shapes.iter().map(|(o, i)| o * i + o * 4).sum();
    let row = |s: Scheme| out.rows.iter().find(|r| r.scheme == s).expect("row");
    assert_eq!(row(Scheme::Bf16).decoder_linear_bytes, dense(2));
    assert_eq!(row(Scheme::Fp32).decoder_linear_bytes, dense(4));
    assert_eq!(row(Scheme::W4a16).decoder_linear_bytes, w4);
    assert_eq!(row(Scheme::W4a16Libtorch).decoder_linear_bytes, w4);
    assert_eq!(row(Scheme::W8a16).decoder_linear_bytes, w8);
    assert_eq!(row(Scheme::W8a8).decoder_linear_bytes, w8);
    // The rest of the model is the same bf16 in every bf16-built scheme.
    let others = row(Scheme::Bf16).weight_bytes - dense(2);
    assert_eq!(row(Scheme::W4a16).weight_bytes, others + w4);
    assert_eq!(row(Scheme::W4a16Libtorch).weight_bytes, others + w4);
    assert_eq!(row(Scheme::W8a8).weight_bytes, others + w8);
    // Whole-model bytes: parameters × element size (the shape's analytic count).
    let params = cfg.shapes().expect("shapes")[0].dims.parameters(2);
    assert_eq!(row(Scheme::Bf16).weight_bytes, 2 * params);
    if own16 {
        // The same bf16 weights on the own kernel: the same bytes.
        assert_eq!(row(Scheme::Bf16Own).decoder_linear_bytes, dense(2));
        assert_eq!(row(Scheme::Bf16Own).weight_bytes, 2 * params);
    }
    // FP32 was built with 1 of 2 layers and extrapolated: exact all the same.
    assert!(row(Scheme::Fp32).extrapolated());
    assert_eq!(row(Scheme::Fp32).layers_built, 1);
    assert_eq!(row(Scheme::Fp32).weight_bytes, 4 * params);

    let m = &out.info.machine;
    assert!(m.roof_bytes_per_s > 0.0 && m.copy_bytes_per_s > 0.0 && m.gemv_bytes_per_s > 0.0);
    assert!(m.threads >= 1);
    for r in &out.rows {
        assert!(r.roof_before_bytes_per_s > 0.0 && r.roof_after_bytes_per_s > 0.0, "{}", r.label);
    }

    // Two rounds of the bf16 family: each row is its lower-median round, with both rounds' decode
    // times and paired ratios; FP32 is measured once.
    for r in &out.rows {
        let rounds = if r.scheme == Scheme::Fp32 { 1 } else { 2 };
        assert_eq!(r.round_decode_ms.len(), rounds, "{}", r.label);
        let lower = r.round_decode_ms.iter().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(r.decode.total_ms(), lower, "{}: the lower median of two", r.label);
        if r.scheme != Scheme::Fp32 {
            assert_eq!(r.round_speedup_16bit.len(), 2, "{}", r.label);
        }
    }

    // The table has every row (and the skipped ones) and the exact byte ratio; files exist.
    let t = &out.report.table;
    assert_eq!(t.height(), expected.len() + skipped);
    let w4_row = expected.iter().position(|&s| s == Scheme::W4a16).expect("W4A16 row");
    let ratio = t.column("dec_linears_x_vs_bf16").expect("column").f64().expect("f64").get(w4_row);
    assert_eq!(ratio, Some(dense(2) as f64 / w4 as f64));
    // "vs 16-bit" is the median (of two: the mean) of the per-round ratios against the faster of
    // the two 16-bit rows of the same round.
    let col = |name: &str| t.column(name).expect("column").f64().expect("f64").get(w4_row);
    let paired = &row(Scheme::W4a16).round_speedup_16bit;
    let speedup = (paired[0] + paired[1]) / 2.0;
    assert!((col("speedup_vs_16bit").expect("value") - speedup).abs() < 1e-9 * speedup);
    let (lo, hi) = (paired[0].min(paired[1]), paired[0].max(paired[1]));
    assert_eq!((col("speedup_vs_16bit_lo"), col("speedup_vs_16bit_hi")), (Some(lo), Some(hi)));
    assert_eq!(col("rounds"), Some(2.0));
    for f in &out.report.files {
        assert!(f.is_file(), "{} missing", f.display());
    }
    let md = std::fs::read_to_string(results.join("efficiency.md")).expect("md");
    assert!(md.contains("W4A16 g128") && md.contains("Targets"), "{md}");
    // Eight targets for each W4A16 row (exact, libtorch's, and q8 where VNNI runs) and a ninth
    // with the step-paired partner, four for the own bf16 row (the decode's, the linears
    // alone's and the fused decode's share of the roof, the last also against the roof read
    // after each step).
    let w4a16_rows = 2 + usize::from(vnni);
    let per_w4a16 = 8 + usize::from(own16);
    assert_eq!(out.report.targets.len(), per_w4a16 * w4a16_rows + 4 * usize::from(own16));
    // The roof was read after every fused step: each row's share of it per step, in the table.
    for r in &out.rows {
        let pct = r.fused_stepped_roof_pct;
        assert!(pct.is_some_and(|p| p.is_finite() && p > 0.0), "{}: {pct:?}", r.label);
    }
    assert_eq!(col("fused_roof_pct_stepped"), row(Scheme::W4a16).fused_stepped_roof_pct);
    // The W4 rows' fused steps were each followed by the partner's (one ratio a round), and only
    // theirs; the table has the median of the two rounds' ratios and their range.
    for r in &out.rows {
        let paired = own16 && r.scheme.is_w4();
        let ratios = &r.round_fused_speedup_stepped;
        assert_eq!(ratios.len(), if paired { 2 } else { 0 }, "{}", r.label);
        assert!(ratios.iter().all(|x| x.is_finite() && *x > 0.0), "{}: {ratios:?}", r.label);
        assert_eq!(r.partner_fused.is_some(), paired, "{}", r.label);
    }
    let stepped = col("fused_speedup_vs_bf16_own_stepped");
    if own16 {
        let ratios = &row(Scheme::W4a16).round_fused_speedup_stepped;
        let want = (ratios[0] + ratios[1]) / 2.0;
        assert!(stepped.is_some_and(|x| (x - want).abs() < 1e-9 * want), "{stepped:?}");
        let lo = col("fused_speedup_vs_bf16_own_stepped_lo");
        assert_eq!(lo, Some(ratios[0].min(ratios[1])));
        assert!(col("bf16_own_stepped_fused_ms").is_some_and(|ms| ms > 0.0));
        // A round without a partner (it did not fit beside the row): the note says so.
        let mut rows = out.rows.clone();
        let w4 = rows.iter().position(|r| r.scheme == Scheme::W4a16).expect("W4A16 row");
        rows[w4].round_fused_speedup_stepped.truncate(1);
        report::write_results(&results, &rows, &out.info).expect("rewrite");
        let rebuilt = report::build(&results).expect("report");
        let note = rebuilt.table.column("note").expect("column").str().expect("str").get(w4);
        let note = note.unwrap_or("");
        assert!(note.contains("step-paired ratio from 1 of 2 rounds"), "{note}");
    } else {
        assert_eq!(stepped, None);
    }
    // Every row's steps also ran on the fused decode path, which agreed with the libtorch step:
    // within two bf16 roundings of the largest value (the fused module's tests) where the
    // activations stay float; integer activations on the VNNI kernel can differ by a grid step
    // where a rounding flips (the fused module's tests say why), so only finite there.
    for r in &out.rows {
        let fused = r.decode_fused.expect("a fused decode time on the CPU");
        assert!(fused.total_ms() > 0.0, "{:?}", r.scheme);
        let diff = r.fused_max_rel_diff.expect("a fused difference on the CPU");
        let bound = if r.kernel.contains("int4_vnni") { f64::INFINITY } else { 1.0 / 64.0 };
        assert!(diff.is_finite() && diff <= bound, "{:?}: fused differs by {diff}", r.scheme);
        if r.scheme != Scheme::Fp32 {
            assert_eq!(r.round_fused_speedup_16bit.len(), 2, "{}", r.label);
        }
    }
    assert!(col("fused_speedup_vs_16bit").is_some_and(|x| x > 0.0));
    // The linears alone were timed for every measured row, and took part of a decode step's time
    // at most plus noise (they are a subset of its work; a loose bound: timing is not asserted).
    for r in &out.rows {
        assert!(r.decode_linears_ms > 0.0, "{:?}: {}", r.scheme, r.decode_linears_ms);
    }
    let alone = out.report.table.column("linears_roof_pct").expect("column");
    assert!(alone.f64().expect("f64").iter().flatten().all(|p| p > 0.0));
}

/// The report flags a row whose decode would stream faster than the memory roof measured around
/// it (its bytes per token or its time would be wrong), and its `roof_pct` uses the higher of the
/// two reads; the rows' own numbers are those of a real run, only the roof is replaced.
#[test]
fn a_row_above_its_roof_is_flagged() {
    let results = scratch("roof");
    let text = TINY
        .replace(
            r#"schemes = ["fp32", "bf16", "bf16_own", "w8a16", "w8a8", "w4a16_libtorch", "w4a16", "w4a16_vnni", "w4a8", "w4a4"]"#,
            r#"schemes = ["bf16", "w4a16"]"#,
        )
        .replace(
            "name = \"tiny-bench\"",
            &format!("name = \"tiny-bench\"\nresults_dir = \"{}\"", results.display()),
        );
    let cfg = config::parse(&text, Path::new("roof.toml")).expect("config");
    let out = bench::run(&cfg).expect("bench run");
    let mut rows = out.rows.clone();
    let w4 = rows.iter().position(|r| r.scheme == Scheme::W4a16).expect("W4A16 row");
    let gbs = rows[w4].decode_bytes_per_token as f64 / (rows[w4].decode.total_ms() / 1e3);
    // A roof at half the row's rate after it, a quarter before: 200 % of the higher one.
    rows[w4].roof_before_bytes_per_s = gbs / 4.0;
    rows[w4].roof_after_bytes_per_s = gbs / 2.0;
    // And the fused steps at 150 % of the roofs read after them.
    rows[w4].fused_stepped_roof_pct = Some(150.0);
    report::write_results(&results, &rows, &out.info).expect("rewrite");
    let rebuilt = report::build(&results).expect("report");
    let t = &rebuilt.table;
    let pct = t.column("roof_pct").expect("column").f64().expect("f64").get(w4).expect("pct");
    assert!((pct - 200.0).abs() < 1e-6, "{pct}");
    let drift = t.column("roof_drift_pct").expect("column").f64().expect("f64").get(w4);
    assert!(drift.is_some_and(|d| (d - 100.0).abs() < 1e-6), "{drift:?}");
    let note = t.column("note").expect("column").str().expect("str").get(w4).unwrap_or("");
    assert!(note.contains("ABOVE THE ROOF (decode)"), "{note}");
    // The linears alone against the same (higher) roof: their bytes over their own time.
    let alone = t.column("linears_roof_pct").expect("column").f64().expect("f64").get(w4);
    let want = 100.0 * rows[w4].decoder_linear_bytes as f64
        / (rows[w4].decode_linears_ms / 1e3)
        / rows[w4].roof_after_bytes_per_s;
    assert!(alone.is_some_and(|p| (p - want).abs() < 1e-6 * want), "{alone:?} vs {want}");
    assert_eq!(note.contains("ABOVE THE ROOF (linears alone)"), want > 100.0, "{note}");
    assert!(
        note.contains("ABOVE THE ROOF (fused decode, the roof read after each step): 150 %"),
        "{note}"
    );
    let stepped = t.column("fused_roof_pct_stepped").expect("column").f64().expect("f64").get(w4);
    assert_eq!(stepped, Some(150.0));
    // The untouched row is not flagged by this logic unless it really is above its roof.
    let bf16 = rows.iter().position(|r| r.scheme == Scheme::Bf16).expect("BF16 row");
    let note = t.column("note").expect("column").str().expect("str").get(bf16).unwrap_or("");
    let pct = t.column("roof_pct").expect("column").f64().expect("f64").get(bf16).expect("pct");
    let alone =
        t.column("linears_roof_pct").expect("column").f64().expect("f64").get(bf16).expect("pct");
    assert_eq!(note.contains("ABOVE THE ROOF (decode)"), pct > 100.0, "{note}");
    assert_eq!(note.contains("ABOVE THE ROOF (linears alone)"), alone > 100.0, "{note}");
}

#[test]
fn packing_vision_projector_and_lm_head_counts_their_exact_bytes() {
    let results = scratch("parts");
    // Groups of 64: CLIP's 64-wide inputs split into whole groups.
    let text = TINY
        .replace(
            "w4_group = 128",
            "w4_group = 64\npacked_parts = [\"decoder\", \"vision\", \"projector\", \"lm_head\"]",
        )
        .replace("fp32_layers = 1", "")
        .replace(
            r#"schemes = ["fp32", "bf16", "bf16_own", "w8a16", "w8a8", "w4a16_libtorch", "w4a16", "w4a16_vnni", "w4a8", "w4a4"]"#,
            r#"schemes = ["bf16", "w8a8", "w4a16"]"#,
        )
        .replace(
            "name = \"tiny-bench\"",
            &format!("name = \"tiny-bench\"\nresults_dir = \"{}\"", results.display()),
        );
    let cfg = config::parse(&text, Path::new("parts.toml")).expect("config");
    let out = bench::run(&cfg).expect("bench run");
    let row = |s: Scheme| out.rows.iter().find(|r| r.scheme == s).expect("row");
    for r in &out.rows {
        assert_eq!(r.fallback_linears, 0, "{}", r.label);
    }
    // [out, in] of every packed weight: 1 CLIP layer (q, k, v, out [64, 64]; fc1 [128, 64];
    // fc2 [64, 128]; LLaVA reads the second-to-last of the 2, so the last is not built), the
    // projector ([256, 64], [256, 256]), 2 decoder layers, lm_head.
    let vision = [(64, 64), (64, 64), (64, 64), (64, 64), (128, 64), (64, 128)];
    let decoder =
        [(256, 256), (256, 256), (256, 256), (256, 256), (512, 256), (512, 256), (256, 512)]
            .repeat(2);
    let mut all = vision.to_vec();
    all.extend([(256, 64), (256, 256)]);
    all.extend(decoder.iter().copied());
    all.push((320, 256));
    let w4 = |v: &[(i64, i64)]| v.iter().map(|(o, i)| o * i / 2 + o * (i / 64) * 5).sum::<i64>();
    let w8 = |v: &[(i64, i64)]| v.iter().map(|(o, i)| o * i + o * 4).sum::<i64>();
    let bf16 = |v: &[(i64, i64)]| v.iter().map(|(o, i)| o * i * 2).sum::<i64>();
    let dense_all = row(Scheme::Bf16).weight_bytes;
    assert_eq!(row(Scheme::W4a16).weight_bytes, dense_all - bf16(&all) + w4(&all));
    assert_eq!(row(Scheme::W8a8).weight_bytes, dense_all - bf16(&all) + w8(&all));
    assert_eq!(row(Scheme::W4a16).decoder_linear_bytes, w4(&decoder));
    // A decode step reads the packed lm_head: decoder linears, 2 × 2 layer norms and the final
    // norm (bf16 [256]), lm_head, one embedding row (bf16 [256]).
    let extra = (2 * 2 + 1) * 256 * 2 + 256 * 2;
    assert_eq!(row(Scheme::W4a16).decode_bytes_per_token, w4(&decoder) + w4(&[(320, 256)]) + extra);
    let md = std::fs::read_to_string(results.join("efficiency.md")).expect("md");
    assert!(md.contains("every vision-tower linear") && md.contains("`lm_head`"), "{md}");
}

#[test]
fn a_model_that_does_not_fit_is_reported_not_run() {
    let results = scratch("skip");
    // 10⁶ GiB of headroom: nothing fits, and the run still writes its table.
    let text =
        TINY.replace("memory_headroom_gib = 0.0", "memory_headroom_gib = 1000000.0").replace(
            "name = \"tiny-bench\"",
            &format!("name = \"tiny-bench\"\nresults_dir = \"{}\"", results.display()),
        );
    let cfg = config::parse(&text, Path::new("skip.toml")).expect("config");
    let out = bench::run(&cfg).expect("bench run");
    assert!(out.rows.is_empty());
    assert_eq!(out.info.skipped.len(), 1);
    assert!(out.info.skipped[0].reason.contains("available"), "{:?}", out.info.skipped);
    let md = std::fs::read_to_string(results.join("efficiency.md")).expect("md");
    assert!(md.contains("Not run"), "{md}");
}

#[test]
fn the_efficiency_config_parses_and_bad_keys_are_named() {
    let path = root().join("configs/efficiency.toml");
    let cfg = config::load(&path).expect("configs/efficiency.toml");
    let shapes = cfg.shapes().expect("shapes");
    assert_eq!(shapes[0].dims.text_hidden, 4096);
    assert_eq!(shapes[1].dims.text_layers, 40);
    assert_eq!(cfg.model.schemes, Scheme::ALL.to_vec());
    assert_eq!(
        cfg.model.packed_parts,
        [
            scheme::Part::Decoder,
            scheme::Part::Vision,
            scheme::Part::Projector,
            scheme::Part::LmHead
        ]
    );

    let cases = [
        (TINY.replace("w4_group = 128", "w4_group = 128\ngroup = 1"), "unknown field `group`"),
        (TINY.replace("decode_tokens = 2", "decode_tokens = 0"), "measure.decode_tokens"),
        (TINY.replace("shapes = [\"tiny\"]", "shapes = [\"llava-70b\"]"), "model.shapes"),
        (TINY.replace("\"w4a4\"]", "\"w3a16\"]"), "w3a16"),
        (TINY.replace("rounds = 2", "rounds = 0"), "measure.rounds"),
        (TINY.replace("w4_group = 128", "w4_group = 64"), "multiples of 128"),
        (TINY.replace("rounds = 2", "rounds = 16"), "measure.rounds"),
        (TINY.replace("w4_group = 128", "w4_group = 96"), "model.w4_group"),
        (TINY.replace("text_heads = 4", "text_heads = 3"), "shape[0]"),
        (TINY.replace("fp32_layers = 1", "fp32_layers = 0"), "model.fp32_layers"),
        (
            TINY.replace("fp32_layers = 1", "fp32_layers = 1\npartial_layers = 0"),
            "model.partial_layers",
        ),
        (
            TINY.replace("w4_group = 128", "w4_group = 128\npacked_parts = [\"vision\"]"),
            "model.packed_parts",
        ),
        (
            TINY.replace(
                "w4_group = 128",
                "w4_group = 128\npacked_parts = [\"decoder\", \"decoder\"]",
            ),
            "model.packed_parts",
        ),
        (
            TINY.replace(
                "w4_group = 128",
                "w4_group = 128\npacked_parts = [\"decoder\", \"vision\"]",
            ),
            "vision inputs (64)",
        ),
        (
            TINY.replace(
                "w4_group = 128",
                "w4_group = 128\npacked_parts = [\"decoder\", \"kv_cache\"]",
            ),
            "kv_cache",
        ),
    ];
    for (text, expected) in cases {
        let err = config::parse(&text, Path::new("bad.toml")).expect_err(expected);
        let msg = format!("{err:#}");
        assert!(msg.contains(expected) && msg.contains("bad.toml"), "{expected}: {msg}");
    }
}

/// A tiny Qwen2-VL shape: its ViT, merger and Qwen2 decoder (grouped-query attention, q/k/v
/// bias, M-RoPE) are built, packed and timed like LLaVA's; the whole-model bytes equal the
/// shape's analytic parameter count (so the build and the count agree), also when FP32 is built
/// with one of two layers and extrapolated (a layer's biases included), and a prefill with an
/// image feeds its merged tokens.
#[test]
fn bench_runs_a_qwen2_vl_shape_with_exact_bytes() {
    let results = scratch("tiny-qwen2vl");
    let text = TINY
        .replace("name = \"tiny-bench\"", &format!("name = \"tiny-qwen\"\nresults_dir = \"{}\"", results.display()))
        .replace(
            "schemes = [\"fp32\", \"bf16\", \"bf16_own\", \"w8a16\", \"w8a8\", \"w4a16_libtorch\", \"w4a16\", \"w4a16_vnni\", \"w4a8\", \"w4a4\"]",
            "schemes = [\"fp32\", \"bf16\", \"w8a8\", \"w4a16_libtorch\"]\npacked_parts = [\"decoder\", \"vision\", \"projector\", \"lm_head\"]",
        )
        .replace("rounds = 2", "rounds = 1\nprefill_image = true")
        .replace("name = \"tiny\"\n", "name = \"tiny\"\nfamily = \"qwen2_vl\"\ntext_kv_heads = 2\n")
        .replace("vision_hidden = 64", "vision_hidden = 128")
        .replace("vision_intermediate = 128", "vision_intermediate = 256")
        .replace("image_size = 28", "image_size = 56");
    let cfg = config::parse(&text, Path::new("tiny-qwen.toml")).expect("config");
    let out = bench::run(&cfg).expect("bench run");
    let schemes: Vec<Scheme> = out.rows.iter().map(|r| r.scheme).collect();
    assert_eq!(schemes, [Scheme::Fp32, Scheme::Bf16, Scheme::W8a8, Scheme::W4a16Libtorch]);
    let params = cfg.shapes().expect("shapes")[0].dims.parameters(2);
    let row = |s: Scheme| out.rows.iter().find(|r| r.scheme == s).expect("row");
    assert_eq!(row(Scheme::Bf16).weight_bytes, 2 * params);
    assert!(row(Scheme::Fp32).extrapolated());
    assert_eq!(row(Scheme::Fp32).weight_bytes, 4 * params);
    // q and o [256, 256], k and v [128, 256] (2 of 4 heads), gate/up [512, 256], down [256, 512].
    let shapes: Vec<(i64, i64)> =
        [(256, 256), (128, 256), (128, 256), (256, 256), (512, 256), (512, 256), (256, 512)]
            .repeat(2);
    let dense: i64 = shapes.iter().map(|(o, i)| o * i * 2).sum();
    assert_eq!(row(Scheme::Bf16).decoder_linear_bytes, dense);
    let w4: i64 = shapes.iter().map(|(o, i)| o * i / 2 + o * (i / 128) * (4 + 1)).sum();
    assert_eq!(row(Scheme::W4a16Libtorch).decoder_linear_bytes, w4);
    for r in &out.rows {
        assert_eq!(r.fallback_linears, 0, "{}: {}", r.label, r.kernel);
        // 8 text tokens and one 56 px image: 4×4 patches merged 2×2 into 4 tokens.
        assert_eq!(r.prefill_positions, 12, "{}", r.label);
        assert!(r.prefill.vision_ms > 0.0 && r.decode.total_ms() > 0.0, "{}", r.label);
    }
    // The fused decode step continues after the image on the plain rotation at the text
    // position (M-RoPE's three equal components): it agrees with the libtorch step, f32 to
    // summation order and bf16 within two bf16 roundings (the fused module's tests).
    let fused_diff = |s: Scheme| row(s).fused_max_rel_diff.expect("fused ran on the CPU");
    assert!(fused_diff(Scheme::Fp32) <= 1e-5, "FP32: {}", fused_diff(Scheme::Fp32));
    assert!(fused_diff(Scheme::Bf16) <= 1.0 / 64.0, "BF16: {}", fused_diff(Scheme::Bf16));
}

/// `[[checkpoint]]`: a compressed-tensors directory written by the library itself (the core
/// import fixtures) is loaded as stored and timed, then its packed linears (only those) as bf16
/// on the own kernel: the same weights' fair 16-bit row, with exact bytes on both.
#[test]
fn bench_times_a_compressed_tensors_checkpoint_as_stored_and_as_bf16() {
    let results = scratch("checkpoint");
    let fixtures = root().join("crates/core/tests/fixtures/compressed");
    let text = format!(
        r#"
[bench]
name = "tiny-checkpoint"
device = "cpu"
threads = 1
results_dir = "{results}"

[model]
memory_headroom_gib = 0.0
shapes = []

[measure]
prefill_tokens = 8
warmup_tokens = 1
decode_tokens = 2
rounds = 2

[bandwidth]
mib = 16
repeats = 2

[[checkpoint]]
name = "ct-w4a16"
path = "{w4}"

[[checkpoint]]
name = "ct-w8a8-static"
path = "{w8}"
"#,
        results = results.display(),
        w4 = fixtures.join("w4a16_g32_sym").display(),
        w8 = fixtures.join("w8a8_static").display(),
    );
    let cfg = config::parse(&text, Path::new("tiny-checkpoint.toml")).expect("config");
    let out = bench::run(&cfg).expect("bench run");
    let own = bf16_own::available();
    let want: Vec<(&str, Scheme)> = ["ct-w4a16", "ct-w8a8-static"]
        .into_iter()
        .flat_map(|m| {
            let mut v = vec![(m, Scheme::Stored)];
            if own {
                v.push((m, Scheme::Bf16Own));
            }
            v
        })
        .collect();
    let got: Vec<(&str, Scheme)> = out.rows.iter().map(|r| (r.shape.as_str(), r.scheme)).collect();
    assert_eq!(got, want);
    // Decoder linears per layer (hidden 64, 4 heads of which 2 key/value, intermediate 128):
    // q, k, v, o, gate, up, down; 2 layers.
    let shapes: Vec<(i64, i64)> =
        [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)].repeat(2);
    let bf16: i64 = shapes.iter().map(|(o, i)| o * i * 2).sum();
    // int4 symmetric groups of 32: nibbles and one f32 scale per group; int8 per channel: bytes
    // and one f32 scale per row, and the static activation scale (4 bytes).
    let w4: i64 = shapes.iter().map(|(o, i)| o * i / 2 + o * (i / 32) * 4).sum();
    let w8: i64 = shapes.iter().map(|(o, i)| o * i + o * 4 + 4).sum();
    let row =
        |m: &str, s: Scheme| out.rows.iter().find(|r| r.shape == m && r.scheme == s).expect("row");
    assert_eq!(row("ct-w4a16", Scheme::Stored).decoder_linear_bytes, w4);
    assert_eq!(row("ct-w8a8-static", Scheme::Stored).decoder_linear_bytes, w8);
    for r in &out.rows {
        assert_eq!((r.layers, r.layers_built), (2, 2), "{}", r.label);
        assert!(r.decode.total_ms() > 0.0 && r.prefill.total_ms() > 0.0, "{}", r.label);
        assert_eq!(r.round_decode_ms.len(), 2, "{}", r.label);
    }
    if own {
        for (m, stored) in [("ct-w4a16", w4), ("ct-w8a8-static", w8)] {
            let (s, b) = (row(m, Scheme::Stored), row(m, Scheme::Bf16Own));
            assert_eq!(b.decoder_linear_bytes, bf16, "{m}");
            // Only the decoder linears change between the two rows (vision, projector and
            // lm_head are dense in both fixtures).
            assert_eq!(b.weight_bytes - s.weight_bytes, bf16 - stored, "{m}");
            assert!(b.kernel.starts_with("bf16_"), "{m}: {}", b.kernel);
            assert_eq!(s.round_speedup_16bit.len(), 2, "{m}: paired ratios");
        }
    }
    let table = std::fs::read_to_string(out.dir.join("efficiency.md")).expect("table");
    assert!(table.contains("as stored") && table.contains("Checkpoints"), "{table}");

    // Without `model.shapes`, a config with checkpoints times only them (no default llava-7b).
    let only = config::parse(&text.replace("shapes = []\n", ""), Path::new("o.toml")).expect("cfg");
    assert!(only.model.shapes.is_empty());
    // `stored` is not a scheme for shapes; a checkpoint without config.json is named.
    let bad = text.replace("shapes = []", "shapes = []\nschemes = [\"stored\"]");
    let err = format!("{:#}", config::parse(&bad, Path::new("b.toml")).expect_err("stored"));
    assert!(err.contains("model.schemes") && err.contains("checkpoint"), "{err}");
    let bad = text.replace(&fixtures.join("w8a8_static").display().to_string(), "/nonexistent");
    let err = format!("{:#}", config::parse(&bad, Path::new("b.toml")).expect_err("path"));
    assert!(err.contains("checkpoint[1].path") && err.contains("config.json"), "{err}");
}
