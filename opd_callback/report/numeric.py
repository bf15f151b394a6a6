"""The two number conversions every statistic, report and logger uses."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["as_float", "finite_or_none"]


def as_float(x: Any) -> float:
    """``float(x)``, or NaN where ``x`` is None or not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when it is finite, else None (None, NaN, ±inf or not a number): the form JSON and loggers take."""
    v = as_float(x)
    return v if math.isfinite(v) else None
