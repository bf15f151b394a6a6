"""The paper's analyses on an :class:`~opd_callback.report.AlignmentReport` (method.md §6).

Every function takes a report (anything with ``records``, ``rollouts`` and ``meta`` attributes) and returns a
``pandas.DataFrame``; :class:`AlignmentReport` exposes them as methods (``ranking``, ``oracle_mask_gain``,
``correlations``, ``by_window``, ``per_question``). Confidence intervals come from a bootstrap that resamples
**questions** (``prompt_index``): nodes of one question are not independent. Degenerate nodes (``|g|`` or ``|d|``
below eps) are excluded from alignment statistics and counted separately.

The decision metrics (:data:`METRICS`, :class:`PooledMetrics`, ...) live in :mod:`opd_callback.report.metrics`, the
bootstrap in :mod:`opd_callback.report.bootstrap`; both are importable from here too. This module imports neither
torch, TRL nor wandb.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from opd_callback.report.bootstrap import (
    BootstrapSettings,
    bootstrap_means,
    bootstrap_p,
    bootstrap_settings,
    group_weights,
    percentile_ci,
)
from opd_callback.report.metrics import (
    DECISION_METRIC,
    METRICS,
    PooledMetrics,
    metric_differences,
    metric_table,
    pooled_metrics,
)
from opd_callback.report.numeric import as_float
from opd_callback.report.records import SUBSETS
from opd_callback.report.selection import (
    choose_reference,
    is_significant,
    node_key,
    report_configs,
    rollout_key,
    subset_rows,
    valid_rows,
)

__all__ = [
    "DECISION_METRIC",
    "METRICS",
    "PooledMetrics",
    "pooled_metrics",
    "metric_table",
    "metric_differences",
    "PROXIES",
    "SUBSETS",
    "subset_rows",
    "bootstrap_means",
    "percentile_ci",
    "paired_differences",
    "oracle_mask_gain",
    "oracle_mask_gain_per_rollout",
    "correlations",
    "by_window",
    "per_question",
    "question_winners",
    "kendall_tau",
    "ranking_agreement",
    "compare_reports",
    "window_label",
    "node_key",
]

PROXIES = ("kl_reverse", "kl_forward", "js", "student_entropy", "teacher_entropy", "position")


# --------------------------------------------------------------------------------------------------------------------
# helpers


def window_label(w: int) -> str:
    """``0 -> "[0,1)"``, ``1 -> "[1,2)"``, ``2 -> "[2,4)"``, ``3 -> "[4,8)"``, ..."""
    w = int(w)
    lo = 0 if w == 0 else 2 ** (w - 1)
    hi = 1 if w == 0 else 2**w
    return f"[{lo},{hi})"


# --------------------------------------------------------------------------------------------------------------------
# ranking with paired differences


_PAIRED_COLUMNS = ["config", "reference", "mean", "diff", "diff_ci_low", "diff_ci_high", "p_value", "significant",
                   "win_fraction", "n_paired", "n_paired_questions"]


def _paired_alignment(wide: pd.DataFrame | None, config: str, reference: str) -> pd.DataFrame:
    """At every node where both are non-degenerate: ``d`` = alignment of ``config`` minus the reference's, and the
    node's ``prompt_index``."""
    if wide is None or config not in wide.columns or reference not in wide.columns:
        return pd.DataFrame(columns=["d", "prompt_index"])
    both = wide[[config, reference]].dropna()
    return pd.DataFrame({"d": both[config].to_numpy() - both[reference].to_numpy(),
                         "prompt_index": both.index.get_level_values("prompt_index")})


def _paired_row(pair: pd.DataFrame, boot: BootstrapSettings) -> dict:
    """The mean of the paired differences ``pair["d"]`` with its question-bootstrap CI, p-value and win share."""
    d = pair["d"].to_numpy(dtype=np.float64)
    dist = bootstrap_means(d, pair["prompt_index"].to_numpy(), samples=boot.samples, seed=boot.seed)
    lo, hi = percentile_ci(dist, boot.level)
    return {"diff": float(d.mean()) if d.size else float("nan"), "diff_ci_low": lo, "diff_ci_high": hi,
            "p_value": bootstrap_p(dist), "significant": is_significant(lo, hi),
            "win_fraction": float((d > 0).mean()) if d.size else float("nan"), "n_paired": int(d.size),
            "n_paired_questions": int(pair["prompt_index"].nunique())}


