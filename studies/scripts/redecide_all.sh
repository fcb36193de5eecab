#!/usr/bin/env bash
# Every run of the re-decision in the order that decides the most first (about 15 h on 2 cores):
# the ladder, then per bit level the candidates on seeds 0-2 and the schemes for the claims, then
# the levers of issue 26 (1 and 2 bits), calibration's own floor, the length curves. Resumable: each finished run is skipped, a half-finished one resumes from its
# last checkpoint, so the same command continues an interrupted queue. Extra arguments go to every
# call (e.g. --results /tmp/r --runs /tmp/r/runs). Re-render at any time: python studies/scripts/redecide.py --report
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repository root
PY=${PYTHON:-python}
step() { echo "=== $(date -u +%FT%TZ) $*"; "$PY" studies/scripts/redecide.py "$@" || echo "=== FAILED: $*"; }
step --seed 0 --lists ladder "$@"
for bits in 1 2 3; do
  for s in 0 1 2; do step --seed "$s" --lists recipes --bits "$bits" "$@"; done
  for s in 0 1 2; do step --seed "$s" --lists schemes --bits "$bits" "$@"; done
done
for s in 0 1 2; do step --seed "$s" --lists levers --bits 1 2 "$@"; done
step --seed 0 --lists floor "$@"
step --seed 0 --lists length "$@"
