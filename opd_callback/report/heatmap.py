"""A self-contained HTML token heatmap of a few rollouts: tokens coloured by alignment, details on hover.

Every piece of model or dataset text (prompts, tokens, configuration names) goes through :func:`html.escape` before it
is placed in the page, so a completion containing ``<script>`` is shown, never run. No JavaScript is emitted.
"""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Sequence

__all__ = ["token_heatmap_html", "alignment_color"]


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, p: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "nan"
    return f"{v:.{p}f}"


def alignment_color(a: float | None) -> str:
    """CSS background for an alignment in [-1, 1]: red (negative) to green (positive); grey when undefined."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return "rgba(160,160,160,0.35)"
    a = max(-1.0, min(1.0, float(a)))
    alpha = 0.15 + 0.75 * abs(a)
    return f"rgba(220,40,40,{alpha:.2f})" if a < 0 else f"rgba(30,160,60,{alpha:.2f})"


def _token_text(t: str) -> str:
    # make whitespace visible without breaking the layout
    return _esc(t).replace("\n", "\u21b5\n").replace("\t", "\u21e5")


def token_heatmap_html(
    records: Any,
    rollouts: Any,
    decode: Callable[[Sequence[int]], str],
    *,
    color_config: str | None = None,
    configs: Sequence[str] | None = None,
    max_rollouts: int = 4,
    title: str | None = None,
) -> str:
    """Render up to ``max_rollouts`` rollouts as coloured tokens.

    Args:
        records: the report's per-(node, configuration) records (``pandas.DataFrame``).
        rollouts: the report's rollouts (``pandas.DataFrame``) with ``completion_ids``.
        decode: ``ids -> text`` for one token at a time (the tokenizer's ``decode``).
        color_config: the configuration whose alignment colours the tokens (default: the first of ``configs``).
        configs: configurations to list in the hover text (default: every configuration in ``records``).
        max_rollouts: how many rollouts to show: those with the most non-degenerate scored nodes first, incorrect and
            correct ones alternating when both exist.
        title: a heading (escaped).
    """
    import pandas as pd

    rec = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    rol = rollouts if isinstance(rollouts, pd.DataFrame) else pd.DataFrame(list(rollouts))
    if configs is None:
        configs = list(dict.fromkeys(rec["config"].tolist())) if len(rec) else []
    configs = list(configs)
    if color_config is None:
        color_config = configs[0] if configs else None
    parts = [
        '<div class="opd-heatmap" style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;'
        'line-height:1.7">'
    ]
    if title:
        parts.append(f"<h4 style=\"margin:4px 0\">{_esc(title)}</h4>")
    parts.append(
        '<div style="margin-bottom:6px">Token colour: alignment of configuration '
        f"<b>{_esc(color_config)}</b> "
        f'<span style="background:{alignment_color(-1.0)};padding:0 4px">-1</span> '
        f'<span style="background:{alignment_color(0.0)};padding:0 4px">0</span> '
        f'<span style="background:{alignment_color(1.0)};padding:0 4px">+1</span> '
        f'<span style="background:{alignment_color(None)};padding:0 4px">degenerate</span>; '
        "uncoloured tokens were not scored. Hover a token for details.</div>"
    )
    if rol.empty:
        parts.append("<div>(no rollouts)</div></div>")
        return "".join(parts)
    # most informative first: rollouts with the most non-degenerate scored nodes of the colouring configuration
    informative: dict[tuple[int, int], int] = {}
    if len(rec):
        own = rec[(rec["config"] == color_config) & ~rec["degenerate"].astype(bool)]
        for (pi, ri), n in own.groupby(["prompt_index", "rollout_index"]).size().items():
            informative[(int(pi), int(ri))] = int(n)
    rol = rol.assign(
        _n=[-informative.get((int(p), int(r)), 0) for p, r in zip(rol["prompt_index"], rol["rollout_index"])]
    ).sort_values(["_n", "prompt_index", "rollout_index"], kind="stable")
    wrong = [r for _, r in rol.iterrows() if not bool(r["correct"])]
    right = [r for _, r in rol.iterrows() if bool(r["correct"])]
    chosen: list[Any] = []
    while len(chosen) < max_rollouts and (wrong or right):
        for pool in (wrong, right):
            if pool and len(chosen) < max_rollouts:
                chosen.append(pool.pop(0))
    by_node: dict[tuple[int, int, int], dict[str, Any]] = {}
    for r in rec.to_dict("records") if len(rec) else []:
        key = (int(r["prompt_index"]), int(r["rollout_index"]), int(r["position"]))
        by_node.setdefault(key, {"common": r, "configs": {}})["configs"][r["config"]] = r
    for r in chosen:
        pi, ri = int(r["prompt_index"]), int(r["rollout_index"])
        parts.append('<div class="opd-rollout" style="margin:8px 0;padding:6px;border:1px solid #ddd">')
        parts.append(
            f"<div style=\"color:#555\">prompt {pi} · rollout {ri} · reward {_esc(_fmt(r['reward']))} · "
            f"{'correct' if bool(r['correct']) else 'incorrect'}</div>"
        )
        parts.append(
            '<div style="white-space:pre-wrap;color:#333;border-left:3px solid #bbb;padding-left:6px">'
            f"{_esc(r['prompt'])}</div>"
        )
        parts.append('<div style="white-space:pre-wrap">')
        for t, tid in enumerate(list(r["completion_ids"])):
            text = decode([int(tid)])
            node = by_node.get((pi, ri, t))
            if node is None:
                parts.append(f'<span title="{_esc(f"position {t} (not scored)")}">{_token_text(text)}</span>')
                continue
            c = node["common"]
            lines = [
                f"position {t}, token {text!r} (id {int(tid)})",
                f"node value V = {_fmt(c.get('value'))}, covered mass = {_fmt(c.get('covered_mass'))}, "
                f"student entropy = {_fmt(c.get('student_entropy'))}",
            ]
            ids = list(c.get("candidate_ids", []))
            probs = list(c.get("candidate_probs", []))
            succ = list(c.get("candidate_success", []))
            if ids:
                cand = ", ".join(
                    f"{decode([int(j)])!r}: P={_fmt(p, 2)} S={_fmt(s, 2)}" for j, p, s in zip(ids, probs, succ)
                )
                lines.append(f"candidates: {cand}")
            for name in configs:
                cr = node["configs"].get(name)
                if cr is None:
                    continue
                al = "degenerate" if bool(cr.get("degenerate")) else _fmt(cr.get("alignment"))
                lines.append(
                    f"{name}: alignment {al}, teacher advantage {_fmt(cr.get('teacher_advantage'))}, "
                    f"KL(P||Q) {_fmt(cr.get('kl_reverse'))}"
                )
            own = node["configs"].get(color_config)
            a = None
            if own is not None and not bool(own.get("degenerate")):
                a = float(own.get("alignment"))
            parts.append(
                f'<span style="background:{alignment_color(a)};border-bottom:2px solid #444" '
                f'title="{_esc(chr(10).join(lines))}">{_token_text(text)}</span>'
            )
        parts.append("</div></div>")
    parts.append("</div>")
    return "".join(parts)
