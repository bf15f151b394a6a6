"""The question bootstrap: whole groups (questions, ``prompt_index``) are resampled with replacement, because the nodes
of one question are not independent. Every confidence interval and bootstrap p-value of the report comes from here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["BootstrapSettings", "bootstrap_settings", "group_weights", "bootstrap_means", "percentile_ci",
           "bootstrap_mean_ci", "bootstrap_p"]


class BootstrapSettings(NamedTuple):
    """How many resamples, the interval's level and the random seed."""

    samples: int
    level: float
    seed: int


def bootstrap_settings(
    report: Any, samples: int | None = None, level: float | None = None, seed: int | None = None
) -> BootstrapSettings:
    """The given values, else the report's ``meta["settings"]`` (``bootstrap_samples``, ``ci_level``, ``seed``),
    else 1000 resamples, a 95% level and seed 0."""
    s = dict(getattr(report, "meta", {}) or {}).get("settings", {}) or {}
    return BootstrapSettings(
        int(s.get("bootstrap_samples", 1000)) if samples is None else int(samples),
        float(s.get("ci_level", 0.95)) if level is None else float(level),
        int(s.get("seed", 0)) if seed is None else int(seed),
    )


def group_weights(n_groups: int, samples: int, seed: int) -> np.ndarray:
    """``samples x n_groups`` resampling counts: how often each group is drawn in each bootstrap replicate."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=samples).astype(np.float64)


def bootstrap_means(
    values: np.ndarray, groups: np.ndarray, *, samples: int = 1000, seed: int = 0
) -> np.ndarray:
    """Bootstrap distribution of the node-level mean when whole groups (questions) are resampled with replacement."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    if values.size == 0 or samples <= 0:
        return np.zeros(0)
    uniq, inv = np.unique(groups, return_inverse=True)
    q = len(uniq)
    sums = np.bincount(inv, weights=values, minlength=q)
    counts = np.bincount(inv, minlength=q).astype(np.float64)
    w = group_weights(q, samples, seed)
    den = w @ counts
    ok = den > 0
    return (w[ok] @ sums) / den[ok]


def percentile_ci(boot: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of a bootstrap distribution (its finite values); NaNs when there are none."""
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_mean_ci(
    values: np.ndarray,
    groups: np.ndarray,
    *,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of the node-level mean when whole groups (questions) are resampled with replacement."""
    return percentile_ci(bootstrap_means(values, groups, samples=samples, seed=seed), level)


def bootstrap_p(boot: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the mean is 0": twice the smaller tail mass at 0."""
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
