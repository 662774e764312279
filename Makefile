# Two commands on a fresh machine: `make demo` (the main job) and `make test` (ruff + pytest).
# Both install from requirements/lock.txt: the exact dependency set the suite last passed with.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
# The torch the lock pins: this machine's CPU build (a local wheel pip finds through its find-links).
# An unpinned torch would pull CUDA builds. Elsewhere: README "Installing without the lock".
TORCH_PIN := requirements/torch-cpu.txt
# uv does not read pip's config: hand it pip's find-links (where the CPU torch wheel lies).
FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
LATEST := .venv-latest

.PHONY: install browser demo test lint bench lock test-latest clean

# llama-cpp-python (export --gguf's check and quantizer) builds llama.cpp from its sdist: the library
# only, on every core; pip caches the wheel, so this costs minutes once per machine.
LLAMA_CMAKE := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/tunelab demo

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

# tests/test_ui.py drives Debian's chromium through Playwright (no browser is downloaded): installed here as
# root, else the one line saying how.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; \
	  else echo "error: chromium is missing (tests/test_ui.py drives it): sudo apt-get install -y chromium" >&2; \
	    exit 1; fi; }

test: lint browser
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/throughput.py

# Regenerate the lock from pyproject.toml's ranges (newest versions they allow, torch from $(TORCH_PIN)).
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra dev --constraint $(TORCH_PIN) \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	  --custom-compile-command "make lock" $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) -o $(LOCK)

# The suite against the newest releases the ranges allow (no lock; torch stays $(TORCH_PIN)),
# to see an upstream break before users do. Not part of .ci/run.
test-latest: browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(TORCH_PIN) -e ".[dev]"
	$(LATEST)/bin/python -m pip list --format freeze > $(LATEST)/versions.txt
	grep -iE '^(torch|transformers|peft|accelerate|datasets|tokenizers)==' $(LATEST)/versions.txt
	$(LATEST)/bin/ruff check src tests bench
	$(LATEST)/bin/lint-imports
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache .ruff_cache
