# `make test` and `make demo` create (or reuse) .venv, install torch 2.13.0 (the CPU wheel) together with the
# project in ONE pip command -- a bare `torch` requirement would pull a multi-GB CUDA build -- and then run.
# `make test` then runs the tests marked `oldest` in .venv-oldest, which holds the oldest supported release of every
# dependency (the floors of pyproject.toml, pinned in tests/constraints-oldest.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
VENV_OLDEST ?= .venv-oldest
BIN_OLDEST := $(VENV_OLDEST)/bin
STAMP_OLDEST := $(VENV_OLDEST)/.installed-stamp
CONSTRAINTS_OLDEST := tests/constraints-oldest.txt
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-oldest test-fast demo demo-quick benchmarks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

$(STAMP_OLDEST): pyproject.toml $(CONSTRAINTS_OLDEST)
	test -x $(BIN_OLDEST)/python || $(PYTHON) -m venv $(VENV_OLDEST)
	$(BIN_OLDEST)/python -m pip install --quiet "torch==2.13.0" -e ".[test]" -c $(CONSTRAINTS_OLDEST)
	touch $(STAMP_OLDEST)

install: $(STAMP)

# -rs prints the reason of every skipped test (e.g. the browser test without Chromium: apt-get install chromium
# chromium-driver, as .ci/run does)
test: $(STAMP) $(STAMP_OLDEST)
	$(BIN)/python -m pytest -q -rs tests
	$(MAKE) --no-print-directory test-oldest

# the fast subset on the oldest dependencies: parity with every native pipeline, one training run per family and
# LoRA loading; ONESTEP_CONSTRAINTS makes tests/test_dependency_range.py check that these versions are installed
test-oldest: $(STAMP_OLDEST)
	ONESTEP_CONSTRAINTS=$(CONSTRAINTS_OLDEST) $(BIN_OLDEST)/python -m pytest -q -m "oldest and not slow" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m diffusers_onestep.demo

demo-quick: $(STAMP)
	$(BIN)/python -m diffusers_onestep.demo --quick

clean:
	rm -rf $(VENV) $(VENV_OLDEST) demo-output .pytest_cache
