#!/usr/bin/env bash
# make test-slurm: a grid run as a Slurm job array on a real single-node Slurm (started by
# scripts/slurm-local.sh, stopped again at the end) against the same grid run locally.
#
# 1. configs/slurm-test.toml runs locally (one process): the reference.
# 2. The same config (another results folder) goes to Slurm with `experiments slurm --submit`;
#    while the array runs, the task running a cell is killed (scancel), so that cell is left
#    unfinished with its lock behind; the report job (afterany) still runs and names it missing.
# 3. `experiments slurm --submit` again: an array of just the missing cell, whose task takes the
#    dead task's lock over; then the report job.
# 4. Every cell's metrics.csv, answers.csv and scores.csv, and every table, must be
#    byte-identical to the local run's; no lock is left behind.
#
# Needs root (see scripts/slurm-local.sh). Takes about 2 minutes on the development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
EXE=$PWD/target/debug/experiments
[ -x "$EXE" ] || { echo "test-slurm: build first (cargo build -p experiments)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/qvlm-test-slurm.XXXXXX)
export QVLM_SLURM_DIR=$WORK/slurm
export RUST_LOG=${RUST_LOG:-info}
fail() { echo "test-slurm: FAILED: $*" >&2; exit 1; }
cleanup() {
    scripts/slurm-local.sh stop >/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "test-slurm: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
scripts/slurm-local.sh start
export SLURM_CONF=$QVLM_SLURM_DIR/slurm.conf

for run in local cluster; do
    sed "s|^results_dir = .*|results_dir = \"$WORK/$run\"|" configs/slurm-test.toml >"$WORK/$run.toml"
done
cells=$("$EXE" "$WORK/local.toml" --dry-run | grep -c '^  [0-9a-f]\{12\} ')
[ "$cells" -ge 4 ] || fail "the test grid has $cells cells, fewer than 4"

echo "test-slurm: 1. the local reference run ($cells cells)"
"$EXE" "$WORK/local.toml" >"$WORK/local.out" 2>"$WORK/local.err" || { cat "$WORK/local.err"; fail "local run"; }

wait_for_jobs() {
    local deadline=$(( $(date +%s) + 900 ))
    while [ -n "$(squeue -h -o %i)" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { squeue; fail "jobs still queued after 15 min"; }
        sleep 1
    done
}

echo "test-slurm: 2. submit the grid, kill the task of a running cell"
"$EXE" slurm "$WORK/cluster.toml" --submit | tee "$WORK/submit1.out"
array=$(sed -n 's/^submitted array job \([0-9]*\).*/\1/p' "$WORK/submit1.out")
[ -n "$array" ] || fail "no array job id in the output of experiments slurm --submit"
victim="" lock=""
for _ in $(seq 600); do
    for f in "$WORK"/cluster/cells/*.lock; do
        [ -f "$f" ] || continue
        # The task holding the lock: "job":"ARRAYJOB_TASK".
        victim=$(grep -o '"job":"[0-9_]*"' "$f" | cut -d'"' -f4 || true)
        [ -n "$victim" ] && { lock=$f; break; }
    done
    [ -n "$victim" ] && break
    sleep 0.1
done
[ -n "$victim" ] || fail "no array task was seen holding a cell lock"
killed_cell=$(basename "$lock" .lock)
scancel "$victim"
echo "test-slurm: killed task $victim while it ran cell $killed_cell"
wait_for_jobs
[ ! -f "$WORK/cluster/cells/$killed_cell/metrics.csv" ] || fail "the killed cell $killed_cell was finished anyway"
[ -f "$lock" ] || fail "the killed task left no lock (it should: it was killed)"
grep -q "Incomplete: 1 cells" "$WORK/cluster/report.md" || fail "the report job did not name the missing cell"
grep -q "$killed_cell" "$WORK/cluster/report.md" || fail "the report does not list $killed_cell"

echo "test-slurm: 3. re-submit: just the missing cell"
"$EXE" slurm "$WORK/cluster.toml" --submit | tee "$WORK/submit2.out"
grep -q "^1 of the grid's $cells cells unfinished" "$WORK/submit2.out" || fail "the re-submission is not of the one missing cell"
wait_for_jobs

echo "test-slurm: 4. compare with the local run"
for d in "$WORK"/local/cells/*/; do
    id=$(basename "$d")
    for f in metrics.csv answers.csv scores.csv; do
        cmp -s "$d/$f" "$WORK/cluster/cells/$id/$f" || fail "cells/$id/$f differs from the local run"
    done
done
n=$(ls -d "$WORK"/cluster/cells/*/ | wc -l)
[ "$n" = "$cells" ] || fail "$n cell folders, expected $cells"
# Tables too, but for the columns of measured seconds (search_seconds), which no two runs share.
without_seconds() {
    python3 -c 'import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
keep = [i for i, name in enumerate(rows[0]) if "seconds" not in name]
for r in rows: print(",".join(r[i] for i in keep))' "$1"
}
for t in "$WORK"/local/tables/*.csv; do
    name=$(basename "$t")
    [ "$(without_seconds "$t")" = "$(without_seconds "$WORK/cluster/tables/$name")" ] \
        || fail "tables/$name differs (seconds columns aside)"
done
! grep -q "Incomplete" "$WORK/cluster/report.md" || fail "the final report still names missing cells"
left=$(find "$WORK/cluster" -name '*.lock' -o -name '*.tmp-*' -o -name '*.takeover' | head -n 3)
[ -z "$left" ] || fail "left behind: $left"
grep -q "took over .*$killed_cell.lock (its process" "$WORK"/cluster/slurm/submission-002/logs/*.log \
    || fail "the re-run task did not take the killed task's lock over"
jobs=$(grep -l '"slurm_job": "[0-9]*_[0-9]*"' "$WORK"/cluster/cells/*/manifest.json | wc -l)
[ "$jobs" = "$cells" ] || fail "$jobs of $cells manifests name the array task that ran them"
echo "test-slurm: passed in $(( $(date +%s) - started )) s ($cells cells, one task killed and re-run)"
