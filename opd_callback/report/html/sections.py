"""The sections of the HTML report (one function each, element id in brackets): summary (``summary``), verdict and
ranking (``ranking``), alignment histograms (``histograms``), depth windows (``windows``), success rates
(``success``), oracle mask gain (``oracle``), cheap proxies (``correlations``), question winners (``winners``) and
the per-question table (``question-table``). The token-by-token view (``questions``) is in
:mod:`opd_callback.report.html.questions`. ``docs/report.md`` explains how to read each.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from opd_callback.report import stats
from opd_callback.report.bootstrap import bootstrap_settings
from opd_callback.report.html.format import (
    GREEN,
    MISSING,
    RED,
    ci,
    esc,
    fmt,
    p_value,
    pct,
    series_color,
    signed_cell,
    table,
)
from opd_callback.report.html.page import section
from opd_callback.report.html.svg import svg_bars, svg_forest, svg_histogram, svg_lines
from opd_callback.report.numeric import as_float

__all__ = ["summary_section", "ranking_section", "histograms_section", "windows_section", "window_plot",
           "success_section", "oracle_section", "correlations_section", "winners_section", "question_table_section"]


def summary_section(report: Any) -> str:
    """Per configuration and subset of rollouts: the decision metric and mean alignment with their CIs, shares of
    positive and degenerate nodes, mean teacher advantage, counts."""
    summ = report.summary()
    rows = []
    for _, r in summ.iterrows():
        rows.append([
            esc(r["config"]), esc(r["subset"]), signed_cell(r.get("teacher_gain")),
            esc(ci(r.get("teacher_gain_ci_low"), r.get("teacher_gain_ci_high"))), signed_cell(r["alignment_mean"]),
            esc(ci(r["ci_low"], r["ci_high"])), signed_cell(r["alignment_median"]),
            esc(pct(r["positive_fraction"])), esc(pct(r["degenerate_fraction"])),
            esc(fmt(r["teacher_advantage"], 4, signed=True)), esc(int(r["n_nodes"])), esc(int(r["n_valid"])),
            esc(int(r["n_questions"])),
        ])
    lvl = int(round(100 * bootstrap_settings(report).level))
    tab = table(rows, ["configuration", "rollouts", "teacher_gain (decides)", f"{lvl}% CI", "mean alignment",
                       f"{lvl}% CI (questions)", "median",
                       "positive", "degenerate", "teacher adv. A_T", "nodes", "scored", "questions"], raw=True)
    return section(
        "summary", "Summary",
        "teacher_gain, the decision metric: the success gained by adopting the teacher where it differs from the "
        "student, as a fraction of what the best candidate token would gain (below 0: the teacher makes the student "
        "worse). Mean alignment: the mean cosine between each configuration's distillation direction and the ideal "
        "gradient, over non-degenerate "
        "nodes, for all rollouts and split by rollout correctness. The interval resamples whole questions. "
        "'positive' is the share of nodes where the teacher pushes towards success; 'degenerate' nodes (all "
        "candidates succeed or all fail, or teacher = student) are excluded from the means.",
        tab,
    )


def _ci_pair(interval: Any) -> tuple[Any, Any]:
    """``(low, high)`` of a ``[low, high]`` summary field; ``(None, None)`` when it is missing."""
    return (interval[0], interval[1]) if isinstance(interval, (list, tuple)) and len(interval) == 2 else (None, None)


def _ranking_row(r: pd.Series, ref: str, samples: int) -> list[str]:
    """One row of the ranking table (cells escaped)."""
    lo, hi = _ci_pair(r.get(f"{stats.DECISION_METRIC}_ci"))
    is_ref = r["config"] == ref
    sig = "" if is_ref else ("yes" if bool(r.get("significant")) else "no")
    nq = as_float(r.get("n_questions_valid"))
    return [
        esc(int(r["rank"])), esc(r["config"]), signed_cell(r["value"]), esc(ci(lo, hi)),
        signed_cell(r["alignment_mean"]), "reference" if is_ref else signed_cell(r.get("diff")),
        esc(ci(r.get("diff_ci_low"), r.get("diff_ci_high"))), esc(p_value(r.get("p_value"), samples)), esc(sig),
        esc(int(nq) if math.isfinite(nq) else 0),
    ]


def _verdict(r: pd.Series, ref: str) -> str | None:
    """What the ranking says about one configuration, if anything: its decision metric is surely below 0, or it
    beats the reference."""
    dm = stats.DECISION_METRIC
    hi = as_float(_ci_pair(r.get(f"{dm}_ci"))[1])
    if math.isfinite(hi) and hi < 0:
        return (f"{r['config']}: adopting this teacher where it differs from the student loses success "
                f"({dm} {fmt(r['value'], 3, signed=True)}, CI entirely below 0)")
    if r["config"] != ref and bool(r.get("significant")) and as_float(r.get("diff")) > 0:
        return (f"{r['config']} beats {ref} ({fmt(r.get('diff'), 3, signed=True)}, paired CI "
                f"{ci(r.get('diff_ci_low'), r.get('diff_ci_high'))})")
    return None


def ranking_section(report: Any) -> str:
    """The verdict (configurations surely below 0 or surely better than the reference) and the ranking by the
    decision metric, with paired differences against the reference, as a table and forest plots."""
    rk = report.ranking()
    if rk.empty:
        return section("ranking", "Verdict and ranking", "No configuration was scored.", "")
    dm = stats.DECISION_METRIC
    ref = str(rk["reference"].iloc[0]) if "reference" in rk.columns else ""
    samples = bootstrap_settings(report).samples
    rows = [_ranking_row(r, ref, samples) for _, r in rk.iterrows()]
    verdicts = [v for v in (_verdict(r, ref) for _, r in rk.iterrows()) if v is not None]
    ranking = table(rows, ["rank", "configuration", dm, "CI", "mean alignment", f"paired diff vs {ref}", "diff CI",
                           "p (bootstrap)", "significant", "questions"], raw=True)
    forest = svg_forest([(str(r["config"]), r["value"], *_ci_pair(r.get(f"{dm}_ci"))) for _, r in rk.iterrows()],
                        title=f"{dm} with CI")
    forest_diff = svg_forest([(str(r["config"]), r.get("diff"), r.get("diff_ci_low"), r.get("diff_ci_high"))
                              for _, r in rk.iterrows() if r["config"] != ref],
                             title=f"paired difference vs {ref}") if len(rk) > 1 else ""
    verdict = ("<ul>" + "".join(f"<li>{esc(v)}</li>" for v in verdicts) + "</ul>") if verdicts else (
        "<p>No configuration is significantly below 0 or significantly better than the reference.</p>")
    return section(
        "ranking", "Verdict and ranking",
        f"The decision metric is {dm}: {stats.METRICS[dm]}. It weighs each node by what is at stake there, so a "
        "teacher that is wrong exactly at the decisive tokens scores below 0 even when its mean alignment is high. "
        f"Configurations are compared with the reference ({ref}: the configuration named 'current' if there is one, "
        "else the best) on the same questions: a paired question-bootstrap interval of the difference; 'significant' "
        "means it excludes 0.",
        verdict + ranking + f'<div class="plots">{forest}{forest_diff}</div>',
    )


def _valid_alignment(df: pd.DataFrame) -> np.ndarray:
    """The alignments of the non-degenerate rows."""
    if df.empty:
        return np.zeros(0)
    ok = ~df["degenerate"].astype(bool)
    return pd.to_numeric(df.loc[ok, "alignment"], errors="coerce").to_numpy(dtype=np.float64)


def histograms_section(report: Any) -> str:
    """Per configuration: histograms of per-node alignment on correct and on incorrect rollouts."""
    rec = report.records
    plots = []
    for name in report.configs:
        part = rec[rec["config"] == name]
        corr = part[part["rollout_correct"].astype(bool)]
        inc = part[~part["rollout_correct"].astype(bool)]
        plots.append(svg_histogram([("correct", _valid_alignment(corr), GREEN),
                                    ("incorrect", _valid_alignment(inc), RED)], title=str(name)))
    return section(
        "histograms", "Alignment histograms by configuration and correctness",
        "Distribution of per-node alignment in [-1, 1] (share of scored nodes per bin), separately on correct "
        "(green) and incorrect (red) rollouts. Mass right of the dashed zero line helps; the paper finds alignment "
        "higher on incorrect rollouts, where there is something to fix.",
        f'<div class="plots">{"".join(plots)}</div>',
    )


def window_plot(bw: pd.DataFrame, configs: list[str], subset: str, title: str, ylabel: str = "") -> str:
    """Mean alignment with its CI per depth window (:meth:`AlignmentReport.by_window` table ``bw``), one line per
    configuration, on a subset of rollouts."""
    windows = sorted(int(w) for w in bw["window"].unique())
    series = []
    for i, name in enumerate(configs):
        part = bw[(bw["config"] == name) & (bw["subset"] == subset)].set_index("window")
        columns = [[part[col].get(w, float("nan")) if w in part.index else float("nan") for w in windows]
                   for col in ("alignment_mean", "ci_low", "ci_high")]
        series.append((str(name), *columns, series_color(i)))
    return svg_lines([stats.window_label(w) for w in windows], series, title=title, ylabel=ylabel)


def windows_section(report: Any) -> str:
    """Mean alignment by exponential depth window, per subset of rollouts (plots) and on all rollouts (table)."""
    bw = report.by_window()
    if bw.empty:
        return section("windows", "Alignment by depth window", "No nodes.", "")
    plots = [window_plot(bw, report.configs, subset, f"mean alignment by completion position ({subset} rollouts)",
                         ylabel="alignment") for subset in ("all", "incorrect", "correct")]
    rows = [[esc(r["config"]), esc(r["window_label"]), signed_cell(r["alignment_mean"]),
             esc(ci(r["ci_low"], r["ci_high"])), esc(pct(r["positive_fraction"])),
             esc(pct(r["degenerate_fraction"])), esc(int(r["n_nodes"]))]
            for _, r in bw[bw["subset"] == "all"].iterrows()]
    tab = table(rows, ["configuration", "positions", "mean alignment", "CI", "positive", "degenerate", "nodes"],
                raw=True)
    return section(
        "windows", "Alignment by depth window",
        "Nodes grouped by completion position in exponential windows [0,1), [1,2), [2,4), [4,8), ... Bars are "
        "question-bootstrap intervals. Look for where a teacher stops helping (often late in the completion).",
        f'<div class="plots">{"".join(plots)}</div><details><summary>table (all rollouts)</summary>{tab}'
        "</details>",
    )


def success_section(report: Any) -> str:
    """Success rates of the base rollouts per question, and the node success probability V."""
    rol = report.rollouts
    if rol.empty:
        return section("success", "Success rate", "No rollouts.", "")
    per_q = rol.groupby("prompt_index")["correct"].agg(lambda s: float(s.astype(float).mean()))
    n_q = len(per_q)
    hist = svg_histogram([("questions", per_q.to_numpy(dtype=np.float64), "#4477aa")], lo=0.0, hi=1.0, bins=10,
                         title="questions by success rate", width=320)
    top = per_q.sort_values(kind="stable")
    shown = top.iloc[:60]
    bars = svg_bars([str(q) for q in shown.index], shown.to_numpy(), title="success rate per question (lowest first"
                    + (f", 60 of {n_q})" if n_q > 60 else ")"), width=560)
    rec = report.records
    nodes = rec.drop_duplicates(stats.node_key(rec)) if len(rec) else rec
    val = pd.to_numeric(nodes["value"], errors="coerce").to_numpy(dtype=np.float64) if len(nodes) else np.zeros(0)
    vhist = svg_histogram([("node value V", val, "#997700")], lo=0.0, hi=1.0, bins=10,
                          title="node success probability V", width=320)
    cov = pd.to_numeric(nodes["covered_mass"], errors="coerce") if len(nodes) else pd.Series(dtype=float)
    facts = table([
        ["base rollouts", esc(len(rol))],
        ["success rate (all rollouts)", esc(pct(report.success_rate))],
        ["questions", esc(n_q)],
        ["questions never solved / always solved", esc(f"{int((per_q == 0).sum())} / {int((per_q == 1).sum())}")],
        ["nodes", esc(report.n_nodes)],
        ["mean covered mass of candidates", esc(pct(cov.mean()) if len(cov) else MISSING)],
    ], ["", "value"], raw=True)
    return section(
        "success", "Success rate",
        "How often the student's own rollouts are correct (reward >= threshold), per question, and the estimated "
        "success probability V at the scored nodes. Questions that are always or never solved give degenerate nodes "
        "(nothing to learn from the verifier). 'covered mass' is the student probability of the candidate tokens "
        "whose success was measured.",
        facts + f'<div class="plots">{hist}{bars}{vhist}</div>',
    )


def oracle_section(report: Any) -> str:
    """The oracle mask gain per configuration and subset (why it is missing, when the records lack norms)."""
    try:
        og = report.oracle_mask_gain()
    except ValueError as exc:
        return section("oracle", "Oracle mask gain", str(exc), "")
    rows = []
    for _, r in og.iterrows():
        rows.append([esc(r["config"]), esc(r["subset"]), esc(fmt(r["gain"], 2)),
                     esc(ci(r["gain_ci_low"], r["gain_ci_high"], 2)), esc(fmt(r["gain_median"], 2)),
                     signed_cell(r["cos_full"]), signed_cell(r["cos_masked"]), esc(pct(r["masked_fraction"])),
                     esc(int(r["n_rollouts"]))])
    tab = table(rows, ["configuration", "rollouts", "gain (ratio of means)", "CI", "median gain",
                       "cos(G, D)", "cos(G, D+)", "nodes masked", "rollouts used"], raw=True)
    return section(
        "oracle", "Oracle mask gain",
        "Treat a rollout's nodes as one long vector: G (ideal gradients) and D (distillation directions). D+ keeps "
        "only the nodes with positive alignment. gain = cos(G, D+) / cos(G, D): how much a perfect token mask would "
        "improve the teacher's signal (the paper: about 10-15x). Rollouts with no positive node, or all-degenerate "
        "ones, are left out; the median is over rollouts with cos(G, D) > 0.",
        tab,
    )


def correlations_section(report: Any) -> str:
    """Rank (and linear) correlations of per-node alignment with the cheap proxies, per subset."""
    cor = report.correlations(by_window=False)
    if cor.empty:
        return section("correlations", "Cheap proxies", "Not enough nodes.", "")
    parts = []
    names = report.configs
    for subset in ("all", "incorrect", "correct"):
        sub = cor[(cor["subset"] == subset) & (cor["window"] == "all")]
        rows = []
        for proxy in stats.PROXIES:
            ps = sub[sub["proxy"] == proxy].set_index("config")
            if ps.empty:
                continue
            cells = [esc(proxy)]
            for n in names:
                if n in ps.index:
                    r = ps.loc[n]
                    cells.append(f'{signed_cell(r["spearman"], 2)} <small>({fmt(r["pearson"], 2, True)})</small>')
                else:
                    cells.append(MISSING)
            rows.append(cells)
        parts.append(f"<h4>{esc(subset)} rollouts</h4>" + table(rows, ["proxy"] + [str(n) for n in names], raw=True))
    return section(
        "correlations", "Cheap proxies: correlation with alignment",
        "Spearman rank correlation (Pearson in brackets) between per-node alignment and quantities that need no "
        "targeted rollouts: KL(P||Q), KL(Q||P), JS, student and teacher entropy, completion position. The paper finds "
        "them weak (positive for KL/JS): they cannot replace the rollouts. Per depth window: "
        "AlignmentReport.correlations().",
        "".join(parts),
    )


def winners_section(report: Any) -> str:
    """How many questions each configuration wins."""
    w = report.question_winners()
    rows = [[esc(r["config"]), esc(int(r["wins"])), esc(pct(r["win_fraction"]))] for _, r in w.iterrows()]
    return section(
        "winners", "Which configuration wins each question",
        "Number of questions on which each configuration has the highest mean alignment (ties count for each). The "
        "paper: no configuration wins everywhere.",
        table(rows, ["configuration", "questions won", "share"], raw=True),
    )


def question_table_section(report: Any, limit: int = 300) -> str:
    """Mean alignment of every configuration on each question (the first ``limit`` questions)."""
    pq = report.per_question()
    if pq.empty:
        return section("question-table", "Per-question table", "No nodes.", "")
    names = report.configs
    wide = pq.pivot_table(index="prompt_index", columns="config", values="alignment_mean", aggfunc="first")
    sr = pq.groupby("prompt_index")["success_rate"].first()
    best = pq[pq["best"].astype(bool)].groupby("prompt_index")["config"].agg(lambda s: ", ".join(map(str, s)))
    rows = []
    for q in list(wide.index)[:limit]:
        cells = [f'<a href="#q{esc(q)}">{esc(q)}</a>', esc(pct(sr.get(q)))]
        for n in names:
            cells.append(signed_cell(wide.loc[q].get(n, float("nan"))))
        cells.append(esc(best.get(q, MISSING)))
        rows.append(cells)
    more = f"<p class=\"help\">first {limit} of {len(wide)} questions</p>" if len(wide) > limit else ""
    return section(
        "question-table", "Per-question table",
        "Mean alignment of each configuration on each question, the question's success rate, and the best "
        "configuration there. Full data: AlignmentReport.per_question().",
        table(rows, ["question", "success"] + [str(n) for n in names] + ["best"], raw=True) + more,
    )


