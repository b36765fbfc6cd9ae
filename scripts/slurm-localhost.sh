#!/usr/bin/env bash
# A real single-node SLURM on 127.0.0.1 for the integration tests (and for trying the slurm profile
# on one machine): Debian's slurmctld, slurmd, slurm-client and munge, plus slurmdbd with MariaDB so
# that `sacct` works (submitit reads job states only through sacct: without accounting a cancelled job
# stays UNKNOWN and submitit waits for it forever).
#
#   scripts/slurm-localhost.sh install   # apt packages (root)
#   scripts/slurm-localhost.sh start     # install if needed, write configs, start the daemons
#   scripts/slurm-localhost.sh status
#   scripts/slurm-localhost.sh stop      # cancel jobs, stop every daemon it started
#
# Needs root (no systemd: each daemon is started by hand). State lives in $OFE_SLURM_DIR
# (default /tmp/ofe-slurm); slurm.conf goes to /etc/slurm where every Slurm client looks for it.
set -euo pipefail

DIR=${OFE_SLURM_DIR:-/tmp/ofe-slurm}
CONF_DIR=/etc/slurm
DB_PORT=${OFE_SLURM_DB_PORT:-3307}
DB_PASS=ofe-slurm-local
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"

log() { echo "[slurm-localhost] $*"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq 1 "$((limit * 4))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    log "timed out after ${limit}s waiting for $what"
    return 1
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then
        return 0
    fi
    log "installing $PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
    # Debian starts nothing without systemd, but be sure no packaged daemon holds our ports.
    pkill -x slurmctld 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmdbd 2>/dev/null || true
}

write_configs() {
    local cpus mem_mib
    # Declared CPUs, more than the machine has (SlurmdParameters=config_overrides lets slurmd accept
    # that): a packed job of 8 one-CPU runs (launcher scales.<scale>.pack) must fit on the one node,
    # as it would on any real node. The tests' tiny runs take one torch thread each and share the cores.
    cpus=$(( $(nproc) > ${OFE_SLURM_CPUS:-16} ? $(nproc) : ${OFE_SLURM_CPUS:-16} ))
    mem_mib=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$DIR"/{state,spool,log,run,mysql} "$CONF_DIR"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by ofe scripts/slurm-localhost.sh: a single node on loopback.
ClusterName=ofe
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# The credential lifetime bounds how long a requeued job is held before it restarts (~120 s default).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without DefMemPerCPU every job takes the node's whole memory and jobs run one at a time.
DefMemPerCPU=$(( mem_mib / cpus ))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ReturnToService=2
MinJobAge=300
# submitit ignores SIGTERM (it checkpoints on SIGUSR2): a requeued or cancelled job is killed this
# many seconds after SIGTERM (default 30).
KillWait=5
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"  # slurmdbd refuses a group/world-readable config
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create 2>/dev/null || true
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munge sh -c 'munge -n | unmunge'
}

start_mariadb() {
    local sock="$DIR/run/mysql.sock"
    if [ ! -d "$DIR/mysql/mysql" ]; then
        mariadb-install-db --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=normal >/dev/null
    fi
    # A socket file alone proves nothing: a machine restored from a snapshot, or a hard kill, leaves
    # a stale one behind. Only a server that answers counts; otherwise clear its leftovers and start.
    if ! mariadb --socket="$sock" -uroot -e 'select 1' >/dev/null 2>&1; then
        pkill -x mariadbd 2>/dev/null || true
        rm -f "$sock" "$DIR/run/mariadb.pid"
        (mariadbd --no-defaults --datadir="$DIR/mysql" --socket="$sock" --port="$DB_PORT" \
            --bind-address=127.0.0.1 --user=root --pid-file="$DIR/run/mariadb.pid" \
            --log-error="$DIR/log/mariadb.log" >/dev/null 2>&1 &)
        wait_for 30 mariadb mariadb --socket="$sock" -uroot -e 'select 1'
    fi
    mariadb --socket="$sock" -uroot <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

start() {
    install
    write_configs
    start_munge
    start_mariadb
    pgrep -x slurmdbd >/dev/null || slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    pgrep -x slurmctld >/dev/null || slurmctld
    wait_for 30 slurmctld scontrol ping
    pgrep -x slurmd >/dev/null || slurmd
    wait_for 30 "an idle node" sh -c 'sinfo -h -o %t | grep -qE "idle|mix|alloc"'
    wait_for 30 sacct sacct -n -X
    log "up: $(sinfo -h -o '%P %D %t %c CPUs %m MiB') (state in $DIR)"
}

stop() {
    command -v scancel >/dev/null && scancel --user=root 2>/dev/null || true
    for d in slurmd slurmctld slurmdbd mariadbd munged; do
        pkill -x "$d" 2>/dev/null || true
    done
    # wait for them to exit, so that an immediate `start` does not find a dying daemon
    if ! wait_for 20 "the daemons to exit" sh -c '! pgrep -x "slurmd|slurmctld|slurmdbd|mariadbd|munged"'; then
        pkill -9 -x "slurmd|slurmctld|slurmdbd|mariadbd|munged" 2>/dev/null || true
    fi
    rm -f "$DIR/run/mysql.sock"
    log "stopped"
}

status() {
    if scontrol ping >/dev/null 2>&1 && sacct -n -X >/dev/null 2>&1; then
        log "running: $(sinfo -h -o '%P %D %t')"
    else
        log "not running"
        return 1
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
