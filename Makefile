# `make test` and `make demo` set everything up on a fresh machine and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a bare `torch` requirement would pull a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"

lint: setup
	$(BIN)/ruff check mmfuse tests benchmarks
	$(BIN)/ruff format --check mmfuse tests benchmarks

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build *.egg-info
