"""Which rows a statistic reads: node and rollout keys, subsets of rollouts, valid (non-degenerate) nodes, the
configurations of a report, and the reference of a paired comparison."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from opd_callback.report.records import SUBSETS

__all__ = ["node_key", "rollout_key", "subset_rows", "valid_rows", "report_configs", "choose_reference",
           "is_significant"]


def node_key(df: pd.DataFrame) -> list[str]:
    """Columns that identify a node: ``prompt_index, rollout_index, position`` (and ``step`` in training records)."""
    key = ["prompt_index", "rollout_index", "position"]
    return (["step"] + key) if "step" in df.columns else key


def rollout_key(df: pd.DataFrame) -> list[str]:
    """Columns that identify a rollout: ``prompt_index, rollout_index`` (and ``step`` in training records)."""
    key = ["prompt_index", "rollout_index"]
    return (["step"] + key) if "step" in df.columns else key


def subset_rows(df: pd.DataFrame, subset: str) -> pd.DataFrame:
    """The rows of ``df`` on a subset of rollouts: ``"all"``, ``"correct"`` or ``"incorrect"`` (``rollout_correct``)."""
    if subset == "all":
        return df
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    return df[df["rollout_correct"].astype(bool) == (subset == "correct")]


def valid_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Non-degenerate rows with a finite alignment."""
    if df.empty:
        return df
    a = pd.to_numeric(df["alignment"], errors="coerce")
    return df[~df["degenerate"].astype(bool) & np.isfinite(a.to_numpy(dtype=np.float64))]


def report_configs(report: Any) -> list[str]:
    """The report's configurations (else those of its records, in order of appearance)."""
    names = list(getattr(report, "configs", []) or [])
    if not names and "config" in report.records.columns:
        names = list(dict.fromkeys(report.records["config"].tolist()))
    return names


def choose_reference(names: Sequence[str], reference: str | None, scores: dict[str, float]) -> str | None:
    """The reference of a paired comparison: ``reference`` when given (it must be a configuration), else
    ``"current"`` when scored, else the configuration with the highest finite score (else the first, if any)."""
    if reference is not None:
        if reference not in names:
            raise ValueError(f"reference {reference!r} is not a configuration of this report; use one of {names}")
        return reference
    if "current" in names:
        return "current"
    finite = {n: m for n, m in scores.items() if math.isfinite(m)}
    return max(finite, key=finite.get) if finite else (names[0] if names else None)


def is_significant(lo: float, hi: float) -> bool:
    """A difference is significant when its interval is finite and excludes 0."""
    return bool(math.isfinite(lo) and (lo > 0 or hi < 0))
