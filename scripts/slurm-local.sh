#!/usr/bin/env bash
# A single-node Slurm on this machine, for `make test-slurm` and for trying `experiments slurm`
# without a cluster. Debian's slurm-wlm and munge packages (installed with apt-get when missing),
# munged, slurmctld and slurmd started directly (no systemd), a minimal slurm.conf with this
# machine's real CPU count and memory, one partition `debug` over it.
#
#   scripts/slurm-local.sh start    # prints the line to export SLURM_CONF
#   scripts/slurm-local.sh status
#   scripts/slurm-local.sh stop     # cancels its jobs, stops what it started (by pid)
#
# Everything lives in $QVLM_SLURM_DIR (default /tmp/qvlm-slurm): config, munge key and socket,
# state, logs, pid files. Runs as root (apt-get; SlurmUser=root). Ports: $QVLM_SLURM_PORT and the
# next one (default 6817, 6818). Checked on a development machine (Debian 12, slurm-wlm 22.05,
# 2 cores): 16 s from no packages to a finished 4-task array (apt-get from cached package files),
# 0.1 s from installed packages to `sinfo` idle.
set -euo pipefail

DIR=${QVLM_SLURM_DIR:-/tmp/qvlm-slurm}
PORT=${QVLM_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket

die() { echo "slurm-local: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed, and installing them needs root"
    echo "slurm-local: installing slurm-wlm and munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null
}

pid_of() { [ -f "$DIR/run/$1.pid" ] && cat "$DIR/run/$1.pid" || true; }

alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

write_conf() {
    local node
    # slurmd -C: this machine as Slurm sees it (NodeName=… CPUs=… RealMemory=…).
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C did not describe this machine: $node"
    cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: a single-node Slurm for tests.
ClusterName=qvlm-local
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install_packages
    if alive slurmctld || alive slurmd; then
        die "already running (state in $DIR); stop it first"
    fi
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    chmod 700 "$DIR/munge"
    write_conf
    # munged with its own key and socket, so it neither needs nor disturbs a system one.
    [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    munge -n -S "$SOCKET" | unmunge -S "$SOCKET" >/dev/null || die "munge does not work: $DIR/log/munged.log"
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    local state=""
    for _ in $(seq 120); do
        state=$(SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    [ "$state" = idle ] || die "the node is '$state', not idle, after 60 s: see $DIR/log/"
    echo "slurm-local: running, node idle ($(SLURM_CONF=$CONF sinfo -h -o '%c CPUs, %m MB')); state in $DIR"
    echo "export SLURM_CONF=$CONF"
}

stop() {
    if [ -f "$CONF" ] && alive slurmctld; then
        SLURM_CONF=$CONF scancel --user "$(id -un)" 2>/dev/null || true
    fi
    local name pid
    for name in slurmd slurmctld munged; do
        pid=$(pid_of "$name")
        [ -n "$pid" ] || continue
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/run/$name.pid"
    done
    echo "slurm-local: stopped (state left in $DIR)"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$name"; then echo "$name: pid $(pid_of "$name")"; else echo "$name: not running"; fi
    done
    if alive slurmctld; then SLURM_CONF=$CONF sinfo; fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status (state in \$QVLM_SLURM_DIR, default /tmp/qvlm-slurm)" ;;
esac
