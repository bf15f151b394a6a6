"""The token-by-token section of the HTML report (``questions``): each question's prompt and per-configuration table,
and every base rollout with its scored tokens coloured by alignment, a tooltip per scored token (candidates and every
configuration's scores), and a selector that re-colours the tokens by another configuration.

Tokens, prompts, completions and configuration names are model or user text: all of it is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd

from opd_callback.report.html.format import (
    GREEN,
    MISSING,
    RED,
    alignment_color,
    esc,
    fmt,
    pct,
    signed_cell,
    table,
    token_text,
)
from opd_callback.report.html.page import section
from opd_callback.report.html.tokens import NodeKey, decoder, index_nodes
from opd_callback.report.numeric import as_float

__all__ = ["questions_section"]


def _listed(c: dict, key: str) -> list:
    """A list-valued record field as a list (empty when missing)."""
    v = c.get(key)
    return list(v) if v is not None else []


def _candidate_rows(c: dict, dec: Callable[[int], str] | None) -> list[list[str]]:
    """The tooltip's candidate rows: token (the sampled one marked ←), student probability P, success S, rollouts."""
    probs, succ, nrol = _listed(c, "candidate_probs"), _listed(c, "candidate_success"), _listed(c, "candidate_rollouts")
    cand_toks = c.get("candidate_tokens")
    cand_toks = list(cand_toks) if cand_toks is not None else None
    rows = []
    for k, j in enumerate(_listed(c, "candidate_ids")):
        if cand_toks is not None and k < len(cand_toks):
            t = cand_toks[k]
        elif dec is not None:
            t = dec(int(j))
        else:
            t = f"#{int(j)}"
        mark = " ←" if int(j) == int(c.get("token_id", -1)) else ""
        rows.append([esc(repr(t) + mark), esc(fmt(probs[k] if k < len(probs) else None)),
                     esc(fmt(succ[k] if k < len(succ) else None, 2)),
                     esc(int(nrol[k]) if k < len(nrol) else MISSING)])
    return rows


@dataclass
class _TokenView:
    """What the token spans of the section share: the configurations, the one that colours at first, the decoder and
    the scored nodes."""

    names: list[str]
    color_index: int
    dec: Callable[[int], str] | None
    by_node: dict[NodeKey, dict[str, Any]]

    def tooltip(self, node: dict, token: str) -> str:
        """The hover box of a scored token: the node, its candidates, every configuration's scores."""
        c = node["common"]
        head = (f"<b>position {esc(int(c['position']))}</b> · token <code>{esc(repr(token))}</code> · node value V = "
                f"{esc(fmt(c.get('value')))} · covered mass {esc(pct(c.get('covered_mass')))} · entropy "
                f"{esc(fmt(c.get('student_entropy'), 2))}")
        crow = _candidate_rows(c, self.dec)
        ctab = table(crow, ["candidate", "P", "success S", "n"], raw=True) if crow else ""
        arow = []
        for n in self.names:
            r = node["configs"].get(n)
            if r is not None:
                al = "degenerate" if bool(r.get("degenerate")) else fmt(r.get("alignment"), 3, True)
                arow.append([esc(n), esc(al), esc(fmt(r.get("teacher_advantage"), 4, True)),
                             esc(fmt(r.get("kl_reverse"), 3))])
        atab = table(arow, ["configuration", "alignment", "A_T", "KL(P||Q)"], raw=True)
        return f'<span class="tip">{head}{ctab}{atab}</span>'

    def span(self, node: dict | None, text: str, t: int) -> str:
        """Token ``text`` at position ``t``: plain when not scored, else coloured, with every configuration's
        alignment in ``data-a`` (for the colour switcher) and a tooltip."""
        shown = token_text(text) or "\u2205"
        if node is None:
            return f'<span class="tok">{shown}</span>'
        vals = []
        for n in self.names:
            r = node["configs"].get(n)
            a = float("nan") if r is None or bool(r.get("degenerate")) else as_float(r.get("alignment"))
            vals.append("nan" if not math.isfinite(a) else f"{a:.4f}")
        a0 = as_float(vals[self.color_index]) if self.color_index < len(vals) else float("nan")
        bg = alignment_color(a0 if math.isfinite(a0) else None)
        return (f'<span class="tok node" tabindex="0" data-pos="{t}" data-a="{",".join(vals)}" '
                f'style="background:{bg}">{shown}{self.tooltip(node, text)}</span>')

    def tokens(self, q: Any, r: pd.Series) -> str:
        """A rollout's completion token by token; without token strings (no ``completion_tokens``, no tokenizer), the
        completion as text and then its scored tokens as chips."""
        ri = int(r["rollout_index"])
        ids = list(r["completion_ids"]) if r.get("completion_ids") is not None else []
        toks = r.get("completion_tokens") if "completion_tokens" in r.index else None
        toks = list(toks) if toks is not None else None
        if toks is None and self.dec is not None:
            toks = [self.dec(int(i)) for i in ids]
        if toks is not None:
            spans = "".join(self.span(self.by_node.get((q, ri, t)), text, t) for t, text in enumerate(toks))
            return f'<div class="toks">{spans}</div>'
        chips = [self.span(node, str(node["common"].get("token", "")), t)
                 for (qq, rr, t), node in sorted(self.by_node.items(), key=lambda kv: kv[0][2])
                 if qq == q and rr == ri]
        return (f'<div class="toks">{esc(r.get("completion", ""))}</div>'
                f'<div class="toks chips">scored tokens: {"".join(chips)}</div>')

    def rollout(self, q: Any, r: pd.Series) -> str:
        """One base rollout: reward, correctness, tokens."""
        ok = bool(r["correct"])
        return (f'<div class="rollout"><div class="hdr">rollout {int(r["rollout_index"])} · reward '
                f'{esc(fmt(r["reward"], 2))} · <b style="color:{GREEN if ok else RED}">'
                f'{"correct" if ok else "incorrect"}</b></div>{self.tokens(q, r)}</div>')


