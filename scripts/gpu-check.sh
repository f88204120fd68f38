#!/usr/bin/env bash
# The GPU check (issue #21, item 5): what the CUDA paths do on a machine where nvidia-smi shows a
# GPU, in under 10 minutes, written to results/gpu-check/report.md. Run from anywhere:
#     scripts/gpu-check.sh
#  0. refuses (exit 2, nothing run) without nvidia-smi or without a GPU in its list; records
#     nvidia-smi, the git revision and the date;
#  1. `make bootstrap`, then checks that the wheel's torch can use the GPU (CUDA 13 needs a recent
#     driver: better said here than by every later step);
#  2. builds the workspace with every crate's `cuda` feature, in the dev profile that `cargo test`
#     and `make reproduce` use: the binaries and core's test binary;
#  3. runs the CUDA tests by name (CUDA_TESTS below); a name that runs no test fails the step;
#  4. LLaVA parity on the device: `experiments generate --device cuda --dump-logits` on the
#     committed transformers fixtures in f32, bf16 and f16, against the fixtures' logits at the
#     parity tests' own tolerances (read from llava_parity.rs);
#  5. one search cell on the scaling series' s2 (python/gen_scaling_series.py: ~60M parameters,
#     256 image tokens, random weights): easy-VQA (50 questions), W4A4, `sequential`, 8
#     calibration pairs, device = "cuda";
#  6. the efficiency bench's CUDA rows on the LLaVA-7B shape, from a config derived from
#     configs/efficiency.toml (device = "cuda", the schemes that have a CUDA path).
# Every step runs under `timeout` with its budget (BUDGET below; they sum to under 10 minutes, and
# no step starts past the deadline); a step whose prerequisite failed is reported as not run,
# never skipped silently. The configs go to a temporary folder (copies kept with the results).
# Results: results/gpu-check/ (report.md, logs/, cell/, bench/); a previous run's folder is moved to
# results/gpu-check.prev. Exit status: 0 every step passed, 1 a step did not, 2 no GPU.
# The budgets assume a bootstrapped .venv and a warm cargo cache (crates.io and pip need the network
# on a fresh machine): otherwise run `make bootstrap` and the build command of the report first.
set -euo pipefail
[ -n "${EPOCHREALTIME:-}" ] || { echo "gpu-check: needs bash 5 or later (EPOCHREALTIME)" >&2; exit 1; }
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
ROOT=$PWD

CARGO=${CARGO:-cargo}
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
OUT=$ROOT/results/gpu-check
LOGS=$OUT/logs
PARTS=$OUT/parts
EXE=$ROOT/target/debug/experiments  # replaced by the path the build step reports
PY=$ROOT/.venv/bin/python
# experiments/cuda turns on qvlm-search/cuda and qvlm-core/cuda. Every cargo command below uses the
# same packages and features, so the test step reuses the build step's artifacts.
FEATURES=experiments/cuda
# --keep-going: a compile error in the cuda-only tests must not stop the binary the other steps use.
BUILD=("$CARGO" build --workspace --locked --features "$FEATURES" --bins --test core_tests --keep-going)

STEPS=(bootstrap torch_cuda build tests parity model cell bench)
declare -A TITLE=(
    [bootstrap]="make bootstrap"
    [torch_cuda]="the wheel's torch sees the GPU"
    [build]="build with the cuda features"
    [tests]="CUDA tests"
    [parity]="LLaVA parity on CUDA"
    [model]="scaling model s2"
    [cell]="search cell: s2, W4A4, sequential"
    [bench]="bench: CUDA rows, LLaVA-7B shape"
)
# Seconds per step; they sum to DEADLINE. The bench's largest cost is on the CPU: libtorch's serial
# randint draws the random codes of every packed weight (~10^10 of them for W8 and W4, ~50 s).
declare -A BUDGET=(
    [bootstrap]=30 [torch_cuda]=25 [build]=240 [tests]=40
    [parity]=40 [model]=30 [cell]=60 [bench]=125
)
# What a step needs: steps that passed, and (built:TARGET) what the build step produced.
declare -A NEEDS=(
    [torch_cuda]=bootstrap [build]=bootstrap [model]=bootstrap
    [tests]="torch_cuda built:core_tests" [parity]="torch_cuda built:experiments"
    [cell]="torch_cuda built:experiments model" [bench]="torch_cuda built:experiments"
)
DEADLINE=590   # no step runs past this many seconds from the start
KILL_GRACE=5   # a timed-out step gets SIGTERM, then SIGKILL this much later

