#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `sanity run -m hydra/launcher=submitit_slurm`.
#
#   scripts/slurm_cluster.sh start    # install nothing; needs Debian's slurm-wlm and munge
#   scripts/slurm_cluster.sh status
#   scripts/slurm_cluster.sh stop
#
# Everything but the munge key lives in $SANITY_SLURM_DIR (default /tmp/sanity-slurm):
# slurm.conf, spool and state directories, logs and pid files. Clients find the cluster
# through SLURM_CONF, which `start` prints:  export SLURM_CONF=$SANITY_SLURM_DIR/slurm.conf
# No accounting (slurmdbd): submitit then says "Bypassing sacct error" and still returns
# every job's result. Run as root (the daemons run as root; munged as the munge user).
set -euo pipefail

DIR="${SANITY_SLURM_DIR:-/tmp/sanity-slurm}"
CONF="$DIR/slurm.conf"
PARTITION="${SANITY_SLURM_PARTITION:-debug}"

need() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || {
            echo "slurm_cluster: '$tool' is missing; install it: apt-get install -y slurm-wlm munge" >&2
            exit 3
        }
    done
}

write_conf() {
    # nproc would obey OMP_NUM_THREADS; the node has all online cores.
    local cpus mem_mib
    cpus=$(getconf _NPROCESSORS_ONLN)
    mem_mib=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$DIR/spool/slurmd" "$DIR/state" "$DIR/log"
    cat >"$CONF" <<EOF
ClusterName=sanity
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem_mib / cpus ))
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged.ours"  # stop ends only the munged that start began
}

wait_idle() {
    for _ in $(seq 60); do
        if SLURM_CONF="$CONF" sinfo -h -o %t 2>/dev/null | grep -qx "idle"; then
            return
        fi
        sleep 1
    done
    echo "slurm_cluster: the node did not become idle in 60 s; see $DIR/log/" >&2
    exit 4
}

stop_pid() {
    local file="$1" pid
    pid=$(cat "$file" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$file"
}

case "${1:-}" in
start)
    need munged slurmctld slurmd sinfo sbatch runuser
    mkdir -p "$DIR"
    if [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "slurm_cluster: already running ($CONF)" >&2
    elif pgrep -x slurmctld >/dev/null; then
        echo "slurm_cluster: another slurmctld runs here (pid $(pgrep -x slurmctld | head -1)), not started" \
             "from $DIR; stop it, or set SANITY_SLURM_DIR to the directory it was started from" >&2
        exit 4
    else
        write_conf
        start_munge
        slurmctld -f "$CONF"
        slurmd -f "$CONF"
    fi
    wait_idle
    echo "export SLURM_CONF=$CONF"
    ;;
status)
    SLURM_CONF="$CONF" sinfo
    ;;
stop)
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    if [ -e "$DIR/munged.ours" ]; then
        stop_pid /run/munge/munged.pid
        rm -f "$DIR/munged.ours"
    fi
    ;;
*)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
