#!/usr/bin/env bash
# Here, where PyPI is reachable, before a GPU is spent: what benchmarks/gpu_check.py needs on the GPU machine beyond
# what it has (Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, peft, safetensors; no torchao, omegaconf,
# gguf; no package registry). Wheels for CPython 3.12 / x86_64 go to .gpu_deps/ (git-ignored; a device run carries
# it: carry=[".gpu_deps"]): torchao, omegaconf (+ antlr4), gguf, and the transformers this project pins (>= 5.24:
# the int4 save and the `cache` keyword) with the huggingface-hub, tokenizers and safetensors it requires. Checks
# that the carried wheels satisfy each other's requirements and fit the 64 MiB a device run carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .gpu_deps.tmp && mkdir -p .gpu_deps.tmp
pins=()
for p in torchao omegaconf gguf transformers huggingface-hub tokenizers safetensors; do pins+=("$p==$(version "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu_deps.tmp "${pins[@]}"
# omegaconf 2.3 needs antlr4 4.9.*, published as an sdist only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w .gpu_deps.tmp antlr4-python3-runtime==4.9.3
"$PY" benchmarks/gpu_check.py --check-wheels .gpu_deps.tmp
rm -rf .gpu_deps && mv .gpu_deps.tmp .gpu_deps
size=$(du -sm .gpu_deps | cut -f1)
echo ".gpu_deps: ${size} MiB ($(ls .gpu_deps | wc -l) wheels)"
[ "$size" -le 60 ] || { echo "error: .gpu_deps is ${size} MiB; with src/ it must stay under the 64 MiB a device run carries" >&2; exit 1; }
echo 'on the GPU machine (carry=[".gpu_deps"]): bash benchmarks/gpu_check.sh'