# The CUDA tests: "<test binary>|<full test path>|<why>". All of them need a GPU; each runs with
# --exact, alone, timed.
CUDA_TESTS=(
    "core_tests|core::quant_kernels::cuda_kernels_match_the_references|tinygemm int4 (\`_weight_int4pack_mm\`), int8 weight-only (\`_weight_int8pack_mm\`) and \`_int_mm\` (decode rows padded to 17) on the device against the dequantized and fake-quant references; the int4 kernel also against its bf16 emulation"
)

# Parity cases: "<fixture> <dtype> <expected tensor> <tolerance constant in llava_parity.rs>" —
# the pairs the CPU parity tests check (their f32, bf16 and f16 tests), here on the device.
PARITY_CASES=(
    "hf_mha_mlp f32 logits LOGITS_ATOL_F32"
    "hf_gqa_full f32 logits LOGITS_ATOL_F32"
    "hf_prefixed_sharded f32 logits LOGITS_ATOL_F32"
    "hf_gqa_full bf16 logits_bf16 LOGITS_ATOL_BF16"
    "hf_mha_mlp f16 logits LOGITS_ATOL_F16_VS_F32"
)
FIXTURES=crates/core/tests/fixtures/llava
PARITY_SRC=crates/core/tests/core/llava_parity.rs

now_us() { local t=${EPOCHREALTIME/[.,]/}; echo "$t"; }
secs_since() {
    local d=$(($(now_us) - $1))
    printf '%d.%d' $((d / 1000000)) $(((d % 1000000) / 100000))
}
say() { echo "gpu-check: $*" >&2; }

# ---- the steps (each runs as `gpu-check.sh __step NAME` under timeout, output in logs/NAME.log;
# each writes parts/NAME.md for the report and parts/NAME.line, its key numbers in one line) ----

step_bootstrap() {
    make bootstrap 2>&1 | tee "$TMP/bootstrap.out"
    grep '^bootstrap:' "$TMP/bootstrap.out" | sed 's/^/- /' >"$PARTS/bootstrap.md" || true
    sed -n 's/^bootstrap: ok (\(.*\))$/\1/p' "$TMP/bootstrap.out" >"$PARTS/bootstrap.line"
}

step_torch_cuda() {
    "$PY" - "$PARTS/torch_cuda.md" "$PARTS/torch_cuda.line" "$TMP/gpu_mem_gib" <<'EOF'
import sys
import torch

part, line, mem = sys.argv[1:4]
ok = torch.cuda.is_available()
lines = [f"- torch {torch.__version__} (CUDA {torch.version.cuda}); torch.cuda.is_available(): {ok}"]
if ok:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"- CUDA device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                     f"compute capability {p.major}.{p.minor}")
    x = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
    ok = (x @ x.T).sum().item() == 105.0
    lines.append(f"- a 2x3 matmul on device 0: {'right' if ok else 'WRONG'}")
    with open(mem, "w") as f:
        f.write(f"{torch.cuda.get_device_properties(0).total_memory // 2**30}\n")
    summary = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} CUDA {torch.version.cuda}"
else:
    lines.append("- the driver may be too old for this CUDA build (nvidia-smi's header gives the "
                 "highest CUDA version the driver supports), or CUDA_VISIBLE_DEVICES hides the GPU")
    summary = "torch sees no usable CUDA device"
open(part, "w").write("\n".join(lines) + "\n")
open(line, "w").write(summary + "\n")
sys.exit(0 if ok else 1)
EOF
}

