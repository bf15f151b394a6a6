"""GPU rollout benchmark, both backends side by side: a 0.5B-shaped random Qwen2 (vocab 151936, hidden 896, 24 layers,
14 heads of 64, 2 KV heads), bf16, the transformers engine, the naive baseline and the vLLM backend on the same
branches (64-token continuations of 64-320-token prefixes), plus the ~20M model. Writes
benchmarks/results/rollouts_gpu_vllm.json.

    make setup-vllm     # on the GPU machine: .venv-vllm with the official vllm package
    .venv-vllm/bin/python benchmarks/gpu_bench_vllm.py [--repeats 3]

vLLM gets 40% of the GPU's memory by default (--vllm-gpu-memory-utilization): the transformers model and its caches
share the device.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollouts import main  # noqa: E402

if __name__ == "__main__":
    main(["--device", "cuda", "--dtype", "bfloat16", "--big", "--no-toy", "--backend", "vllm",
          "--out", "rollouts_gpu_vllm", *sys.argv[1:]])
