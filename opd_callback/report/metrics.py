"""The configuration-level decision metrics (method.md §6, "Deciding between configurations"): stake-weighted
aggregates pooled over the nodes of a report, each with a question-bootstrap CI from resampling weights shared by
every configuration (so differences between configurations are paired)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from opd_callback.report.bootstrap import bootstrap_p, bootstrap_settings, group_weights, percentile_ci
from opd_callback.report.records import SUBSETS
from opd_callback.report.selection import choose_reference, is_significant, report_configs, subset_rows

__all__ = ["METRICS", "DECISION_METRIC", "SUM_COLUMNS", "node_terms", "metric_values", "PooledMetrics",
           "pooled_metrics", "metric_table", "metric_differences"]

#: Every configuration-level metric, with what it means. All are pooled over the nodes of a report (ratios of sums,
#: not means of per-question ratios) and get a question-bootstrap CI from the same resampling weights, so that
#: differences between configurations are paired.
METRICS: dict[str, str] = {
    "alignment_mean": "mean per-node cosine cos(g, d) over non-degenerate nodes (every node weighs the same)",
    "alignment_weighted": "per-node cosine weighted by |g| (what is at stake at the node, to first order)",
    "step_alignment": "cos(G, D) of the concatenated per-node vectors = sum <g,d> / sqrt(sum |g|^2 sum |d|^2): the "
    "first-order success gain of the configuration's distillation step over all probed tokens, as a fraction of the "
    "gain of the ideal step of the same norm",
    "teacher_gain": "sum A_T / sum (max_j S_j - V): the success gained if the student adopted the teacher's "
    "distribution at every probed node, as a fraction of what adopting the best candidate would gain (1 = as good "
    "as the oracle, 0 = no better than the student, < 0 = worse than the student)",
    "teacher_advantage": "mean teacher advantage A_T = sum_j (Q_j - P_j) S_j per node (success probability)",
}
#: The metric that decides: rankings, "beats" warnings, early stopping, the report's verdict. Chosen from the
#: robustness benchmark (benchmarks/bench_robustness.py; README "Verdicts across labs").
DECISION_METRIC = "teacher_gain"
#: Per-(config, question) sums every metric is computed from.
SUM_COLUMNS = ("a", "n_valid", "g", "gcos", "inner", "g2", "d2", "adv", "best", "n")


def node_terms(df: pd.DataFrame) -> pd.DataFrame:
    """Per (node, configuration) row: the terms whose per-question sums give every metric of :data:`METRICS`."""
    out = pd.DataFrame({"prompt_index": df["prompt_index"].to_numpy(), "config": df["config"].to_numpy()})
    num = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) if c in df.columns
           else np.full(len(df), np.nan)
           for c in ("alignment", "inner", "g_norm", "d_norm", "teacher_advantage", "value")}
    deg = df["degenerate"].astype(bool).to_numpy() if len(df) else np.zeros(0, bool)
    valid = ~deg & np.isfinite(num["alignment"])
    a = np.where(valid, num["alignment"], 0.0)
    g = np.where(np.isfinite(num["g_norm"]), num["g_norm"], 0.0)
    d = np.where(np.isfinite(num["d_norm"]), num["d_norm"], 0.0)
    inner = np.where(np.isfinite(num["inner"]), num["inner"], 0.0)
    best = np.array([max(s) if len(s) else np.nan for s in df["candidate_success"]], dtype=np.float64) - num["value"] \
        if len(df) else np.zeros(0)
    adv = num["teacher_advantage"]
    finite_adv = np.isfinite(adv) & np.isfinite(best)
    out["a"] = a
    out["n_valid"] = valid.astype(np.float64)
    out["g"] = np.where(valid, g, 0.0)
    out["gcos"] = np.where(valid, g * a, 0.0)
    out["inner"] = inner
    out["g2"] = g**2
    out["d2"] = d**2
    out["adv"] = np.where(finite_adv, adv, 0.0)
    out["best"] = np.where(finite_adv, np.maximum(best, 0.0), 0.0)
    out["n"] = finite_adv.astype(np.float64)
    return out


def metric_values(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric from pooled sums (last axis: :data:`SUM_COLUMNS`, any leading shape)."""
    s = {c: sums[..., i] for i, c in enumerate(SUM_COLUMNS)}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "alignment_mean": np.where(s["n_valid"] > 0, s["a"] / s["n_valid"], np.nan),
            "alignment_weighted": np.where(s["g"] > 0, s["gcos"] / s["g"], np.nan),
            "step_alignment": np.where(s["g2"] * s["d2"] > 0, s["inner"] / np.sqrt(s["g2"] * s["d2"]), np.nan),
            "teacher_gain": np.where(s["best"] > 0, s["adv"] / s["best"], np.nan),
            "teacher_advantage": np.where(s["n"] > 0, s["adv"] / s["n"], np.nan),
        }