step_build() {
    local rc=0 target built=()
    printf -- "- \`%s\`\n" "${BUILD[*]}" >"$PARTS/build.md"
    # Artifacts as JSON on stdout (fresh ones included), diagnostics as text on stderr.
    "${BUILD[@]}" --message-format=json-render-diagnostics >"$TMP/build.json" || rc=$?
    for target in experiments core_tests; do
        # The binary's "executable" is <target dir>/debug/experiments, the test's
        # <target dir>/debug/deps/core_tests-<hash>; the file holds its path.
        if grep -m 1 -o "\"executable\":\"[^\"]*/${target}[-\"][^\"]*" "$TMP/build.json" |
            cut -d'"' -f4 | grep . >"$TMP/built-$target"; then
            built+=("$target built")
        else
            rm -f "$TMP/built-$target"
            built+=("$target NOT built")
        fi
    done
    printf '%s, ' "${built[@]}" | sed 's/, $/\n/' >"$PARTS/build.line"
    printf -- '- %s\n' "${built[@]}" >>"$PARTS/build.md"
    return "$rc"
}

step_tests() {
    local part=$PARTS/tests.md entry bin name why log t0 rc passed status ok=0 n=0 failed=0
    printf '| test | what it checks | status | seconds |\n|---|---|---|---|\n' >"$part"
    for entry in "${CUDA_TESTS[@]}"; do
        IFS='|' read -r bin name why <<<"$entry"
        n=$((n + 1))
        log=$LOGS/tests-$n.log
        t0=$(now_us)
        rc=0
        echo "== $CARGO test --workspace --locked --features $FEATURES --test $bin -- --exact $name"
        "$CARGO" test --workspace --locked --features "$FEATURES" --test "$bin" -- --exact "$name" \
            >"$log" 2>&1 || rc=$?
        cat "$log"
        passed=$(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed.*/\1/p' "$log" |
            awk '{s += $1} END {print s + 0}')
        if [ "$rc" -eq 0 ] && [ "$passed" -ge 1 ]; then
            status=PASS
            ok=$((ok + 1))
        elif [ "$rc" -eq 0 ]; then
            status="MISSING: no test ran (renamed, removed, or not compiled with the cuda feature?)"
            failed=1
        else
            status="FAIL (exit $rc; logs/tests-$n.log)"
            failed=1
        fi
        printf "| \`%s\` | %s | %s | %s |\n" "$name" "$why" "$status" "$(secs_since "$t0")" >>"$part"
        if [ "$status" != PASS ] && grep -q -E "panicked at|^error" "$log"; then
            {
                echo
                echo "\`$name\`:"
                echo '```'
                grep -A4 -E "panicked at|^error" "$log" | head -n 20
                echo '```'
            } >>"$part.after"
        fi
    done
    [ ! -f "$part.after" ] || { cat "$part.after" >>"$part"; rm -f "$part.after"; }
    echo "$ok of $n passed" >"$PARTS/tests.line"
    return "$failed"
}

step_parity() {
    local case fixture dtype key tol_name tol prompt image rc failed=0 tolerances=()
    : >"$TMP/parity.cases"
    for case in "${PARITY_CASES[@]}"; do
        read -r fixture dtype key tol_name <<<"$case"
        tol=$(sed -n "s/^const $tol_name: f64 = \(.*\);\$/\1/p" "$PARITY_SRC")
        [ -n "$tol" ] || { echo "no const $tol_name in $PARITY_SRC" >&2; return 1; }
        case " ${tolerances[*]} " in *" $tol_name=$tol "*) ;; *) tolerances+=("$tol_name=$tol") ;; esac
        prompt=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["prompt"], end="")' \
            "$FIXTURES/$fixture/expected.json")
        image=$FIXTURES/$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["image"], end="")' \
            "$FIXTURES/$fixture/expected.json")
        echo "== $fixture $dtype"
        rc=0
        "$EXE" generate --model "$FIXTURES/$fixture" --image "$image" --prompt "$prompt" \
            --template none --max-new-tokens 8 --device cuda --dtype "$dtype" \
            --dump-logits "$TMP/parity-$fixture-$dtype.safetensors" || rc=$?
        echo "$fixture $dtype $key $tol $rc" >>"$TMP/parity.cases"
    done
    "$PY" - "$TMP" "$FIXTURES" "$PARTS/parity.md" "$PARTS/parity.line" <<'EOF' || failed=1
