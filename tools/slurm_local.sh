#!/usr/bin/env bash
# A one-host SLURM cluster for the `slurm` tests (as root; Debian's slurm-wlm + munge, no systemd).
#   tools/slurm_local.sh install   apt-get install slurm-wlm munge (if missing)
#   tools/slurm_local.sh start     munge key, slurm.conf for this host, start munged / slurmctld / slurmd
#   tools/slurm_local.sh stop      stop the daemons this script started, by the PIDs it recorded
# Exit 3 from install/start: slurm cannot be had here (not root, no apt, daemons do not come up).
set -uo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/run/dapo-slurm-local}
CONF=/etc/slurm/slurm.conf

cant() { echo "slurm_local: $*" >&2; exit 3; }

install() {
  command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || cant "needs root to apt-get install slurm-wlm munge"
  command -v apt-get >/dev/null || cant "no apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null || cant "apt-get install failed"
}

start() {
  [ "$(id -u)" = 0 ] || cant "needs root to run munged / slurmctld / slurmd"
  install
  mkdir -p "$STATE" /etc/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge \
    /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  local host; host=$(hostname -s)
  local cpus; cpus=$(nproc)
  mkdir -p /etc/slurm
  cat > "$CONF" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ReturnToService=2
MpiDefault=none
KillWait=120
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid || cant "munged did not start"
    for _ in $(seq 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.5; done
    cp /run/munge/munged.pid "$STATE/munged.pid" || cant "munged wrote no pid file"
    echo started > "$STATE/munged.ours"
  fi
  slurmctld -i || cant "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
  slurmd || cant "slurmd did not start (see /var/log/slurm/slurmd.log)"
  for _ in $(seq 60); do  # bounded: the node must register and go idle
    if sinfo -h -o %t 2>/dev/null | grep -q -E '^(idle|mix|alloc)'; then echo "slurm up on $host"; return 0; fi
    sleep 1
  done
  cant "the node did not become idle within 60 s: $(sinfo 2>&1 | tail -2)"
}

stop() {
  for name in slurmd slurmctld munged; do
    local pidfile="$STATE/$name.pid"
    [ "$name" = munged ] && [ ! -f "$STATE/munged.ours" ] && continue
    [ -f "$pidfile" ] || continue
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
  done
  rm -f "$STATE/munged.ours"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