def _legend(names: Sequence[str], color_config: str | None) -> str:
    """The configuration selector and the colour key."""
    opts = "".join(f'<option value="{i}"{" selected" if n == color_config else ""}>{esc(n)}</option>'
                   for i, n in enumerate(names))
    keys = ((-1.0, "−1"), (-0.3, "−0.3"), (0.3, "+0.3"), (1.0, "+1"), (None, "degenerate"))
    scale = "".join(f'<span style="background:{alignment_color(a)}">{label}</span>' for a, label in keys)
    return (f'<div class="legend">colour tokens by <select id="colorcfg">{opts}</select> {scale} '
            "· underlined tokens were scored; hover (or focus) one for its candidates and every configuration's "
            "alignment</div>")


def _question_table(pq: pd.DataFrame, q: Any, names: Sequence[str]) -> str:
    """Per configuration on question ``q``: mean alignment, positive and degenerate shares, rank."""
    qp = pq[pq["prompt_index"] == q]
    qp = qp.assign(_o=qp["config"].map({n: i for i, n in enumerate(names)})).sort_values("_o")
    rows = []
    for _, r in qp.iterrows():
        rank = as_float(r["rank"])
        rows.append([esc(r["config"]), signed_cell(r["alignment_mean"]), esc(pct(r["positive_fraction"])),
                     esc(pct(r["degenerate_fraction"])), esc(int(rank) if math.isfinite(rank) else MISSING)])
    return table(rows, ["configuration", "mean alignment", "positive", "degenerate", "rank"], raw=True)


def _question(view: _TokenView, q: Any, rol: pd.DataFrame, pq: pd.DataFrame) -> str:
    """One question: success rate, prompt, per-configuration table, its base rollouts."""
    qrol = rol[rol["prompt_index"] == q].sort_values("rollout_index")
    prompt = qrol["prompt"].iloc[0] if "prompt" in qrol.columns and len(qrol) else ""
    sr = float(qrol["correct"].astype(float).mean()) if len(qrol) else float("nan")
    return (f'<div class="q" id="q{esc(q)}"><h3>Question {esc(q)} · success rate {esc(pct(sr))}</h3>'
            f'<div class="prompt">{esc(prompt)}</div>{_question_table(pq, q, view.names)}'
            + "".join(view.rollout(q, r) for _, r in qrol.iterrows()) + "</div>")


def _initial_color_config(report: Any, color_config: str | None) -> str | None:
    """``color_config`` when it is a configuration of the report, else the top-ranked one (else the first)."""
    names = report.configs
    if color_config is not None and color_config in names:
        return color_config
    rk = report.ranking() if len(report.records) else pd.DataFrame()
    return str(rk["config"].iloc[0]) if len(rk) else (names[0] if names else None)


def questions_section(report: Any, tokenizer: Any, max_questions: int, color_config: str | None) -> str:
    """The token-by-token view of the first ``max_questions`` questions, coloured by ``color_config`` at first
    (default: the top-ranked configuration); ``tokenizer`` decodes token ids when the rollouts have no token
    strings."""
    rol = report.rollouts
    if rol.empty:
        return section("questions", "Questions", "No rollouts.", "")
    names = report.configs
    color_config = _initial_color_config(report, color_config)
    view = _TokenView(names, names.index(color_config) if color_config in names else 0, decoder(tokenizer),
                      index_nodes(report.records))
    pq = report.per_question()
    qs = sorted(rol["prompt_index"].unique().tolist())
    shown = qs[:max_questions]
    more = (f'<p class="help">showing {len(shown)} of {len(qs)} questions (opd-diagnose report --max-questions N)</p>'
            if len(qs) > len(shown) else "")
    return section(
        "questions", "Questions and rollouts, token by token",
        "Each question's prompt, its per-configuration table, and every base rollout with the scored tokens "
        "coloured by the chosen configuration's alignment (green helps, red hurts, grey: degenerate).",
        _legend(names, color_config) + "".join(_question(view, q, rol, pq) for q in shown) + more,
    )