import os, sys
from safetensors.numpy import load_file

tmp, fixtures, part, line = sys.argv[1:5]
rows, bad = [], 0
for case in open(os.path.join(tmp, "parity.cases")):
    fixture, dtype, key, tol, rc = case.split()
    dump = os.path.join(tmp, f"parity-{fixture}-{dtype}.safetensors")
    want = load_file(os.path.join(fixtures, fixture, "expected.safetensors"))[key]
    if rc != "0" or not os.path.exists(dump):
        rows.append((fixture, dtype, key, "–", tol, f"FAIL: generate exited {rc} (logs/parity.log)"))
        bad += 1
        continue
    got = load_file(dump)["logits"]
    if got.shape != want.shape:
        rows.append((fixture, dtype, key, "–", tol, f"FAIL: shape {list(got.shape)} vs {list(want.shape)}"))
        bad += 1
        continue
    d = float(abs(got.astype("float64") - want.astype("float64")).max())
    ok = d <= float(tol)
    bad += not ok
    rows.append((fixture, dtype, key, f"{d:.3g}", tol, "PASS" if ok else "FAIL"))
out = ["| fixture | dtype | against | max abs Δ logits | tolerance | status |", "|---|---|---|---|---|---|"]
out += ["| " + " | ".join(r) + " |" for r in rows]
if any(r[1] == "f32" and r[5] == "FAIL" for r in rows):
    out.append("\nAn f32 miss of about 1e-4–1e-3 with bf16 and f16 passing may point at TF32 "
               "(cuDNN's convolutions, such as CLIP's patch embedding, may use it by default) rather than at the model.")
open(part, "w").write("\n".join(out) + "\n")
worst = {dt: max((float(r[3]) for r in rows if r[1] == dt and r[3] != "–"), default=float("nan"))
         for dt in ("f32", "bf16", "f16")}
open(line, "w").write(f"{len(rows) - bad} of {len(rows)} within tolerance; worst Δ "
                      + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()) + "\n")
sys.exit(1 if bad else 0)
EOF
    printf "\nTolerances from \`%s\`: %s.\n" "$PARITY_SRC" "${tolerances[*]}" >>"$PARTS/parity.md"
    return "$failed"
}

step_model() {
    [ -f python/gen_scaling_series.py ] || { echo "python/gen_scaling_series.py is missing" >&2; return 1; }
    "$PY" python/gen_scaling_series.py --sizes s2 --out models/scaling
    "$PY" - models/scaling/s2/scaling.json "$PARTS/model.md" "$PARTS/model.line" <<'EOF'
import json, sys

meta = json.load(open(sys.argv[1]))
p = meta["parameters"]
text = (f"{p['total'] / 1e6:.1f}M parameters (language {p['language'] / 1e6:.1f}M, vision "
        f"{p['vision'] / 1e6:.1f}M, projector {p['projector'] / 1e6:.1f}M), "
        f"{meta['image_tokens']} image tokens, random weights (seed {meta['seed']})")
open(sys.argv[2], "w").write(f"- models/scaling/s2: {text}\n")
open(sys.argv[3], "w").write(text + "\n")
EOF
}

