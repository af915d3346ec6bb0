# Two commands on a fresh clone: `make demo` and `make test`. `make setup` is what both run first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
MODEL   ?= models/tiny
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-gpu bench protos clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned to the CPU build that lies on disk; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

$(MODEL)/config.json: | $(VENV)/.installed
	$(BIN)/moe-serve init-model $(MODEL) --preset tiny --seed 0

setup: $(VENV)/.installed $(MODEL)/config.json

demo: setup
	$(BIN)/moe-serve demo --model $(MODEL)

# pytest exits 5 when it collects nothing; that must fail, and it does (make stops on any non-zero).
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not cluster" $(PYTEST_ARGS)

# On a machine with CUDA GPUs: CUDA IPC sessions on the router's GPU and on a peer (not part of `test`).
test-gpu: setup
	$(BIN)/python -m pytest tests_gpu $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.run_all

protos: setup
	PYTHON=$(abspath $(BIN)/python) scripts/gen_protos.sh

clean:
	rm -rf $(VENV) models *.egg-info
