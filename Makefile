# `make test` and `make demo` create (or reuse) .venv, install torch 2.13.0 (the CPU wheel) together with the
# project in ONE pip command -- a bare `torch` requirement would pull a multi-GB CUDA build -- and then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast demo demo-quick benchmarks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m diffusers_onestep.demo

demo-quick: $(STAMP)
	$(BIN)/python -m diffusers_onestep.demo --quick

clean:
	rm -rf $(VENV) demo-output .pytest_cache