step_cell() {
    local cfg=$TMP/cell.toml
    cat >"$cfg" <<EOF
# Written by scripts/gpu-check.sh: one search cell on the GPU (a copy is kept in $OUT).
[experiment]
name = "gpu-check-cell"
description = "GPU check: one search cell on the scaling series' s2"
device = "cuda"
seed = 0
results_dir = '$OUT/cell'

[[models]]
name = "s2"
path = '$ROOT/models/scaling/s2'

[dataset]
kind = "easy_vqa"
limit = 50

[calibration]
samples = 8

[grid]
models = ["s2"]
bits = ["W4A4"]
methods = ["sequential"]
include_float = false
EOF
    cp "$cfg" "$OUT/cell.toml"
    "$EXE" "$cfg"
    "$PY" - "$OUT/cell" "$PARTS/cell.md" "$PARTS/cell.line" <<'EOF'
import csv, json, os, re, sys

root, part, line = sys.argv[1:4]
cells = sorted(d for d in os.listdir(os.path.join(root, "cells"))
               if re.fullmatch(r"[0-9a-f]{12}", d) and os.path.isfile(os.path.join(root, "cells", d, "metrics.csv")))
if len(cells) != 1:
    sys.exit(f"expected one finished cell in {root}/cells, found {len(cells)}")
cell = os.path.join(root, "cells", cells[0])
rows = list(csv.DictReader(open(os.path.join(cell, "metrics.csv"))))
m = {r["metric"]: r["value"] for r in rows}
t = json.load(open(os.path.join(cell, "timings.json")))
man = json.load(open(os.path.join(cell, "manifest.json")))
on_cuda = str(man.get("device", "")).startswith("Cuda")
acc = float(m.get("accuracy", "nan"))
lines = [
    f"- cell `{cells[0]}` ({rows[0]['model']}, {rows[0]['bits']}, {rows[0]['method']}): device "
    f"`{man.get('device')}`{'' if on_cuda else ' — NOT CUDA'}, calibration pairs "
    f"{man.get('calibration_samples_used')} of {man.get('calibration_samples_requested')}",
    f"- accuracy {acc:.2f} % on {m.get('questions', '?')} questions (random weights: the number "
    "only has to be finite), KL vs float " + m.get("kl_vs_float", "–"),
    "- " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(t.items()) if k.endswith("_seconds")),
    "- every metric: " + ", ".join(f"{k} = {v}" for k, v in m.items()),
]
open(part, "w").write("\n".join(lines) + "\n")
open(line, "w").write(f"accuracy {acc:.2f}, search_seconds {t.get('search_seconds', float('nan')):.1f}, "
                      f"eval_seconds {t.get('eval_seconds', float('nan')):.1f}\n")
sys.exit(0 if on_cuda else "the cell did not run on CUDA")
EOF
}

step_bench() {
    local cfg=$TMP/bench.toml mem
    mem=$(cat "$TMP/gpu_mem_gib")
    "$PY" - configs/efficiency.toml "$cfg" "$OUT/bench" "$mem" "$PARTS/bench.md" <<'EOF'
import json, sys, tomllib

src, dst, results_dir, mem, part = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
cfg = tomllib.load(open(src, "rb"))
# No CUDA path: bf16_own is the CPU's own kernel (the bench lists it as not run off the CPU);
# w4a16_libtorch forces libtorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`).
cpu_only = {"bf16_own", "w4a16_libtorch"}
model = dict(cfg.get("model", {}))
schemes = model.get("schemes", ["fp32", "bf16", "bf16_own", "w8a16", "w8a8", "w4a16_libtorch", "w4a16"])
model["schemes"] = [s for s in schemes if s not in cpu_only]
model["shapes"] = ["llava-7b"]
notes = [f"- from `{src}`: shapes = [\"llava-7b\"], schemes = {json.dumps(model['schemes'])} "
         f"(left out: {', '.join(sorted(cpu_only & set(schemes))) or 'none'}, CPU only), device = \"cuda\""]
if mem >= 40 and "fp32_layers" in model:
    del model["fp32_layers"]
    notes.append(f"- FP32 built in full (the GPU has {mem} GiB; efficiency.toml's fp32_layers is for a 24 GB CPU)")
elif "fp32_layers" in model:
    notes.append(f"- FP32 with fp32_layers = {model['fp32_layers']} (the GPU has {mem} GiB), extrapolated per layer")
bench = dict(cfg["bench"], name="gpu-check-bench", device="cuda", results_dir=results_dir,
             description="GPU check: the CUDA rows of the efficiency bench on the LLaVA-7B shape")
out = [f"# Written by scripts/gpu-check.sh from {src}: the CUDA rows on the LLaVA-7B shape."]
for name, table in (("bench", bench), ("model", model), ("measure", cfg.get("measure", {})),
                    ("bandwidth", cfg.get("bandwidth", {}))):
    out.append(f"\n[{name}]")
    out += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in table.items()]
