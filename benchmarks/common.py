"""Shared helpers for the benchmarks: machine description, result files, models."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def random_qwen2(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, eos: int, seed: int = 0,
                 dtype=torch.float32, device="cpu"):
    """A random Qwen2 (``opd_callback.toy``'s builder; EOS doubles as PAD, 4096 positions) seeded with ``seed`` through
    the global RNG, cast to ``dtype`` on ``device``; in eval mode."""
    from opd_callback.toy import qwen2_config, random_model

    cfg = qwen2_config(vocab_size, eos, eos, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, max_position_embeddings=4096)
    return random_model(cfg, seed, fork_rng=False).to(device=device, dtype=dtype)