class PooledMetrics:
    """Per-(configuration, question) sums of one report subset and their question bootstrap.

    ``point[config][metric]`` is the metric on all nodes; ``boot[config][metric]`` its bootstrap distribution. Every
    configuration uses the **same** resampling weights (questions are resampled together), so
    ``boot[a][m] - boot[b][m]`` is the bootstrap distribution of the paired difference.
    """

    def __init__(self, records: pd.DataFrame, configs: Sequence[str], *, samples: int = 1000, seed: int = 0) -> None:
        terms = node_terms(records) if len(records) \
            else pd.DataFrame(columns=["prompt_index", "config", *SUM_COLUMNS])
        self.questions = np.unique(terms["prompt_index"].to_numpy()) if len(terms) else np.zeros(0)
        q = len(self.questions)
        self.weights = group_weights(q, samples, seed) if q and samples > 0 else np.zeros((0, q))
        self.point: dict[str, dict[str, float]] = {}
        self.boot: dict[str, dict[str, np.ndarray]] = {}
        self.n_questions: dict[str, int] = {}
        for name in configs:
            part = terms[terms["config"] == name]
            table = np.zeros((q, len(SUM_COLUMNS)))
            if len(part):
                by_q = part.groupby("prompt_index")[list(SUM_COLUMNS)].sum()
                idx = np.searchsorted(self.questions, by_q.index.to_numpy())
                table[idx] = by_q.to_numpy(dtype=np.float64)
            self.n_questions[name] = int(part.loc[part["n_valid"] > 0, "prompt_index"].nunique()) if len(part) else 0
            self.point[name] = {k: float(v) for k, v in metric_values(table.sum(axis=0)).items()}
            self.boot[name] = metric_values(self.weights @ table)

    def ci(self, config: str, metric: str, level: float = 0.95) -> tuple[float, float]:
        """The percentile interval of ``metric`` for ``config``."""
        return percentile_ci(self.boot[config][metric], level)

    def paired(self, config: str, reference: str, metric: str, level: float = 0.95) -> dict[str, float]:
        """``metric(config) - metric(reference)`` with its paired question-bootstrap CI and p-value."""
        diff = self.point[config][metric] - self.point[reference][metric]
        boot = self.boot[config][metric] - self.boot[reference][metric]
        lo, hi = percentile_ci(boot, level)
        return {"diff": float(diff), "diff_ci_low": lo, "diff_ci_high": hi, "p_value": bootstrap_p(boot)}


def pooled_metrics(
    report: Any,
    *,
    subset: str = "all",
    samples: int | None = None,
    seed: int | None = None,
) -> PooledMetrics:
    """:class:`PooledMetrics` of a report's ``subset`` of rollouts (``"all"``, ``"correct"``, ``"incorrect"``)."""
    samples, _, seed = bootstrap_settings(report, samples, None, seed)
    return PooledMetrics(subset_rows(report.records, subset), report_configs(report), samples=samples, seed=seed)


def metric_table(
    report: Any, *, samples: int | None = None, level: float | None = None, seed: int | None = None
) -> pd.DataFrame:
    """Every metric of :data:`METRICS` per configuration x {all, correct, incorrect}, with question-bootstrap CIs.

    Columns: ``config, subset, metric, value, ci_low, ci_high, n_questions``.
    """
    samples, level, seed = bootstrap_settings(report, samples, level, seed)
    rows = []
    for subset in SUBSETS:
        pm = pooled_metrics(report, subset=subset, samples=samples, seed=seed)
        for name in report_configs(report):
            for metric in METRICS:
                lo, hi = pm.ci(name, metric, level)
                rows.append({"config": name, "subset": subset, "metric": metric, "value": pm.point[name][metric],
                             "ci_low": lo, "ci_high": hi, "n_questions": pm.n_questions[name]})
    return pd.DataFrame(rows, columns=["config", "subset", "metric", "value", "ci_low", "ci_high", "n_questions"])


def metric_differences(
    report: Any,
    metric: str = DECISION_METRIC,
    *,
    reference: str | None = None,
    subset: str = "all",
    samples: int | None = None,
    level: float | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Each configuration's ``metric`` minus the reference's, with a paired question-bootstrap CI.

    The reference is ``reference``, else ``"current"`` when present, else the configuration with the highest
    ``metric``. Columns: ``config, reference, metric, value, diff, diff_ci_low, diff_ci_high, p_value, significant``
    (CI excludes 0), ``n_questions`` (questions with a non-degenerate node).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    samples, level, seed = bootstrap_settings(report, samples, level, seed)
    names = report_configs(report)
    pm = pooled_metrics(report, subset=subset, samples=samples, seed=seed)
    cols = ["config", "reference", "metric", "value", "diff", "diff_ci_low", "diff_ci_high", "p_value", "significant",
            "n_questions"]
    if not names:
        return pd.DataFrame(columns=cols)
    reference = choose_reference(names, reference, {n: pm.point[n][metric] for n in names})
    rows = []
    for n in names:
        p = pm.paired(n, reference, metric, level) if n != reference else {
            "diff": 0.0, "diff_ci_low": float("nan"), "diff_ci_high": float("nan"), "p_value": float("nan")}
        lo, hi = p["diff_ci_low"], p["diff_ci_high"]
        rows.append({"config": n, "reference": reference, "metric": metric, "value": pm.point[n][metric], **p,
                     "significant": is_significant(lo, hi),
                     "n_questions": pm.n_questions[n]})
    return pd.DataFrame(rows, columns=cols)


