# Two commands on a fresh machine: `make demo` and `make test` (each does all set-up).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline
export WANDB_SILENT := true

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	else $(PY) -m pip install -q --retries 0 --timeout 10 "torch==$(TORCH_VERSION)" \
	         --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
	     || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m opd_callback demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