open(dst, "w").write("\n".join(out) + "\n")
open(part, "w").write("\n".join(notes) + "\n")
EOF
    cp "$cfg" "$OUT/bench.toml"
    "$EXE" bench "$cfg"
    "$PY" - "$OUT/bench" "$cfg" "$PARTS/bench.md" "$PARTS/bench.line" <<'EOF'
import csv, json, os, sys, tomllib


def short(v):
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return v


root, cfg, part, line = sys.argv[1:5]
want_schemes = tomllib.load(open(cfg, "rb"))["model"]["schemes"]
text = open(os.path.join(root, "efficiency.csv")).read()
rows = list(csv.DictReader(text.splitlines()))
device = json.load(open(os.path.join(root, "run.json")))["machine"]["device"]
expected = {"FP32": "dense", "BF16": "dense", "W8A16": "int8_weight", "W8A8": "int8_int8"}
problems = [] if device.startswith("Cuda") else [f"the bench ran on {device}, not CUDA"]
out = ["", "| scheme | kernel | decode ms/token | prefill ms | weights GiB | decode GB/s | roof GB/s | roof % | note |",
       "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    label, kernel = r["scheme"], r["kernel"]
    want = "int4_cuda" if label.startswith("W4A16") else expected.get(label)
    if kernel == "–":
        problems.append(f"{label} was not run: {r['note']}")
    elif want and kernel != want:
        problems.append(f"{label} ran on `{kernel}`, not `{want}`")
    if "dequantized fallback" in r["note"]:
        problems.append(f"{label}: {r['note']}")
    cols = ("scheme", "kernel", "decode_ms", "prefill_ms", "weights_gib", "decode_gb_s", "roof_gb_s", "roof_pct", "note")
    out.append("| " + " | ".join(short(r.get(k, "")) for k in cols) + " |")
if len(rows) != len(want_schemes):
    problems.append(f"{len(rows)} rows for {len(want_schemes)} schemes")
out += ["", "efficiency.csv (all columns; efficiency.md beside it has the table and its notes):", "```", text.rstrip(), "```"]
out += [f"- PROBLEM: {p}" for p in problems]
open(part, "a").write("\n".join(out) + "\n")
decode = {r["scheme"]: r["decode_ms"] for r in rows if r["decode_ms"]}
open(line, "w").write("decode ms/token: " + ", ".join(f"{k} {float(v):.2f}" for k, v in decode.items()) + "\n")
sys.exit(1 if problems else 0)
EOF
}

# ---- the driver ----

if [ "${1:-}" = __step ]; then
    TMP=${GPU_CHECK_TMP:?internal: GPU_CHECK_TMP unset}
    [ ! -s "$TMP/built-experiments" ] || EXE=$(cat "$TMP/built-experiments")
    case " ${STEPS[*]} " in *" ${2:-} "*) ;; *) echo "gpu-check: unknown step ${2:-}" >&2; exit 2 ;; esac
    "step_$2"
    exit 0
