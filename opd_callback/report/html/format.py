"""How values appear in the HTML pages: escaping, numbers, colours and tables.

:func:`esc` is the one escape for every piece of model, dataset or user text (prompts, completions, tokens,
configuration names, paths): it goes through :func:`html.escape` before it is placed in a page, so a completion
containing ``<script>`` is shown as text and never runs. Every number formatter writes "–" where the value is
missing, NaN, infinite or not a number.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

from opd_callback.report.numeric import as_float

__all__ = ["MISSING", "GREEN", "RED", "PALETTE", "esc", "token_text", "fmt", "pct", "p_value", "ci", "signed_cell",
           "series_color", "alignment_color", "ALIGNMENT_COLOR_JS", "table"]

#: what a number formatter writes for a missing or non-finite value
MISSING = "–"
GREEN, RED = "#1a9850", "#d73027"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]

# --------------------------------------------------------------------------------------------------------------------
# text


def esc(x: Any) -> str:
    """``str(x)`` escaped for HTML text and attribute values (quotes included)."""
    return html.escape(str(x), quote=True)


def token_text(t: str) -> str:
    """A token escaped, with newlines and tabs made visible (↵, ⇥) without breaking the layout."""
    return esc(t).replace("\n", "\u21b5\n").replace("\t", "\u21e5")


# --------------------------------------------------------------------------------------------------------------------
# numbers


def fmt(x: Any, p: int = 3, signed: bool = False) -> str:
    """``x`` with ``p`` decimals (and a sign when ``signed``); :data:`MISSING` when it is not a finite number."""
    v = as_float(x)
    if not math.isfinite(v):
        return MISSING
    return f"{v:+.{p}f}" if signed else f"{v:.{p}f}"


def pct(x: Any, p: int = 1) -> str:
    """A fraction as a percentage with ``p`` decimals."""
    v = as_float(x)
    return MISSING if not math.isfinite(v) else f"{100 * v:.{p}f}%"


def p_value(x: Any, samples: int) -> str:
    """A bootstrap p-value; 0 means "below the resolution of the bootstrap" (``<1/samples``)."""
    v = as_float(x)
    if not math.isfinite(v):
        return MISSING
    return f"<{1 / max(samples, 1):.0g}" if v == 0 else f"{v:.3f}"


def ci(lo: Any, hi: Any, p: int = 3) -> str:
    """An interval ``[lo, hi]`` with signs; :data:`MISSING` unless both ends are finite."""
    lo, hi = as_float(lo), as_float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return MISSING
    return f"[{lo:+.{p}f}, {hi:+.{p}f}]"


def signed_cell(v: Any, p: int = 3) -> str:
    """A signed number in a span classed ``pos`` / ``neg`` (green / red in the page's CSS)."""
    x = as_float(v)
    cls = "pos" if x > 0 else ("neg" if x < 0 else "")
    return f'<span class="{cls}">{fmt(v, p, signed=True)}</span>'


# --------------------------------------------------------------------------------------------------------------------
# colours

_NEGATIVE_RGB, _POSITIVE_RGB = "220,40,40", "30,160,60"
_UNDEFINED = "rgba(160,160,160,0.35)"


def series_color(i: int) -> str:
    """The colour of the ``i``-th configuration or series in the plots."""
    return PALETTE[i % len(PALETTE)]


def alignment_color(a: float | None) -> str:
    """CSS background for an alignment in [-1, 1]: red (negative) to green (positive); grey when undefined."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return _UNDEFINED
    a = max(-1.0, min(1.0, float(a)))
    alpha = 0.15 + 0.75 * abs(a)
    return f"rgba({_NEGATIVE_RGB},{alpha:.2f})" if a < 0 else f"rgba({_POSITIVE_RGB},{alpha:.2f})"


#: :func:`alignment_color` in JavaScript (``col(v)``), for the page script that re-colours tokens
ALIGNMENT_COLOR_JS = f"""
  function col(v){{
    var a=parseFloat(v); if(!isFinite(a)) return '{_UNDEFINED}';
    a=Math.max(-1,Math.min(1,a)); var al=(0.15+0.75*Math.abs(a)).toFixed(2);
    return a<0?'rgba({_NEGATIVE_RGB},'+al+')':'rgba({_POSITIVE_RGB},'+al+')';
  }}"""


# --------------------------------------------------------------------------------------------------------------------
# tables


def table(rows: Sequence[Sequence[str]], header: Sequence[str], *, cls: str = "", raw: bool = False) -> str:
    """An HTML table. Header cells are escaped; body cells too unless ``raw`` (then the caller escaped them)."""
    cell = (lambda s: s) if raw else esc
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
