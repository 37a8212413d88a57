#!/bin/bash
# Stop the cluster slurm_up.sh started in $S: cancel its jobs, then stop each daemon by the pid
# slurm_up.sh recorded (never by name), checking /proc/PID/comm so a stale pid file can never hit
# another process. Safe to run twice, and on a half-started cluster.
S=${S:?set S to the state directory given to slurm_up.sh}
export SLURM_CONF=$S/slurm.conf PATH=$PATH:/usr/sbin
stop() {  # stop NAME COMM [TEXT]: the pid in $S/NAME.bgpid if its comm is COMM (and its command
          # line contains TEXT): SIGTERM, up to 10 s, then SIGKILL
  local f="$S/$1.bgpid" p i
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$2" ] && tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | grep -qF -- "${3:-}"; then
    kill "$p" 2>/dev/null
    for ((i = 0; i < 100; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  fi
  rm -f "$f"
}
# The watchdog first (it would run this script again), unless this script is the watchdog: its
# `bash -c` execs this script as its last command (same pid), or runs it as a child.
watchdog=$(cat "$S/watchdog.bgpid" 2>/dev/null || true)
if [ -n "$watchdog" ] && [ "$watchdog" != $$ ] && [ "$watchdog" != "$PPID" ]; then stop watchdog bash "$S"; fi
rm -f "$S/watchdog.bgpid"
if [ -s "$S/slurmctld.bgpid" ] && timeout 5 scontrol ping >/dev/null 2>&1; then
  # Only with a live controller (else scancel retries for about 18 s). Jobs are killed by their
  # slurmstepd, which slurmd's own exit would leave behind: wait until the queue is empty.
  if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    scancel --quiet --user="$(id -un)" 2>/dev/null
    for ((i = 0; i < 100; i++)); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  timeout 10 scontrol shutdown >/dev/null 2>&1  # slurmctld and slurmd together, faster than one by one
fi
stop slurmd slurmd
stop slurmctld slurmctld
stop munged munged
echo "slurm down ($S)"
