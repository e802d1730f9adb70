# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned to the local CPU build, so that no CUDA wheels are pulled.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

.PHONY: demo test bench clean
demo: $(STAMP)
	$(BIN)/mergelab demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) examples/_out bench/_work
