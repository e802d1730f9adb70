# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned to the local CPU build, so that no CUDA wheels are pulled.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed

# The demo needs only the library and its demo extra (no mergekit, peft, torchft, optuna).
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $(DEMO_STAMP)

# Tests and benchmarks add the references: mergekit, peft, torchft, optuna/cmaes.
$(STAMP): $(DEMO_STAMP)
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

.PHONY: demo test test-fast bench clean
# One seed: about 40 s of one core after install; `mergelab demo` alone averages five seeds.
demo: $(DEMO_STAMP)
	$(BIN)/mergelab demo --replicates 1

# The whole suite (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest tests

# The inner loop: no subprocess, multi-process distributed, fault-injection, slow or MergeKit-parity tests
# (marks given in tests/suite_marks.py). Compiled kernels are cached in .numba_cache/ (tests/conftest.py).
FAST_MARKS := not slow and not subprocess and not distributed and not fault and not mergekit
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "$(FAST_MARKS)"

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) examples/_out bench/_work .numba_cache
