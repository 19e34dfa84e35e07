#!/usr/bin/env bash
# On the GPU machine: unpack the wheels benchmarks/gpu_check_prepare.sh put in .gpu_deps/ (no pip or registry needed),
# put them before the machine's own packages, check the imports in seconds, then run the GPU check into $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the GPU machine has python3, not python
deps=$(mktemp -d)
for w in .gpu_deps/*.whl; do "$PY" -m zipfile -e "$w" "$deps"; done
export PYTHONPATH="$PWD/src:$deps"
"$PY" benchmarks/gpu_check.py --preflight "$@"
"$PY" benchmarks/gpu_check.py --out "${OUT:-/tmp/gpu_check}" "$@"
