#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for testing scripts/slurm/dpq.sbatch.
#
#   bash scripts/slurm/cluster.sh install   # apt-get install slurm-wlm + munge (idempotent, root)
#   bash scripts/slurm/cluster.sh start     # write slurm.conf, start munged, slurmctld, slurmd; wait until idle
#   bash scripts/slurm/cluster.sh status    # prints "running" (exit 0) or "stopped" (exit 1)
#   bash scripts/slurm/cluster.sh stop      # stop the daemons by their pid files; nothing is left running
#
# Facts and traps: docs/slurm.md. Nothing starts by itself on these machines (no
# systemd), so the daemons are started by hand, in order: munged (as user munge), slurmctld,
# slurmd. Everything they write (state, spool, logs, pid files) lives under $DPQ_SLURM_DIR
# (default /tmp/dpq-slurm). The SLURM client commands (sbatch, srun, scontrol, ...) read
# /etc/slurm/slurm.conf, so the config is installed there too, marked as ours; an existing
# slurm.conf that is not ours is never overwritten (this script is for test machines only).
# Daemons that this script did not start (e.g. a real cluster's) are left alone by `stop`.
set -euo pipefail

DIR=${DPQ_SLURM_DIR:-/tmp/dpq-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by dpq_lightning scripts/slurm/cluster.sh"
MUNGE_RUN=/run/munge
MUNGE_PID=$DIR/munged.pid   # a copy of munged's pid, written only when this script started it

log() { echo "[cluster.sh] $*"; }
die() { echo "[cluster.sh] error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE NAME: the pid file names a live process called NAME (not a reused pid)
    [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}

munge_ok() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ctld_ok() { scontrol ping 2>/dev/null | grep -q "is UP"; }

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n1; }

node_ready() {  # idle, or busy with jobs: either way the node serves
    case $(node_state) in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

install() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null; then
        log "slurm-wlm and munge already installed ($(sbatch --version))"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "install needs root (apt-get)"
    log "installing slurm-wlm and munge from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
    log "installed $(sbatch --version)"
}

write_conf() {
    local host mem_total node_line real
    host=$(hostname -s)
    mem_total=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    real=$(( mem_total * 9 / 10 ))  # RealMemory must not exceed what slurmd sees
    # Topology (CPUs, boards, sockets, cores, threads) exactly as slurmd detects it.
    node_line=$(slurmd -C | head -n1 | sed -E 's/ RealMemory=[0-9]+//')
    case $node_line in NodeName=*) ;; *) die "slurmd -C gave no NodeName line: $node_line" ;; esac
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
    cat >"$DIR/slurm.conf" <<EOF
$MARK
# One-node test cluster (see scripts/slurm/cluster.sh). Safe to delete with 'cluster.sh stop'.
ClusterName=dpqtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job otherwise waits for the old credential to expire (about 121 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
MailProg=/bin/true
ReturnToService=2
KillWait=10
# Start delay 2-3 s instead of up to 27 s.
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$node_line NodeAddr=127.0.0.1 RealMemory=$real State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script: refusing to overwrite a real SLURM config"
    fi
    cp "$DIR/slurm.conf" "$CONF"
}

start() {
    command -v slurmctld >/dev/null || die "SLURM is not installed: run 'bash $0 install' first"
    [ "$(id -u)" = 0 ] || die "start needs root (SlurmUser=root, munged as user munge)"
    if ctld_ok && node_ready; then
        log "already running ($(sinfo -h -N -o '%N %T'))"
        return 0
    fi
    write_conf
    # munged: as user munge, socket and pid under /run/munge (owned by munge).
    if ! munge_ok; then
        mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
        chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
        chmod 0755 "$MUNGE_RUN"
        [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge or run mungekey)"
        rm -f "$MUNGE_RUN/munged.pid"
        su -s /bin/sh munge -c "munged --force --pid-file=$MUNGE_RUN/munged.pid" || die "munged did not start"
        for _ in $(seq 50); do munge_ok && [ -s "$MUNGE_RUN/munged.pid" ] && break; sleep 0.1; done
        munge_ok || die "munged is not answering (see /var/log/munge/munged.log)"
        cp "$MUNGE_RUN/munged.pid" "$MUNGE_PID"
    fi
    alive "$DIR/slurmctld.pid" slurmctld || slurmctld || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
    for _ in $(seq 100); do ctld_ok && break; sleep 0.1; done
    ctld_ok || die "slurmctld is not answering 'scontrol ping' (see $DIR/log/slurmctld.log)"
    alive "$DIR/slurmd.pid" slurmd || slurmd || die "slurmd did not start (see $DIR/log/slurmd.log)"
    for _ in $(seq 300); do node_ready && break; sleep 0.1; done
    if ! node_ready; then
        # A node left DOWN/DRAIN by an earlier unclean stop: bring it back.
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        for _ in $(seq 100); do node_ready && break; sleep 0.1; done
    fi
    node_ready || die "node is not idle: $(sinfo -h -N -o '%N %T %E') (see $DIR/log/slurmd.log)"
    log "running: $(sinfo -h -N -o '%N %T %c CPUs') (config $CONF, state and logs in $DIR)"
}

stop_one() {  # stop_one NAME PIDFILE: only the process this script started (pid file + name)
    local pid
    alive "$2" "$1" || { rm -f "$2"; return 0; }
    pid=$(cat "$2")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$1 (pid $pid) did not stop in 10 s: killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$2"
    log "stopped $1 (pid $pid)"
}

stop() {
    # Jobs first (only on our own cluster), so that no task outlives its slurmd.
    if [ -e "$CONF" ] && grep -qF "$MARK" "$CONF" && alive "$DIR/slurmctld.pid" slurmctld; then
        scancel --quiet -u root 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    stop_one slurmd "$DIR/slurmd.pid"
    stop_one slurmctld "$DIR/slurmctld.pid"
    stop_one munged "$MUNGE_PID"
    # Our config goes with our cluster; a real one (unmarked) is never touched.
    if [ -e "$CONF" ] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF"; fi
}

status() {
    if ctld_ok; then
        log "running: $(sinfo -h -N -o '%N %T')"
        return 0
    fi
    log "stopped"
    return 1
}

case ${1:-} in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    *) echo "usage: $0 install|start|stop|status|restart" >&2; exit 2 ;;
esac