def _reference_row(rec: pd.DataFrame, reference: str) -> dict:
    """The reference against itself: difference 0, no interval, every valid node of it "paired"."""
    own = rec[rec["config"] == reference]
    return {"diff": 0.0, "diff_ci_low": float("nan"), "diff_ci_high": float("nan"), "p_value": float("nan"),
            "significant": False, "win_fraction": float("nan"), "n_paired": int(len(own)),
            "n_paired_questions": int(own["prompt_index"].nunique())}


def paired_differences(
    report: Any, *, reference: str | None = None, subset: str = "all",
    samples: int | None = None, level: float | None = None, seed: int | None = None,
) -> pd.DataFrame:
    """Each configuration's mean alignment minus the reference's, on the **same nodes** (paired).

    The reference is ``reference`` when given, else a configuration named ``"current"`` when there is one, else the
    configuration with the highest mean alignment on ``subset``. For each configuration the difference
    ``alignment_c(u) - alignment_ref(u)`` is taken at every node ``u`` where both are non-degenerate; its mean gets a
    question-bootstrap CI and a two-sided bootstrap p-value. ``significant`` is True when the CI excludes 0.

    Returns one row per configuration: ``config, reference, mean, diff, diff_ci_low, diff_ci_high, p_value,
    significant, win_fraction`` (share of paired nodes where the configuration beats the reference), ``n_paired``,
    ``n_paired_questions``.
    """
    boot = bootstrap_settings(report, samples, level, seed)
    names = report_configs(report)
    rec = valid_rows(subset_rows(report.records, subset))
    means = {n: as_float(rec.loc[rec["config"] == n, "alignment"].astype(float).mean()) for n in names}
    reference = choose_reference(names, reference, means)
    if reference is None:
        return pd.DataFrame(columns=_PAIRED_COLUMNS)
    wide = rec.pivot_table(index=node_key(rec), columns="config", values="alignment", aggfunc="first") \
        if len(rec) else None
    rows = [{"config": n, "reference": reference, "mean": means[n],
             **(_reference_row(rec, n) if n == reference else _paired_row(_paired_alignment(wide, n, reference), boot))}
            for n in names]
    return pd.DataFrame(rows, columns=_PAIRED_COLUMNS)


# --------------------------------------------------------------------------------------------------------------------
# oracle mask gain


def _need_norms(df: pd.DataFrame) -> None:
    """Raise a ValueError that says what to do when records lack the columns of the oracle mask gain."""
    missing = [c for c in ("g_norm", "d_norm", "inner") if c not in df.columns]
    if missing:
        raise ValueError(
            f"these records have no {missing} column(s): the oracle mask gain needs each node's inner product and "
            "norms |g|, |d| (the g_norm / d_norm columns, which records of older versions lack); rerun the diagnostic "
            "to get them"
        )


