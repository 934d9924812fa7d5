#!/usr/bin/env bash
# Install a single-node Slurm (controller, node daemon, clients) and MUNGE from Debian packages.
#
# Idempotent: does nothing when slurmctld, slurmd, sbatch and munged are already on PATH.
# Needs root (or passwordless sudo) on Debian/Ubuntu. Used by .ci/run before `pytest -m slurm`;
# the cluster itself is started per test session by tests/slurm/slurm_cluster.py (no systemd).
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch srun scontrol sinfo munged mungekey; do
    command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 \
        || need+=("$bin")
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "install_slurm: Slurm and MUNGE already installed ($(PATH="$PATH:/usr/sbin" slurmctld -V 2>/dev/null || true))"
    exit 0
fi
echo "install_slurm: missing ${need[*]}; installing with apt-get"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_slurm: need root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# Do not let package post-install scripts try to start services (there is no systemd in CI
# containers; the test harness starts the daemons itself).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge >/dev/null

PATH="$PATH:/usr/sbin" slurmctld -V
echo "install_slurm: done"