fi
[ $# -eq 0 ] || { echo "usage: scripts/gpu-check.sh (no arguments; see the comment at its top)" >&2; exit 2; }

# 0. A GPU, or nothing is run.
if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
    say "no nvidia-smi on PATH: this check needs a machine with an NVIDIA GPU and its driver; nothing was run"
    exit 2
fi
if ! gpus=$("$NVIDIA_SMI" -L 2>&1); then
    say "nvidia-smi failed, so no GPU is usable; nothing was run. It said: $gpus"
    exit 2
fi
if ! grep -q '^GPU [0-9]' <<<"$gpus"; then
    say "nvidia-smi lists no GPU; nothing was run. It said: ${gpus:-nothing}"
    exit 2
fi

T0=$(now_us)
if [ -e "$OUT" ]; then
    rm -rf "$OUT.prev"
    mv "$OUT" "$OUT.prev"
fi
mkdir -p "$LOGS" "$PARTS"
TMP=$(mktemp -d /tmp/qvlm-gpu-check.XXXXXX)
export GPU_CHECK_TMP=$TMP
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

"$NVIDIA_SMI" >"$OUT/nvidia-smi.txt" 2>&1 || true
"$NVIDIA_SMI" --query-gpu=index,name,driver_version,memory.total --format=csv,noheader \
    >"$OUT/gpus.csv" 2>&1 || true
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
REV=$(git rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")
DIRTY=$( (git status --porcelain 2>/dev/null || true) | wc -l)

declare -A STATUS=() TOOK=()
FAILED=0

write_report() {
    local s
    {
        echo "# GPU check, $STARTED"
        echo
        echo "\`scripts/gpu-check.sh\` at \`$REV\`$([ "$DIRTY" -eq 0 ] || echo " with $DIRTY uncommitted changes")," \
            "on $(uname -n) ($(nproc) CPU cores); $(secs_since "$T0") s of the ${DEADLINE} s budget."
        echo
        echo "GPUs (nvidia-smi: index, name, driver, memory):"
        echo
        sed 's/^/- /' "$OUT/gpus.csv"
        echo
        echo "| step | status | seconds (budget) | key numbers |"
        echo "|---|---|---|---|"
        for s in "${STEPS[@]}"; do
            echo "| ${TITLE[$s]} | ${STATUS[$s]:-not reached} | ${TOOK[$s]:-–} (${BUDGET[$s]}) |" \
                "$(cat "$PARTS/$s.line" 2>/dev/null || echo –) |"
        done
        for s in "${STEPS[@]}"; do
            [ -f "$PARTS/$s.md" ] || [ -s "$LOGS/$s.log" ] || continue
            echo
            echo "## ${TITLE[$s]}: ${STATUS[$s]}"
            echo
            [ ! -f "$PARTS/$s.md" ] || cat "$PARTS/$s.md"
            if [ "${STATUS[$s]}" != PASS ] && [ -s "$LOGS/$s.log" ]; then
                echo
                echo "Last lines of \`logs/$s.log\`:"
                echo '```'
                tail -n 25 "$LOGS/$s.log"
                echo '```'
            fi
        done
        echo
        echo "## nvidia-smi"
        echo
        echo '```'
        cat "$OUT/nvidia-smi.txt"
        echo '```'
    } >"$OUT/report.md.tmp"
    mv "$OUT/report.md.tmp" "$OUT/report.md"
}

run_step() {
    local name=$1 need left limit t0 rc=0
    for need in ${NEEDS[$name]:-}; do
        case $need in
            built:*) [ -f "$TMP/built-${need#built:}" ] && continue ;;
            *) [ "${STATUS[$need]:-}" = PASS ] && continue ;;
        esac
        STATUS[$name]="NOT RUN: needs ${need/built:/a build of }"
        FAILED=1
        return
    done
    left=$((DEADLINE - ($(now_us) - T0) / 1000000 - KILL_GRACE))
    limit=${BUDGET[$name]}
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 5 ]; then
        STATUS[$name]="NOT RUN: the ${DEADLINE} s deadline is spent"
        FAILED=1
        return
    fi
    say "${TITLE[$name]} (at most $limit s; log: $LOGS/$name.log)"
    t0=$(now_us)
    timeout --kill-after="$KILL_GRACE" "$limit" "$SELF" __step "$name" >"$LOGS/$name.log" 2>&1 || rc=$?
    TOOK[$name]=$(secs_since "$t0")
    case $rc in
        0) STATUS[$name]=PASS ;;
        124 | 137) STATUS[$name]="TIMEOUT after $limit s" ;;
        *) STATUS[$name]="FAIL (exit $rc)" ;;
    esac
    [ "$rc" -eq 0 ] || FAILED=1
    say "  ${STATUS[$name]} in ${TOOK[$name]} s"
}

for step in "${STEPS[@]}"; do
    run_step "$step"
    write_report
done
say "report: $OUT/report.md"
if [ "$FAILED" -ne 0 ]; then
    say "some steps did not pass: see the report"
    exit 1
fi
say "every step passed"
