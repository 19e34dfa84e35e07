# `make demo`: set everything up and run the main job (QAT of SmolLM2-135M, offline, on CPU).
# `make test`: set everything up and run the tests.
PYTHON ?= python3

.PHONY: install demo test lint

install:
	# torch first, from the CPU wheel: letting pip resolve torch itself may pull several GB of CUDA libraries.
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[dev]'

demo: install
	tune run qat_recipe --config smollm2_135m

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .
