"""A self-contained HTML token heatmap of a few rollouts (the wandb panel): tokens coloured by alignment, details on
hover.

Every piece of model or dataset text (prompts, tokens, configuration names) is escaped before it is placed in the
page, so a completion containing ``<script>`` is shown, never run. No JavaScript is emitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd

from opd_callback.report.html.format import alignment_color, esc, fmt, token_text
from opd_callback.report.html.tokens import NodeKey, index_nodes
from opd_callback.report.numeric import as_float

__all__ = ["token_heatmap_html", "alignment_color"]

_LEGEND_SPAN = '<span style="background:{};padding:0 4px">{}</span>'


def _legend(color_config: str | None) -> str:
    """The colour key: which configuration colours the tokens, and the scale."""
    scale = " ".join(_LEGEND_SPAN.format(alignment_color(a), label)
                     for a, label in ((-1.0, "-1"), (0.0, "0"), (1.0, "+1"), (None, "degenerate")))
    return ('<div style="margin-bottom:6px">Token colour: alignment of configuration '
            f"<b>{esc(color_config)}</b> {scale}; uncoloured tokens were not scored. Hover a token for details.</div>")


def _pick_rollouts(rec: pd.DataFrame, rol: pd.DataFrame, color_config: str | None, max_rollouts: int) -> list[Any]:
    """Up to ``max_rollouts`` rollouts, those with the most non-degenerate scored nodes of ``color_config`` first,
    incorrect and correct ones alternating when both exist."""
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
    return chosen


@dataclass
class _Heatmap:
    """What every rollout of the heatmap shares: the decoder, the configurations listed on hover, the one that
    colours, and the scored nodes."""

    decode: Callable[[Sequence[int]], str]
    configs: list[str]
    color_config: str | None
    by_node: dict[NodeKey, dict[str, Any]]

    def node_title(self, node: dict, t: int, tid: int, text: str) -> str:
        """The hover text of a scored token: the node, its candidates, and every configuration's scores."""
        c = node["common"]
        lines = [
            f"position {t}, token {text!r} (id {tid})",
            f"node value V = {fmt(c.get('value'))}, covered mass = {fmt(c.get('covered_mass'))}, "
            f"student entropy = {fmt(c.get('student_entropy'))}",
        ]
        ids = list(c.get("candidate_ids", []))
        if ids:
            cand = ", ".join(f"{self.decode([int(j)])!r}: P={fmt(p, 2)} S={fmt(s, 2)}"
                             for j, p, s in zip(ids, c.get("candidate_probs", []), c.get("candidate_success", [])))
            lines.append(f"candidates: {cand}")
        for name in self.configs:
            cr = node["configs"].get(name)
            if cr is not None:
                al = "degenerate" if bool(cr.get("degenerate")) else fmt(cr.get("alignment"))
                lines.append(f"{name}: alignment {al}, teacher advantage {fmt(cr.get('teacher_advantage'))}, "
                             f"KL(P||Q) {fmt(cr.get('kl_reverse'))}")
        return "\n".join(lines)

    def token(self, key: NodeKey, tid: int) -> str:
        """One token of a completion: plain when not scored, else coloured by ``color_config`` with a hover text."""
        t = key[2]
        text = self.decode([tid])
        node = self.by_node.get(key)
        if node is None:
            return f'<span title="{esc(f"position {t} (not scored)")}">{token_text(text)}</span>'
        own = node["configs"].get(self.color_config)
        a = as_float(own.get("alignment")) if own is not None and not bool(own.get("degenerate")) else None
        return (f'<span style="background:{alignment_color(a)};border-bottom:2px solid #444" '
                f'title="{esc(self.node_title(node, t, tid, text))}">{token_text(text)}</span>')

    def rollout(self, r: Any) -> str:
        """One rollout: its header, its prompt and its coloured completion."""
        pi, ri = int(r["prompt_index"]), int(r["rollout_index"])
        tokens = "".join(self.token((pi, ri, t), int(tid)) for t, tid in enumerate(list(r["completion_ids"])))
        return ('<div class="opd-rollout" style="margin:8px 0;padding:6px;border:1px solid #ddd">'
                f"<div style=\"color:#555\">prompt {pi} · rollout {ri} · reward {esc(fmt(r['reward']))} · "
                f"{'correct' if bool(r['correct']) else 'incorrect'}</div>"
                '<div style="white-space:pre-wrap;color:#333;border-left:3px solid #bbb;padding-left:6px">'
                f"{esc(r['prompt'])}</div>"
                f'<div style="white-space:pre-wrap">{tokens}</div></div>')


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
    rec = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    rol = rollouts if isinstance(rollouts, pd.DataFrame) else pd.DataFrame(list(rollouts))
    if configs is None:
        configs = list(dict.fromkeys(rec["config"].tolist())) if len(rec) else []
    configs = list(configs)
    if color_config is None:
        color_config = configs[0] if configs else None
    parts = ['<div class="opd-heatmap" style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;'
             'line-height:1.7">']
    if title:
        parts.append(f"<h4 style=\"margin:4px 0\">{esc(title)}</h4>")
    parts.append(_legend(color_config))
    if rol.empty:
        return "".join(parts) + "<div>(no rollouts)</div></div>"
    heatmap = _Heatmap(decode, configs, color_config, index_nodes(rec))
    parts += [heatmap.rollout(r) for r in _pick_rollouts(rec, rol, color_config, max_rollouts)]
    return "".join(parts) + "</div>"
