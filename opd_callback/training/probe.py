"""The callback's probe set: the fixed prompts every diagnostic of a run scores."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["probe_set"]


def _as_rows(data: Any, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of a list of dicts / ``datasets.Dataset`` / iterable; a fixed random sample of ``limit`` when given."""
    if data is None:
        return []
    if isinstance(data, dict):
        raise TypeError("probe_dataset must be a list of dicts or a datasets.Dataset, not a dict")
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        n = len(data)
        if limit is not None and n > limit:
            idx = sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=limit, replace=False))
        else:
            idx = list(range(n))
        return [dict(data[i]) for i in idx]
    rows = []
    for r in data:
        rows.append(dict(r))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def probe_set(trainer: Any, probe_dataset: Any, probe_size: int, seed: int,
              prepare_example: Callable[[dict], dict] | None) -> tuple[list[dict], str]:
    """The probe rows and where they came from: ``probe_dataset`` whole, else a fixed sample (seeded by ``seed``) of
    ``probe_size`` rows of ``trainer.train_dataset``; each row mapped by ``prepare_example`` (the trainer adapter's,
    e.g. chat ``messages`` -> ``prompt``). Raises ``ValueError`` when the set is empty or a row has no prompt."""
    if probe_dataset is None:
        rows = _as_rows(getattr(trainer, "train_dataset", None), limit=probe_size, seed=seed)
        source = f"a fixed sample of {len(rows)} rows of trainer.train_dataset"
    else:
        rows = _as_rows(probe_dataset)
        source = f"probe_dataset ({len(rows)} rows)"
    if not rows:
        raise ValueError(
            "the probe set is empty: pass probe_dataset=[{'prompt': ..., <reward columns>}, ...] or give the "
            "trainer a non-empty train_dataset"
        )
    if prepare_example is not None:
        rows = [prepare_example(r) for r in rows]
    missing = [i for i, r in enumerate(rows) if "prompt" not in r]
    if missing:
        raise ValueError(
            f"probe row {missing[0]} (from {source}) has no 'prompt' field (its fields: {sorted(rows[missing[0]])}); "
            "pass probe_dataset=[{'prompt': ..., <reward columns>}, ...]"
        )
    return rows, source
