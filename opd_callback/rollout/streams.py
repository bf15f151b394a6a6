"""Per-row random streams: one splitmix64 stream per row of a sampling call, so a row's tokens do not depend on
which other rows share its batch (batch_size), on the order rows are processed, or on the path (prefix cache or not)."""

from __future__ import annotations

import torch

_U64 = 1 << 64


def _i64(c: int) -> int:
    c %= _U64
    return c - _U64 if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (wrapping multiplication)."""
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    return x ^ _lsr(x, 31)


def row_keys(seed: int, n: int, device=None) -> torch.Tensor:
    """Keys of rows ``0..n-1`` of one sampling call seeded ``seed``: int64 ``[n]``."""
    idx = torch.arange(n, dtype=torch.long, device=device)
    return _mix64(idx * _GOLDEN + _i64(seed))


def row_uniforms(keys: torch.Tensor, steps: int) -> torch.Tensor:
    """Uniform draws ``0..steps-1`` of each row's stream: float64 ``[len(keys), steps]`` in ``(0, 1]`` (53 random
    bits each; draw ``s`` of a row is splitmix64's output ``s`` from seed ``key``)."""
    offsets = torch.arange(1, steps + 1, dtype=torch.long, device=keys.device) * _GOLDEN
    bits = _mix64(keys[:, None] + offsets[None, :])
    return (_lsr(bits, 11) + 1).double() * (2.0**-53)


