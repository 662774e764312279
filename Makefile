# Two commands on a fresh machine: `make demo` (the main job) and `make test` (ruff + pytest).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine has a local CPU wheel of torch 2.13.0; an unpinned torch would pull CUDA builds.
# On a machine with its own torch, run `make TORCH_SPEC= test`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/tunelab demo

lint: install
	$(BIN)/ruff check src tests bench

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
