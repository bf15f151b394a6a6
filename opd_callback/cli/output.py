"""What the commands show: the HTML pages they write and the ranking and comparison tables they print."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from opd_callback.cli.errors import PROG

__all__ = ["write_html", "write_compare_html", "print_ranking", "print_comparison"]


def write_html(report: Any, path: str | Path, **kwargs: Any) -> None:
    """A run's offline HTML report (keyword arguments as :func:`build_html` takes them)."""
    from opd_callback.report.html import build_html

    build_html(report, path, **kwargs)


def write_compare_html(a: Any, b: Any, path: str | Path, names: tuple[str, str]) -> None:
    """Two runs' comparison page."""
    from opd_callback.report.html import build_compare_html

    build_compare_html(a, b, path, names=names)


def print_ranking(report: Any, settings: Any, nodes: int) -> None:
    """The paired ranking, or one line saying why there is none (no node scored, every node degenerate)."""
    from opd_callback.core.inputs import no_nodes_message

    if nodes == 0 or report.records.empty:
        print(f"\n{PROG}: {no_nodes_message(settings, report.rollouts.to_dict('records'))}", file=sys.stderr)
        return
    usable = int((~report.records["degenerate"].astype(bool)).sum())
    if usable == 0:
        print(f"\n{PROG}: no usable nodes: all {report.n_nodes} scored nodes are degenerate (|g| or |d| below "
              f"degenerate_eps={settings.degenerate_eps:g}: every continuation of a node got the same reward, or the "
              "teacher agrees with the student there), so no alignment is defined; use more rollouts_per_branch, "
              "more prompts, or a reward with partial credit", file=sys.stderr)
        return
    if len(report.configs) < 2:
        return
    rk = report.ranking()
    ref = rk["reference"].iloc[0] if "reference" in rk.columns else None
    print(f"\nranking by {rk['metric'].iloc[0]} (the decision metric; paired difference vs {ref}, "
          f"{int(100 * settings.ci_level)}% CI over questions):")
    for _, r in rk.iterrows():
        print(f"  {int(r['rank'])}. {r['config']:<22} {_ranking_difference(r, ref)}")


def _ranking_difference(r: Any, ref: Any) -> str:
    """A ranking row's paired difference to the reference with its interval (``*``: significant)."""
    if r["config"] == ref:
        return "reference"
    if not math.isfinite(float(r.get("diff", float("nan")))):
        return "n/a (undefined: no node where both it and the reference have something at stake)"
    return f"{r['diff']:+.3f}{_interval(r)}" + (" *" if r["significant"] else "")


def _interval(r: Any) -> str:
    """`` [low, high]`` of a row's difference, or '' where it is undefined."""
    if not math.isfinite(float(r["diff_ci_low"])):
        return ""
    return f" [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]"


def print_comparison(cmp_: Any, a: Any, b: Any, names: tuple[str, str]) -> None:
    """The comparison table: each configuration's mean in A and B, the difference B - A and its interval."""
    na, nb = names
    w = max([len(str(c)) for c in cmp_["config"]] + [13])
    print(f"{'configuration':<{w}} {na[:12]:>12} {nb[:12]:>12} {'B - A':>8} {'CI':>19}")
    for _, r in cmp_.iterrows():
        ci = _interval(r).strip() or "[nan, nan]"
        print(f"{r['config']:<{w}} {r[f'mean_{na}']:>12.3f} {r[f'mean_{nb}']:>12.3f} {r['diff']:>+8.3f} {ci:>19}"
              + (" *" if r["significant"] else ""))
    print(f"success rate: {na} {a.success_rate:.1%}, {nb} {b.success_rate:.1%}")
