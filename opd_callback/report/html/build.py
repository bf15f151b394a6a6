"""The two HTML pages: :func:`build_html` (one report) and :func:`build_compare_html` (two runs side by side)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from opd_callback.report import stats
from opd_callback.report.html import sections
from opd_callback.report.html.format import ci, esc, pct, signed_cell, table
from opd_callback.report.html.page import page, section, write_page
from opd_callback.report.html.questions import questions_section
from opd_callback.report.html.svg import svg_forest
from opd_callback.report.html.tokens import load_tokenizer_from_meta

__all__ = ["SECTIONS", "build_html", "build_compare_html"]

# the report's sections in page order: (element id, navigation label)
_NAV = (("summary", "Summary"), ("ranking", "Ranking"), ("histograms", "Histograms"), ("windows", "Depth"),
        ("success", "Success"), ("oracle", "Oracle mask"), ("correlations", "Proxies"), ("winners", "Winners"),
        ("question-table", "Per question"), ("questions", "Tokens"))
#: the element ids of the report's sections
SECTIONS = tuple(sid for sid, _ in _NAV)


def _subtitle(report: Any) -> str:
    """The header line: student, data, scoring space, cost counters, generation time (escaped)."""
    m = report.meta
    bits = [f"{k}: {esc(m[k])}" for k in ("student", "data") if m.get(k)]
    s = m.get("settings", {}) or {}
    bits.append(f"space: {esc(s.get('space', 'logits'))}")
    bits += [f"{k}: {int(m[k])}" for k in ("rollouts", "nodes", "continuations") if isinstance(m.get(k), (int, float))]
    if isinstance(m.get("seconds"), (int, float)):
        bits.append(f"{m['seconds']:.0f} s")
    bits.append(f"generated {esc(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}")
    return " · ".join(bits)


def _settings_details(report: Any) -> str:
    """A collapsed block with the configurations and the settings of the run."""
    s = report.meta.get("settings", {}) or {}
    cfgs = report.meta.get("configs", []) or []
    srows = [[esc(k), esc(v)] for k, v in s.items()]
    crow = [[esc(c.get("name")), esc(c.get("teacher")), esc(c.get("template") or c.get("model") or ""),
             esc(c.get("divergence")), esc(c.get("beta")), esc(c.get("temperature"))] for c in cfgs]
    return ("<details><summary>settings and configurations</summary>"
            + table(crow, ["configuration", "teacher", "template / model", "divergence", "beta", "temperature"],
                    raw=True)
            + table(srows, ["setting", "value"], raw=True) + "</details>")


def _warnings(report: Any) -> list[str]:
    """Boxes above the report: an interrupted run, no records."""
    out = []
    if report.meta.get("interrupted"):
        out.append(f'<div class="warn">This run was interrupted: {esc(report.meta.get("completed_prompts", "?"))} '
                   f"of {esc(report.meta.get('total_prompts', '?'))} prompts were scored; the report covers "
                   "those.</div>")
    if report.records.empty:
        out.append('<div class="warn">No node was scored (no records).</div>')
    return out


def build_html(
    report: Any,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    tokenizer: Any = None,
    max_questions: int = 30,
    color_config: str | None = None,
) -> str:
    """Render ``report`` as one self-contained HTML page; write it to ``path`` when given.

    Args:
        report: an :class:`~opd_callback.report.AlignmentReport`.
        path: output file (parent directories are created).
        title: page title (default: "OPD gradient alignment report").
        tokenizer: decodes token ids for the per-question view when the rollouts have no ``completion_tokens``
            column (``opd-diagnose run`` writes one); default: the tokenizer path recorded in ``report.meta``, if
            it exists locally. Without any, completions are shown as text with their scored tokens as chips.
        max_questions: questions shown token by token (the tables cover all).
        color_config: configuration whose alignment colours the tokens at first (default: the top-ranked one).
    """
    title = title or "OPD gradient alignment report"
    if tokenizer is None and "completion_tokens" not in report.rollouts.columns:
        tokenizer = load_tokenizer_from_meta(report)
    body = _warnings(report) + [_settings_details(report)] + [
        sections.summary_section(report),
        sections.ranking_section(report),
        sections.histograms_section(report),
        sections.windows_section(report),
        sections.success_section(report),
        sections.oracle_section(report),
        sections.correlations_section(report),
        sections.winners_section(report),
        sections.question_table_section(report),
        questions_section(report, tokenizer, max_questions, color_config),
    ]
    return write_page(page(title, _subtitle(report), _NAV, "".join(body)), path)


def _compare_section(a: Any, b: Any, names: tuple[str, str]) -> str:
    """``B - A`` per configuration with its question-bootstrap interval (:func:`stats.compare_reports`)."""
    na, nb = names
    cmp_ = stats.compare_reports(a, b, names)
    rows = [[esc(r["config"]), signed_cell(r[f"mean_{na}"]), esc(ci(r[f"ci_low_{na}"], r[f"ci_high_{na}"])),
             signed_cell(r[f"mean_{nb}"]), esc(ci(r[f"ci_low_{nb}"], r[f"ci_high_{nb}"])), signed_cell(r["diff"]),
             esc(ci(r["diff_ci_low"], r["diff_ci_high"])), esc("yes" if r["significant"] else "no"),
             esc(int(r[f"n_{na}"])), esc(int(r[f"n_{nb}"]))]
            for _, r in cmp_.iterrows()]
    tab = table(rows, ["configuration", f"mean {na}", "CI", f"mean {nb}", "CI", f"{nb} − {na}", "diff CI",
                       "significant", f"nodes {na}", f"nodes {nb}"], raw=True)
    forest = svg_forest([(str(r["config"]), r["diff"], r["diff_ci_low"], r["diff_ci_high"])
                         for _, r in cmp_.iterrows()], title=f"{nb} − {na}: mean alignment")
    return section("compare", f"{nb} − {na}",
                   "Difference of mean alignment per configuration between the two runs, with a bootstrap interval "
                   "that resamples questions jointly (paired by question when both runs used the same prompts).",
                   tab + f'<div class="plots">{forest}</div>')


def build_compare_html(
    a: Any, b: Any, path: str | Path | None = None, *, names: tuple[str, str] = ("A", "B"), title: str | None = None
) -> str:
    """Two runs side by side (e.g. two checkpoints of one training run): both summaries, ``B - A`` per configuration
    with a question-bootstrap interval, and both runs' alignment by depth window. Written to ``path`` when given."""
    na, nb = names
    title = title or f"OPD alignment: {na} vs {nb}"
    runs = ((na, a), (nb, b))
    rates = table([[esc(tag), esc(pct(rep.success_rate)), esc(len(rep.rollouts)), esc(rep.n_nodes)]
                   for tag, rep in runs], ["run", "success rate", "rollouts", "nodes"], raw=True)
    plots = [sections.window_plot(bw, rep.configs, "all", f"{tag}: alignment by depth")
             for tag, rep in runs for bw in [rep.by_window()] if not bw.empty]
    summaries = [f"<h4>{esc(tag)}</h4>"
                 + sections.summary_section(rep).replace('id="summary"', f'id="summary-{esc(tag)}"')
                 for tag, rep in runs]
    body = (
        _compare_section(a, b, names)
        + section("success", "Success rates", "Base-rollout success rate of each run.", rates)
        + section("windows", "Alignment by depth window", "Both runs, all rollouts.",
                  f'<div class="plots">{"".join(plots)}</div>')
        + "".join(summaries)
    )
    sub = f"{esc(na)}: {esc(a.meta.get('student', ''))} · {esc(nb)}: {esc(b.meta.get('student', ''))}"
    return write_page(page(title, sub, [("compare", "Difference"), ("success", "Success"), ("windows", "Depth")], body,
                           script=False), path)
