#!/bin/bash
# Install what tests/slurm/slurm_up.sh needs (Debian/Ubuntu, as root): the SLURM controller, node
# daemon and client, and munge. Idempotent: does nothing when they are already there.
# --no-install-recommends: 9 packages (about 3.5 MB) instead of 42 (hdf5, rocm-smi, ...).
# apt does not start the daemons (no systemd here; slurm_up.sh starts them by hand).
set -euo pipefail
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -eq 0 ]; then echo "slurm + munge already installed"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install.sh: needs root to apt-get install ${need[*]}" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 || {
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge; }
echo "installed: $(dpkg-query -W -f '${Package} ${Version}\n' slurmctld slurmd slurm-client munge | paste -sd ' ')"
