#!/usr/bin/env bash
# CI: make sure a SLURM cluster is present for tests/test_slurm.py (which fails under CI=true
# when SLURM is absent, and is skipped with the reason elsewhere). Installs Debian's slurm-wlm +
# munge and starts a one-node cluster on this machine (scripts/slurm/cluster.sh; facts and traps
# in scripts/slurm/README.md). The daemons are left running for the tests; CI's machine is
# discarded afterwards (locally: bash scripts/slurm/cluster.sh stop).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! bash scripts/slurm/cluster.sh install; then
    echo "ci/slurm.sh: installing slurm-wlm and munge failed (needs root and Debian's package registry);" \
         "tests/test_slurm.py needs a SLURM cluster" >&2
    exit 1
fi
if ! bash scripts/slurm/cluster.sh start; then
    echo "ci/slurm.sh: the one-node SLURM test cluster did not start; logs:" >&2
    tail -n 30 "${DPQ_SLURM_DIR:-/tmp/dpq-slurm}"/log/*.log >&2 2>/dev/null || true
    exit 1
fi
srun --nodes=1 --ntasks=2 --time=1 true || { echo "ci/slurm.sh: srun -n 2 failed on the test cluster" >&2; exit 1; }
echo "ci/slurm.sh: SLURM ready ($(sinfo -h -N -o '%N %T %c CPUs'))"
