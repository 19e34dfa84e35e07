#!/usr/bin/env bash
# What benchmarks/gpu_check.py needs on a GPU machine that has torch, transformers and accelerate but no torchao or
# omegaconf and reaches no package registry: the pure-Python packages, unpacked into .gpu_deps/ (git-ignored; the
# device run carries it: carry=[".gpu_deps"]). Run here, where PyPI is reachable; it checks the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_deps
python -m pip install -q --no-deps --target .gpu_deps \
  "torchao==$(python -c "import torchao; print(torchao.__version__)")" \
  "omegaconf==$(python -c "import omegaconf; print(omegaconf.__version__)")" antlr4-python3-runtime==4.9.3
rm -rf .gpu_deps/bin .gpu_deps/*.dist-info/RECORD
size=$(du -sm .gpu_deps | cut -f1)
echo ".gpu_deps: ${size} MiB"
[ "$size" -le 64 ] || { echo "error: .gpu_deps is ${size} MiB, over the 64 MiB a device run carries" >&2; exit 1; }
echo 'on the GPU machine: PYTHONPATH=src:.gpu_deps python benchmarks/gpu_check.py --out "$OUT"'