def oracle_mask_gain_per_rollout(report: Any) -> pd.DataFrame:
    """Per rollout and configuration: ``cos(G, D)``, ``cos(G, D+)`` and their ratio (method.md §6).

    ``G`` / ``D`` concatenate the rollout's per-node ideal gradients / distillation directions; ``D+`` keeps only the
    nodes with positive alignment (``inner > 0``). From scalars: ``cos(G, D) = Σ inner / sqrt(Σ|g|² Σ|d|²)`` and
    ``cos(G, D+) = Σ_{inner>0} inner / sqrt(Σ|g|² Σ_{inner>0} |d|²)``. ``gain`` is NaN when ``cos(G, D) <= 0`` (the
    ratio has no meaning there) and ``cos_masked`` is NaN when no node has positive alignment.
    """
    rec = report.records
    cols = rollout_key(rec) + ["config", "rollout_correct", "n_nodes", "n_positive", "cos_full", "cos_masked", "gain"]
    if rec.empty:
        return pd.DataFrame(columns=cols)
    _need_norms(rec)
    df = rec[rollout_key(rec) + ["config", "rollout_correct", "inner", "g_norm", "d_norm"]].copy()
    for c in ("inner", "g_norm", "d_norm"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df = df[np.isfinite(df[["inner", "g_norm", "d_norm"]].to_numpy()).all(axis=1)]
    pos = df["inner"] > 0
    df["g2"] = df["g_norm"] ** 2
    df["d2"] = df["d_norm"] ** 2
    df["inner_pos"] = df["inner"].where(pos, 0.0)
    df["d2_pos"] = df["d2"].where(pos, 0.0)
    df["is_pos"] = pos.astype(int)
    g = df.groupby(rollout_key(df) + ["config"], sort=False).agg(
        rollout_correct=("rollout_correct", "first"),
        n_nodes=("inner", "size"),
        n_positive=("is_pos", "sum"),
        inner=("inner", "sum"),
        g2=("g2", "sum"),
        d2=("d2", "sum"),
        inner_pos=("inner_pos", "sum"),
        d2_pos=("d2_pos", "sum"),
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        full_den = np.sqrt(g["g2"] * g["d2"])
        cos_full = np.where(full_den > 0, g["inner"] / full_den, np.nan)
        mask_den = np.sqrt(g["g2"] * g["d2_pos"])
        cos_masked = np.where(mask_den > 0, g["inner_pos"] / mask_den, np.nan)
        gain = np.where(cos_full > 0, cos_masked / cos_full, np.nan)
    out = g[["rollout_correct", "n_nodes", "n_positive"]].copy()
    out["cos_full"] = cos_full
    out["cos_masked"] = cos_masked
    out["gain"] = gain
    return out.reset_index()[cols]


def oracle_mask_gain(
    report: Any, *, samples: int | None = None, level: float | None = None, seed: int | None = None
) -> pd.DataFrame:
    """Oracle mask gain per configuration x {all, correct, incorrect}.

    Columns: ``gain`` = mean ``cos(G, D+)`` / mean ``cos(G, D)`` over rollouts where both are defined (ratio of
    means, with a question-bootstrap CI ``gain_ci_low/high``), ``gain_median`` (median of per-rollout ratios over
    rollouts with ``cos(G, D) > 0``), ``cos_full``, ``cos_masked`` (means), ``masked_fraction`` (share of nodes the
    oracle drops), ``n_rollouts``, ``n_questions``.
    """
    samples, level, seed = bootstrap_settings(report, samples, level, seed)
    per = oracle_mask_gain_per_rollout(report)
    rows = []
    for name in report_configs(report):
        part = per[per["config"] == name]
        for subset in SUBSETS:
            p = subset_rows(part, subset)
            both = p[np.isfinite(p["cos_full"].astype(float)) & np.isfinite(p["cos_masked"].astype(float))]
            cf = both["cos_full"].to_numpy(dtype=np.float64)
            cm = both["cos_masked"].to_numpy(dtype=np.float64)
            row = {"config": name, "subset": subset, "n_rollouts": int(len(both)),
                   "n_questions": int(both["prompt_index"].nunique()) if len(both) else 0}
            if len(both):
                mf, mm = float(cf.mean()), float(cm.mean())
                gain = mm / mf if mf > 0 else float("nan")
                groups = both["prompt_index"].to_numpy()
                bf = bootstrap_means(cf, groups, samples=samples, seed=seed)
                bm = bootstrap_means(cm, groups, samples=samples, seed=seed)  # same weights: same seed, same groups
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(bf > 0, bm / bf, np.nan)
                lo, hi = percentile_ci(ratio, level) if samples > 0 else (float("nan"), float("nan"))
                g = p["gain"].to_numpy(dtype=np.float64)
                g = g[np.isfinite(g)]
                nodes = float(p["n_nodes"].sum())
                row.update(
                    cos_full=mf, cos_masked=mm, gain=gain, gain_ci_low=lo, gain_ci_high=hi,
                    gain_median=float(np.median(g)) if g.size else float("nan"),
                    masked_fraction=float(1 - p["n_positive"].sum() / nodes) if nodes else float("nan"),
                )
            else:
                row.update(cos_full=float("nan"), cos_masked=float("nan"), gain=float("nan"),
                           gain_ci_low=float("nan"), gain_ci_high=float("nan"), gain_median=float("nan"),
                           masked_fraction=float("nan"))
            rows.append(row)
    cols = ["config", "subset", "gain", "gain_ci_low", "gain_ci_high", "gain_median", "cos_full", "cos_masked",
            "masked_fraction", "n_rollouts", "n_questions"]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------------------------------
# cheap proxies


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN for fewer than 3 points or a constant vector."""
    if x.size < 3:
        return float("nan")
    x = x - x.mean()
    y = y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points or a constant vector."""
    if x.size < 3:
        return float("nan")
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    return _pearson(rx, ry)


def correlations(
    report: Any, proxies: Sequence[str] = PROXIES, *, by_window: bool = True, min_nodes: int = 3
) -> pd.DataFrame:
    """Pearson and Spearman correlation of per-node alignment with cheap proxies (KL, JS, entropy, position).

    One row per configuration x subset (all / correct / incorrect) x window (``"all"`` and, with ``by_window``, each
    depth window) x proxy: ``n``, ``pearson``, ``spearman``. Non-degenerate nodes with a finite proxy only; fewer than
    ``min_nodes`` nodes or a constant column give NaN. (The paper: weak, positive for KL/JS.)
    """
    rec = valid_rows(report.records)
    rows = []
    for name in report_configs(report):
        part = rec[rec["config"] == name]
        for subset in SUBSETS:
            sub = subset_rows(part, subset)
            groups: list[tuple[str, pd.DataFrame]] = [("all", sub)]
            if by_window and len(sub):
                groups += [(window_label(w), g) for w, g in sorted(sub.groupby("window"), key=lambda kv: kv[0])]
            for wlabel, g in groups:
                a = g["alignment"].to_numpy(dtype=np.float64)
                for proxy in proxies:
                    if proxy not in g.columns:
                        continue
                    x = pd.to_numeric(g[proxy], errors="coerce").to_numpy(dtype=np.float64)
                    ok = np.isfinite(x) & np.isfinite(a)
                    n = int(ok.sum())
                    big = n >= min_nodes
                    rows.append({
                        "config": name, "subset": subset, "window": wlabel, "proxy": proxy, "n": n,
                        "pearson": _pearson(x[ok], a[ok]) if big else float("nan"),
                        "spearman": _spearman(x[ok], a[ok]) if big else float("nan"),
                    })
    return pd.DataFrame(rows, columns=["config", "subset", "window", "proxy", "n", "pearson", "spearman"])


# --------------------------------------------------------------------------------------------------------------------
# depth windows, questions


def by_window(report: Any) -> pd.DataFrame:
    """:meth:`AlignmentReport.stats` per configuration x subset x depth window (``window``, ``window_label``)."""
    rec = report.records
    rows = []
    for name in report_configs(report):
        part = rec[rec["config"] == name]
        for subset in SUBSETS:
            sub = subset_rows(part, subset)
            for w in sorted(int(x) for x in sub["window"].dropna().unique()):
                st = report.stats(sub[sub["window"] == w])
                rows.append({"config": name, "subset": subset, "window": w, "window_label": window_label(w), **st})
    cols = ["config", "subset", "window", "window_label"]
    df = pd.DataFrame(rows)
    return df if len(df) else pd.DataFrame(columns=cols)


def per_question(report: Any) -> pd.DataFrame:
    """One row per question x configuration.

    Columns: ``prompt_index, config, n_nodes, n_valid, alignment_mean, alignment_correct, alignment_incorrect,
    positive_fraction, degenerate_fraction, teacher_advantage, success_rate`` (the question's base rollouts),
    ``n_rollouts``, ``rank`` (1 = best configuration on that question by mean alignment) and ``best``.
    """
    rec = report.records
    rol = report.rollouts
    sr = (
        rol.groupby("prompt_index")["correct"].agg(lambda s: float(s.astype(float).mean()))
        if len(rol) else pd.Series(dtype=float)
    )
    nr = rol.groupby("prompt_index").size() if len(rol) else pd.Series(dtype=int)
    rows = []
    if len(rec):
        for (q, name), g in rec.groupby(["prompt_index", "config"], sort=True):
            v = valid_rows(g)
            a = v["alignment"].to_numpy(dtype=np.float64)
            corr = v["rollout_correct"].astype(bool).to_numpy()
            rows.append({
                "prompt_index": q,
                "config": name,
                "n_nodes": int(len(g)),
                "n_valid": int(len(v)),
                "alignment_mean": float(a.mean()) if a.size else float("nan"),
                "alignment_correct": float(a[corr].mean()) if corr.any() else float("nan"),
                "alignment_incorrect": float(a[~corr].mean()) if (~corr).any() else float("nan"),
                "positive_fraction": float((a > 0).mean()) if a.size else float("nan"),
                "degenerate_fraction": float(g["degenerate"].astype(bool).mean()),
                "teacher_advantage": float(pd.to_numeric(g["teacher_advantage"], errors="coerce").mean()),
                "success_rate": float(sr.get(q, float("nan"))),
                "n_rollouts": int(nr.get(q, 0)),
            })
    cols = ["prompt_index", "config", "n_nodes", "n_valid", "alignment_mean", "alignment_correct",
            "alignment_incorrect", "positive_fraction", "degenerate_fraction", "teacher_advantage", "success_rate",
            "n_rollouts", "rank", "best"]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["rank"] = df.groupby("prompt_index")["alignment_mean"].rank(ascending=False, method="min")
    df["best"] = df["rank"] == 1
    return df[cols]


def question_winners(report: Any) -> pd.DataFrame:
    """How many questions each configuration wins (highest mean alignment; ties count for each): ``config, wins,
    win_fraction, n_questions``. "No configuration wins everywhere" reads off this table."""
    pq = per_question(report)
    pq = pq[np.isfinite(pq["alignment_mean"].astype(float))] if len(pq) else pq
    nq = int(pq["prompt_index"].nunique()) if len(pq) else 0
    rows = []
    for name in report_configs(report):
        wins = int(pq[(pq["config"] == name) & pq["best"].astype(bool)].shape[0]) if len(pq) else 0
        rows.append({"config": name, "wins": wins, "win_fraction": wins / nq if nq else float("nan"),
                     "n_questions": nq})
    return pd.DataFrame(rows, columns=["config", "wins", "win_fraction", "n_questions"])


# --------------------------------------------------------------------------------------------------------------------
# ranking agreement (e.g. logit space vs parameter space)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two score vectors (ties handled); NaN when either is constant or shorter than 2."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    if n < 2:
        return float("nan")
    i, j = np.triu_indices(n, 1)
    sx = np.sign(x[i] - x[j])
    sy = np.sign(y[i] - y[j])
    n1 = float((sx != 0).sum())
    n2 = float((sy != 0).sum())
    if n1 == 0 or n2 == 0:
        return float("nan")
    return float((sx * sy).sum() / math.sqrt(n1 * n2))


def ranking_agreement(
    records: pd.DataFrame, a: str = "alignment", b: str = "alignment_logits", *, level: str = "node"
) -> dict:
    """How often two per-node scores rank the configurations alike.

    ``level="node"``: at every node where both columns are finite for every configuration; ``level="question"``: on
    per-question means. Returns ``{"n", "kendall_tau_mean", "kendall_tau_median", "top1_agreement"}`` (top-1: the
    share of nodes/questions whose best configuration is the same under both scores). Needs at least two
    configurations.
    """
    if a not in records.columns or b not in records.columns:
        raise ValueError(f"records need columns {a!r} and {b!r} (run with RolloutSettings(space='params'))")
    df = records[[*node_key(records), "config", a, b]].copy()
    df[a] = pd.to_numeric(df[a], errors="coerce")
    df[b] = pd.to_numeric(df[b], errors="coerce")
    if level == "question":
        df = df.groupby(["prompt_index", "config"], as_index=False)[[a, b]].mean()
        key = ["prompt_index"]
    elif level == "node":
        key = node_key(records)
    else:
        raise ValueError(f"level must be 'node' or 'question', got {level!r}")
    taus, tops = [], []
    n_cfg = df["config"].nunique()
    for _, g in df.groupby(key, sort=False):
        if len(g) != n_cfg or n_cfg < 2 or not np.isfinite(g[[a, b]].to_numpy()).all():
            continue
        xa, xb = g[a].to_numpy(), g[b].to_numpy()
        tau = kendall_tau(xa, xb)
        if math.isfinite(tau):
            taus.append(tau)
        tops.append(bool(np.argmax(xa) == np.argmax(xb)))
    return {
        "n": len(tops),
        "kendall_tau_mean": float(np.mean(taus)) if taus else float("nan"),
        "kendall_tau_median": float(np.median(taus)) if taus else float("nan"),
        "top1_agreement": float(np.mean(tops)) if tops else float("nan"),
    }


# --------------------------------------------------------------------------------------------------------------------
# two runs side by side


def compare_reports(
    a: Any,
    b: Any,
    names: tuple[str, str] = ("A", "B"),
    *,
    subset: str = "all",
    samples: int | None = None,
    level: float | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Mean alignment of each configuration in two runs and the difference ``B - A`` with a question-bootstrap CI.

    Questions are resampled jointly over the union of both runs' ``prompt_index`` values (the same weight for a
    question in both runs), so two checkpoints diagnosed on the same prompts get a paired-by-question interval; runs on
    different prompts get independent resampling in effect. Columns: ``config, mean_<A>, ci_low_<A>, ci_high_<A>,
    mean_<B>, ..., diff, diff_ci_low, diff_ci_high, significant, n_<A>, n_<B>``.
    """
    samples, level, seed = bootstrap_settings(a, samples, level, seed)
    na, nb = names
    ra, rb = valid_rows(subset_rows(a.records, subset)), valid_rows(subset_rows(b.records, subset))
    qs = np.union1d(ra["prompt_index"].unique(), rb["prompt_index"].unique()) if len(ra) or len(rb) else np.zeros(0)
    w = group_weights(len(qs), samples, seed) if len(qs) and samples > 0 else np.zeros((0, len(qs)))
    pos = {q: i for i, q in enumerate(qs.tolist())}

    def sums(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        s = np.zeros(len(qs))
        c = np.zeros(len(qs))
        if len(df):
            g = df.groupby("prompt_index")["alignment"].agg(["sum", "count"])
            for q, row in g.iterrows():
                s[pos[q]] = row["sum"]
                c[pos[q]] = row["count"]
        return s, c

    names_all = list(dict.fromkeys(report_configs(a) + report_configs(b)))
    rows = []
    for n in names_all:
        sa, ca = sums(ra[ra["config"] == n])
        sb, cb = sums(rb[rb["config"] == n])
        row: dict[str, Any] = {"config": n}
        boots = {}
        for tag, s, c in ((na, sa, ca), (nb, sb, cb)):
            tot = c.sum()
            row[f"mean_{tag}"] = float(s.sum() / tot) if tot else float("nan")
            with np.errstate(divide="ignore", invalid="ignore"):
                bm = (w @ s) / (w @ c) if len(w) else np.zeros(0)
            boots[tag] = bm
            row[f"ci_low_{tag}"], row[f"ci_high_{tag}"] = percentile_ci(bm, level)
            row[f"n_{tag}"] = int(tot)
        row["diff"] = row[f"mean_{nb}"] - row[f"mean_{na}"]
        d = boots[nb] - boots[na] if len(w) else np.zeros(0)
        row["diff_ci_low"], row["diff_ci_high"] = percentile_ci(d, level)
        lo, hi = row["diff_ci_low"], row["diff_ci_high"]
        row["significant"] = is_significant(lo, hi)
        rows.append(row)
    return pd.DataFrame(rows)
