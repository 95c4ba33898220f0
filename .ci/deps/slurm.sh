#!/usr/bin/env bash
# Debian's Slurm and MUNGE, for tests/launch/: a pytest fixture starts a one-node cluster on loopback
# (munged, slurmctld, slurmd as root) and submits real jobs through `python -m launch launcher=slurm`.
# Idempotent: does nothing when every program is already there. Exits non-zero with the reason otherwise.
set -euo pipefail

PROGRAMS=(sbatch srun scontrol squeue scancel slurmctld slurmd munged munge)

missing() {
    for program in "${PROGRAMS[@]}"; do
        command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || return 0
    done
    return 1
}

missing || exit 0

fail() {
    echo "slurm.sh: cannot install Slurm: $1" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "no apt-get (not a Debian-like system); install slurm-wlm and munge"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    fail "root or password-less sudo is needed for apt-get; run: sudo apt-get install -y slurm-wlm munge"
fi

export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing (slim images) or stale: refresh them once before installing.
$SUDO apt-get update -qq || fail "apt-get update failed (no access to a Debian mirror?)"
# The daemons are not started here: the test fixture starts its own, with a config of its own.
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
    fail "apt-get install slurm-wlm munge failed (see the apt output above)"
missing && fail "installed slurm-wlm and munge, but one of ${PROGRAMS[*]} is still missing"
echo "slurm.sh: installed $(sbatch --version 2>/dev/null || echo slurm) and munge"
