#!/bin/bash
# Start a throw-away single-node SLURM cluster on localhost (tested: Debian 12, SLURM 22.05, root,
# no systemd). Everything it writes (config, state, spool, logs, pids, munge key and socket) lives
# under $S; nothing goes to /etc/slurm or /run/munge, so it neither needs nor disturbs a system SLURM.
# Clients find it through SLURM_CONF=$S/slurm.conf (sbatch hands it on to jobs, submitit inherits it).
#
#   S=/tmp/famnet-slurm-x tests/slurm/slurm_up.sh   # then: export SLURM_CONF=$S/slurm.conf
#   S=/tmp/famnet-slurm-x tests/slurm/slurm_down.sh # stops every daemon by pid
#
# Env knobs:
#   S          state dir (required). The munge socket dir must be reachable by every user
#              (munged checks), so $S and its parents must be world-executable: use a dir made
#              by `mktemp -d /tmp/famnet-slurm.XXXX` + `chmod 755`, not pytest's 0700 tmp_path.
#   AUTH       munge (default: the real thing; credentials are tied to the caller's uid) or none
#              (one daemon less, but then any local user can act as any user on this cluster).
#   PORT       slurmctld port (default 6817); slurmd uses PORT+1. Pick free ports to run beside
#              another cluster (tests/test_slurm.py does).
#   WATCH_PID  optional: a watchdog runs slurm_down.sh once this process is gone (pytest killed
#              with SIGKILL never reaches its fixture teardown).
# No slurmdbd/accounting: `sacct` fails, which only matters to submitit's job-state polling;
# famnet_pl.slurm waits on result files and squeue instead (see its docstring).
set -euo pipefail
: "${S:?set S to a state directory (e.g. S=\$(mktemp -d /tmp/famnet-slurm.XXXX))}"
AUTH=${AUTH:-munge}; PORT=${PORT:-6817}
HERE=$(cd "$(dirname "$0")" && pwd)
export SLURM_CONF=$S/slurm.conf
for exe in slurmctld slurmd sbatch; do
  command -v $exe >/dev/null || [ -x /usr/sbin/$exe ] || { echo "slurm_up.sh: $exe not found: run tests/slurm/install.sh (apt: slurm-wlm munge)" >&2; exit 1; }
done
PATH=$PATH:/usr/sbin
mkdir -p "$S/state" "$S/spool"
if [ -f "$S/slurmctld.bgpid" ]; then echo "slurm_up.sh: $S already has a cluster (slurm_down.sh first)" >&2; exit 1; fi

if [ "$AUTH" = munge ]; then
  # munged's socket dir must be 0755 and owned by munged's user; the key must not be readable by others.
  install -d -m 0755 "$S/munge"
  [ -s "$S/munge/munge.key" ] || mungekey --create --keyfile="$S/munge/munge.key" 2>/dev/null
  chmod 0600 "$S/munge/munge.key"
  AUTHINFO="AuthInfo=cred_expire=10,socket=$S/munge/munge.socket"
else
  AUTHINFO="AuthInfo=cred_expire=10"
fi

# Scheduler settings that make tests fast: batch_sched_delay=0 (else about 3 s between job starts),
# sched_interval=2 and cred_expire=10 (else a requeued job waits 60-120 s before it may start again).
# MinJobAge=300: finished jobs stay visible to `scontrol show job` (the aggregation job reads task states).
cat > "$SLURM_CONF" <<CONF
ClusterName=famnet-test
SlurmctldHost=localhost
AuthType=auth/$AUTH
CredType=cred/$AUTH
$AUTHINFO
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
JobCompType=jobcomp/filetxt
JobCompLoc=$S/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

wait_for() {  # wait_for SECONDS CMD...: poll CMD every 0.2 s
  local n=$(( $1 * 5 )) i; shift
  for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "slurm_up.sh: timed out waiting for: $*  (logs in $S)" >&2; return 1
}
# Foreground daemons put in the background: $! is the daemon itself (slurm_down.sh kills by pid).
# setsid: a Ctrl-C aimed at the caller does not kill them midway; slurm_down.sh stops them.
start() {  # start NAME CMD...
  local name=$1; shift
  setsid "$@" </dev/null >"$S/$name.stdout" 2>&1 &
  echo $! >"$S/$name.bgpid"
}
if [ "$AUTH" = munge ]; then
  start munged munged --foreground --force --socket="$S/munge/munge.socket" --key-file="$S/munge/munge.key" \
    --pid-file="$S/munge/munged.pid" --seed-file="$S/munge/munged.seed" --log-file="$S/munge/munged.log"
  wait_for 10 bash -c "munge -S '$S/munge/munge.socket' -n | unmunge -S '$S/munge/munge.socket'"
fi
start slurmctld slurmctld -D -c        # -c: ignore any old state in StateSaveLocation
start slurmd slurmd -D -N localhost    # -N: the node name is not `hostname`
if [ -n "${WATCH_PID:-}" ]; then       # stop the cluster once the process that owns it is gone
  setsid bash -c "while kill -0 $WATCH_PID 2>/dev/null; do sleep 2; done; S='$S' bash '$HERE/slurm_down.sh'" \
    </dev/null >"$S/watchdog.stdout" 2>&1 &
  echo $! >"$S/watchdog.bgpid"
fi
wait_for 30 bash -c 'sinfo -h -o %T | grep -qx idle'
echo "slurm up: SLURM_CONF=$SLURM_CONF (ports $PORT/$((PORT + 1)), auth/$AUTH)"
