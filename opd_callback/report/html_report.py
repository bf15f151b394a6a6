"""The offline HTML report: one self-contained file (inline CSS, inline SVG plots, a few lines of inline JavaScript).

:func:`build_html` renders an :class:`~opd_callback.report.AlignmentReport`; :func:`build_compare_html` renders two
side by side. Nothing is loaded from the network (no CDN, no external URL). **Every** piece of model, dataset or user
text (prompts, completions, tokens, configuration names, paths) goes through :func:`html.escape` before it is placed in
the page, so a completion containing ``<script>`` is displayed as text and never runs. The page's own script only
re-colours tokens when another configuration is picked; it reads numbers from ``data-`` attributes that this module
writes.

Sections (element ids): ``summary``, ``ranking``, ``histograms``, ``windows``, ``success``, ``oracle``,
``correlations``, ``winners``, ``question-table``, ``questions``. ``docs/report.md`` explains how to read each.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from opd_callback.report import stats
from opd_callback.report.heatmap import alignment_color  # one colour scale with the wandb token heatmap

__all__ = ["build_html", "build_compare_html", "alignment_color", "SECTIONS"]

SECTIONS = (
    "summary", "ranking", "histograms", "windows", "success", "oracle", "correlations", "winners", "question-table",
    "questions",
)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
GREEN, RED = "#1a9850", "#d73027"

# --------------------------------------------------------------------------------------------------------------------
# small formatting helpers


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(x: Any, p: int = 3, signed: bool = False) -> str:
    v = _num(x)
    if not math.isfinite(v):
        return "–"
    return f"{v:+.{p}f}" if signed else f"{v:.{p}f}"


def _pct(x: Any, p: int = 1) -> str:
    v = _num(x)
    return "–" if not math.isfinite(v) else f"{100 * v:.{p}f}%"


def _p(x: Any, samples: int) -> str:
    """A bootstrap p-value; 0 means "below the resolution of the bootstrap"."""
    v = _num(x)
    if not math.isfinite(v):
        return "–"
    return f"<{1 / max(samples, 1):.0g}" if v == 0 else f"{v:.3f}"


def _ci(lo: Any, hi: Any, p: int = 3) -> str:
    if not (math.isfinite(_num(lo)) and math.isfinite(_num(hi))):
        return "–"
    return f"[{_num(lo):+.{p}f}, {_num(hi):+.{p}f}]"


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], *, cls: str = "", raw: bool = False) -> str:
    """An HTML table. Cells are escaped unless ``raw`` (then the caller escaped them)."""
    f = (lambda s: s) if raw else _esc
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{f(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{_esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# --------------------------------------------------------------------------------------------------------------------
# inline SVG plots


class _Svg:
    def __init__(self, width: int, height: int, title: str = "") -> None:
        self.w, self.h = width, height
        self.parts: list[str] = []
        if title:
            self.text(width / 2, 14, title, anchor="middle", size=12, weight="bold")

    def add(self, s: str) -> None:
        self.parts.append(s)

    def text(self, x, y, s, *, anchor="start", size=10, color="#333", weight="normal", rotate=None) -> None:
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}" '
                 f'font-weight="{weight}"{tr}>{_esc(s)}</text>')

    def line(self, x1, y1, x2, y2, color="#999", width=1.0, dash: str | None = None) -> None:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
                 f'stroke-width="{width}"{d}/>')

    def rect(self, x, y, w, h, color, opacity=1.0, title: str | None = None) -> None:
        t = f"<title>{_esc(title)}</title>" if title else ""
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" fill="{color}" '
                 f'fill-opacity="{opacity}">{t}</rect>')

    def circle(self, x, y, r, color, title: str | None = None) -> None:
        t = f"<title>{_esc(title)}</title>" if title else ""
        self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}">{t}</circle>')

    def polyline(self, pts: Sequence[tuple[float, float]], color, width=1.5, dash: str | None = None) -> None:
        if len(pts) < 2:
            return
        d = f' stroke-dasharray="{dash}"' if dash else ""
        p = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        self.add(f'<polyline points="{p}" fill="none" stroke="{color}" stroke-width="{width}"{d}/>')

    def render(self) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}" role="img">' + "".join(self.parts) + "</svg>")


def svg_histogram(series: Sequence[tuple[str, np.ndarray, str]], *, title: str = "", bins: int = 20,
                  lo: float = -1.0, hi: float = 1.0, width: int = 300, height: int = 190) -> str:
    """Overlaid histograms (fraction of each series' values per bin) of values in ``[lo, hi]``."""
    svg = _Svg(width, height, title)
    left, right, top, bottom = 34, 8, 24, 36
    pw, ph = width - left - right, height - top - bottom
    edges = np.linspace(lo, hi, bins + 1)
    fracs = []
    for _, v, _ in series:
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        c = np.histogram(np.clip(v, lo, hi), edges)[0].astype(float)
        fracs.append(c / c.sum() if c.sum() else c)
    ymax = max([float(f.max()) for f in fracs if f.size] + [1e-9])
    ymax = math.ceil(ymax * 10) / 10 if ymax > 0.1 else max(ymax, 0.05)
    svg.line(left, top + ph, left + pw, top + ph, "#666")
    svg.line(left, top, left, top + ph, "#666")
    for t in np.linspace(lo, hi, 5):
        x = left + (t - lo) / (hi - lo) * pw
        svg.line(x, top + ph, x, top + ph + 3, "#666")
        svg.text(x, top + ph + 13, f"{t:g}", anchor="middle", size=9)
    svg.line(left + (0 - lo) / (hi - lo) * pw, top, left + (0 - lo) / (hi - lo) * pw, top + ph, "#bbb", dash="3,3")
    svg.text(left - 3, top + 8, f"{ymax:.2f}", anchor="end", size=9)
    svg.text(left - 3, top + ph, "0", anchor="end", size=9)
    bw = pw / bins
    for (label, v, color), f in zip(series, fracs):
        for i, fr in enumerate(f):
            if fr <= 0:
                continue
            h = fr / ymax * ph
            svg.rect(left + i * bw + 0.5, top + ph - h, bw - 1, h, color, 0.45,
                     f"{label}: {100 * fr:.1f}% in [{edges[i]:.2f}, {edges[i + 1]:.2f})")
    x = left
    for label, v, color in series:
        n = int(np.isfinite(np.asarray(v, dtype=np.float64)).sum())
        svg.rect(x, height - 12, 9, 9, color, 0.7)
        s = f"{label} (n={n})"
        svg.text(x + 12, height - 4, s, size=9)
        x += 16 + 5.6 * len(s)
    return svg.render()


def svg_forest(rows: Sequence[tuple[str, float, float, float]], *, title: str = "", zero: float = 0.0,
               width: int = 420, colors: Sequence[str] | None = None) -> str:
    """Horizontal point estimates with intervals: ``(label, value, lo, hi)`` per row."""
    height = 30 + 22 * max(len(rows), 1) + 24
    svg = _Svg(width, height, title)
    left, right, top = 150, 16, 26
    pw = width - left - right
    vals = [_num(x) for r in rows for x in r[1:]] + [zero]
    vals = [v for v in vals if math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (-1.0, 1.0)
    pad = max((hi - lo) * 0.08, 1e-3)
    lo, hi = lo - pad, hi + pad

    def X(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    bottom = top + 22 * max(len(rows), 1)
    svg.line(X(zero), top - 4, X(zero), bottom, "#999", dash="3,3")
    for i, (label, v, a, b) in enumerate(rows):
        y = top + 22 * i + 11
        c = colors[i] if colors else _color(i)
        svg.text(left - 6, y + 4, label if len(label) <= 24 else label[:23] + "…", anchor="end", size=10)
        if math.isfinite(_num(a)) and math.isfinite(_num(b)):
            svg.line(X(_num(a)), y, X(_num(b)), y, c, 2)
            svg.line(X(_num(a)), y - 4, X(_num(a)), y + 4, c, 1.5)
            svg.line(X(_num(b)), y - 4, X(_num(b)), y + 4, c, 1.5)
        if math.isfinite(_num(v)):
            svg.circle(X(_num(v)), y, 4, c, f"{label}: {_num(v):+.3f} {_ci(a, b)}")
    svg.line(left, bottom + 2, left + pw, bottom + 2, "#666")
    for t in np.linspace(lo, hi, 5):
        svg.line(X(t), bottom + 2, X(t), bottom + 5, "#666")
        svg.text(X(t), bottom + 16, f"{t:+.2f}", anchor="middle", size=9)
    return svg.render()


def svg_lines(xlabels: Sequence[str], series: Sequence[tuple[str, Sequence[float], Sequence[float],
              Sequence[float], str]], *, title: str = "", width: int = 520, height: int = 240,
              ylim: tuple[float, float] | None = None, ylabel: str = "") -> str:
    """Lines over categorical x with interval bars: ``(label, means, lows, highs, color)`` per series."""
    svg = _Svg(width, height, title)
    left, right, top, bottom = 46, 130, 24, 34
    pw, ph = width - left - right, height - top - bottom
    vals = [_num(v) for _, m, lo_, hi_, _ in series for v in list(m) + list(lo_) + list(hi_)]
    vals = [v for v in vals if math.isfinite(v)]
    if ylim is None:
        lo, hi = (min(vals + [0.0]), max(vals + [0.0])) if vals else (-1.0, 1.0)
        pad = max((hi - lo) * 0.08, 0.01)
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = ylim
    n = max(len(xlabels), 1)

    def X(i: float) -> float:
        return left + (i + 0.5) / n * pw

    def Y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * ph

    svg.line(left, top + ph, left + pw, top + ph, "#666")
    svg.line(left, top, left, top + ph, "#666")
    if lo < 0 < hi:
        svg.line(left, Y(0), left + pw, Y(0), "#bbb", dash="3,3")
    for t in np.linspace(lo, hi, 5):
        svg.text(left - 4, Y(t) + 3, f"{t:.2f}", anchor="end", size=9)
    for i, xl in enumerate(xlabels):
        svg.text(X(i), top + ph + 13, xl, anchor="middle", size=9)
    if ylabel:
        svg.text(12, top + ph / 2, ylabel, anchor="middle", size=9, rotate=-90)
    k = max(len(series), 1)
    for si, (label, means, lows, highs, color) in enumerate(series):
        off = (si - (k - 1) / 2) * min(6.0, pw / n / (k + 1))
        pts = []
        for i, (m, a, b) in enumerate(zip(means, lows, highs)):
            if math.isfinite(_num(a)) and math.isfinite(_num(b)):
                svg.line(X(i) + off, Y(_num(a)), X(i) + off, Y(_num(b)), color, 1.2)
            if math.isfinite(_num(m)):
                pts.append((X(i) + off, Y(_num(m))))
                svg.circle(X(i) + off, Y(_num(m)), 3, color, f"{label} {xlabels[i]}: {_num(m):+.3f} {_ci(a, b)}")
        svg.polyline(pts, color)
        y = top + 10 + 14 * si
        svg.line(left + pw + 10, y - 3, left + pw + 24, y - 3, color, 2)
        svg.text(left + pw + 28, y, label if len(label) <= 18 else label[:17] + "…", size=9)
    return svg.render()


def svg_bars(labels: Sequence[str], values: Sequence[float], *, title: str = "", width: int = 520,
             height: int = 200, ylim: tuple[float, float] = (0.0, 1.0), color: str = "#4477aa") -> str:
    svg = _Svg(width, height, title)
    left, right, top, bottom = 40, 10, 24, 30
    pw, ph = width - left - right, height - top - bottom
    lo, hi = ylim
    n = max(len(labels), 1)
    bw = pw / n
    svg.line(left, top + ph, left + pw, top + ph, "#666")
    svg.line(left, top, left, top + ph, "#666")
    for t in np.linspace(lo, hi, 5):
        y = top + (hi - t) / (hi - lo) * ph
        svg.text(left - 4, y + 3, f"{t:.2f}", anchor="end", size=9)
    step = max(1, int(math.ceil(n / 25)))
    for i, (lab, v) in enumerate(zip(labels, values)):
        v = _num(v)
        if math.isfinite(v):
            h = (min(max(v, lo), hi) - lo) / (hi - lo) * ph
            svg.rect(left + i * bw + 0.5, top + ph - h, max(bw - 1, 0.5), h, color, 0.8, f"{lab}: {v:.3f}")
        if i % step == 0:
            svg.text(left + (i + 0.5) * bw, top + ph + 12, lab, anchor="middle", size=8)
    return svg.render()


# --------------------------------------------------------------------------------------------------------------------
# token strings


def _decoder(report: Any, tokenizer: Any) -> Callable[[int], str] | None:
    if tokenizer is None:
        return None

    def dec(i: int) -> str:
        return tokenizer.decode([int(i)], skip_special_tokens=False)

    return dec


def _load_tokenizer_from_meta(report: Any) -> Any:
    """The tokenizer recorded by ``opd-diagnose run`` (a local path), or None."""
    path = report.meta.get("tokenizer") or report.meta.get("student")
    if not isinstance(path, str) or not Path(path).exists():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - the report still renders without token strings
        return None


# --------------------------------------------------------------------------------------------------------------------
# page pieces

_CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#24323f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .meta{font-size:12px;color:#cfd8e0;margin-top:4px}
nav{background:#fff;border-bottom:1px solid #ddd;padding:6px 24px;font-size:13px;position:sticky;top:0;z-index:5}
nav a{margin-right:12px;color:#246;text-decoration:none}
main{padding:8px 24px 40px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;margin:14px 0;padding:10px 16px;overflow-x:auto}
section h2{font-size:16px;margin:4px 0 8px}
p.help{font-size:12px;color:#555;margin:4px 0 8px;max-width:980px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f0f3f6;white-space:normal;vertical-align:bottom}td:first-child,th:first-child{text-align:left}
td.pos{color:#1a7f37}td.neg{color:#b42318}tr.best td{font-weight:bold}
.plots{display:flex;flex-wrap:wrap;gap:10px}svg.plot{background:#fff;border:1px solid #eee}
.warn{background:#fff4e5;border:1px solid #f0b86e;padding:8px 12px;border-radius:4px;margin:10px 0}
.q{border-top:1px solid #ddd;padding:8px 0}.q h3{font-size:14px;margin:4px 0}
.prompt{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#f6f8fa;
 border-left:3px solid #bbb;padding:4px 8px;max-height:160px;overflow:auto}
.rollout{margin:6px 0}.rollout .hdr{font-size:12px;color:#555}
.toks{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;
 word-break:break-all}
.tok{position:relative}.tok.node{border-bottom:2px solid #444;cursor:help;border-radius:2px}
.tok.node:focus{outline:2px solid #246}
.tok .tip{display:none;position:absolute;left:0;top:1.6em;z-index:10;background:#fff;color:#222;border:1px solid #888;
 box-shadow:0 2px 8px rgba(0,0,0,.2);padding:6px 8px;white-space:normal;width:max-content;max-width:520px;
 font-size:11px;line-height:1.4;font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif}
.tok:hover>.tip,.tok:focus>.tip{display:block}.tip table{margin:2px 0}.tip td,.tip th{padding:1px 5px}
.legend{font-size:12px}.legend span{padding:0 6px;margin-right:4px}
.chips .tok{margin-right:6px}
"""

_JS = """
(function(){
  function col(v){
    var a=parseFloat(v); if(!isFinite(a)) return 'rgba(160,160,160,0.35)';
    a=Math.max(-1,Math.min(1,a)); var al=(0.15+0.75*Math.abs(a)).toFixed(2);
    return a<0?'rgba(220,40,40,'+al+')':'rgba(30,160,60,'+al+')';
  }
  var sel=document.getElementById('colorcfg'); if(!sel) return;
  sel.addEventListener('change',function(){
    var i=parseInt(sel.value,10);
    var els=document.querySelectorAll('.tok.node');
    for(var k=0;k<els.length;k++){var v=(els[k].getAttribute('data-a')||'').split(',')[i];
      els[k].style.background=col(v);}
  });
})();
"""


def _page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str, script: bool = True) -> str:
    links = "".join(f'<a href="#{_esc(i)}">{_esc(t)}</a>' for i, t in nav)
    js = f"<script>{_JS}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_esc(title)}</h1><div class=\"meta\">{subtitle}</div></header>"
        f"<nav>{links}</nav><main>{body}</main>{js}</body></html>\n"
    )


def _section(sid: str, title: str, help_text: str, content: str) -> str:
    return (f'<section id="{_esc(sid)}"><h2>{_esc(title)}</h2><p class="help">{_esc(help_text)}</p>'
            f"{content}</section>")


def _signed_cell(v: Any, p: int = 3) -> str:
    x = _num(v)
    cls = "pos" if x > 0 else ("neg" if x < 0 else "")
    return f'<span class="{cls}">{_fmt(v, p, signed=True)}</span>'


def _summary_section(report: Any) -> str:
    summ = report.summary()
    rows = []
    for _, r in summ.iterrows():
        rows.append([
            _esc(r["config"]), _esc(r["subset"]), _signed_cell(r.get("teacher_gain")),
            _esc(_ci(r.get("teacher_gain_ci_low"), r.get("teacher_gain_ci_high"))), _signed_cell(r["alignment_mean"]),
            _esc(_ci(r["ci_low"], r["ci_high"])), _signed_cell(r["alignment_median"]),
            _esc(_pct(r["positive_fraction"])), _esc(_pct(r["degenerate_fraction"])),
            _esc(_fmt(r["teacher_advantage"], 4, signed=True)), _esc(int(r["n_nodes"])), _esc(int(r["n_valid"])),
            _esc(int(r["n_questions"])),
        ])
    lvl = int(round(100 * float(report._settings().get("ci_level", 0.95))))
    table = _table(rows, ["configuration", "rollouts", "teacher_gain (decides)", f"{lvl}% CI", "mean alignment",
                          f"{lvl}% CI (questions)", "median",
                          "positive", "degenerate", "teacher adv. A_T", "nodes", "scored", "questions"], raw=True)
    return _section(
        "summary", "Summary",
        "teacher_gain, the decision metric: the success gained by adopting the teacher where it differs from the "
        "student, as a fraction of what the best candidate token would gain (below 0: the teacher makes the student "
        "worse). Mean alignment: the mean cosine between each configuration's distillation direction and the ideal "
        "gradient, over non-degenerate "
        "nodes, for all rollouts and split by rollout correctness. The interval resamples whole questions. "
        "'positive' is the share of nodes where the teacher pushes towards success; 'degenerate' nodes (all "
        "candidates succeed or all fail, or teacher = student) are excluded from the means.",
        table,
    )


def _ci_pair(ci: Any) -> tuple[Any, Any]:
    """``(low, high)`` of a ``[low, high]`` summary field; ``(None, None)`` when it is missing."""
    return (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)


def _ranking_section(report: Any) -> str:
    from opd_callback.report.stats import DECISION_METRIC, METRICS

    rk = report.ranking()
    if rk.empty:
        return _section("ranking", "Verdict and ranking", "No configuration was scored.", "")
    dm = DECISION_METRIC
    ref = str(rk["reference"].iloc[0]) if "reference" in rk.columns else ""
    samples = int(report._settings().get("bootstrap_samples", 1000))
    rows, verdicts = [], []
    for _, r in rk.iterrows():
        lo, hi = _ci_pair(r.get(f"{dm}_ci"))
        diff = "reference" if r["config"] == ref else _signed_cell(r.get("diff"))
        sig = "" if r["config"] == ref else ("yes" if bool(r.get("significant")) else "no")
        rows.append([
            _esc(int(r["rank"])), _esc(r["config"]), _signed_cell(r["value"]), _esc(_ci(lo, hi)),
            _signed_cell(r["alignment_mean"]), diff, _esc(_ci(r.get("diff_ci_low"), r.get("diff_ci_high"))),
            _esc(_p(r.get("p_value"), samples)), _esc(sig), _esc(int(_num(r.get("n_questions_valid")) or 0)
                                                            if math.isfinite(_num(r.get("n_questions_valid"))) else 0),
        ])
        if hi is not None and math.isfinite(_num(hi)) and _num(hi) < 0:
            verdicts.append(f"{r['config']}: adopting this teacher where it differs from the student loses success "
                            f"({dm} {_fmt(r['value'], 3, signed=True)}, CI entirely below 0)")
        elif r["config"] != ref and bool(r.get("significant")) and _num(r.get("diff")) > 0:
            verdicts.append(f"{r['config']} beats {ref} ({_fmt(r.get('diff'), 3, signed=True)}, paired CI "
                            f"{_ci(r.get('diff_ci_low'), r.get('diff_ci_high'))})")
    table = _table(rows, ["rank", "configuration", dm, "CI", "mean alignment", f"paired diff vs {ref}", "diff CI",
                          "p (bootstrap)", "significant", "questions"], raw=True)
    forest = svg_forest([(str(r["config"]), r["value"], *_ci_pair(r.get(f"{dm}_ci"))) for _, r in rk.iterrows()],
                        title=f"{dm} with CI")
    forest_diff = svg_forest([(str(r["config"]), r.get("diff"), r.get("diff_ci_low"), r.get("diff_ci_high"))
                              for _, r in rk.iterrows() if r["config"] != ref],
                             title=f"paired difference vs {ref}") if len(rk) > 1 else ""
    verdict = ("<ul>" + "".join(f"<li>{_esc(v)}</li>" for v in verdicts) + "</ul>") if verdicts else (
        "<p>No configuration is significantly below 0 or significantly better than the reference.</p>")
    return _section(
        "ranking", "Verdict and ranking",
        f"The decision metric is {dm}: {METRICS[dm]}. It weighs each node by what is at stake there, so a teacher "
        "that is wrong exactly at the decisive tokens scores below 0 even when its mean alignment is high. "
        f"Configurations are compared with the reference ({ref}: the configuration named 'current' if there is one, "
        "else the best) on the same questions: a paired question-bootstrap interval of the difference; 'significant' "
        "means it excludes 0.",
        verdict + table + f'<div class="plots">{forest}{forest_diff}</div>',
    )


def _valid_alignment(df: pd.DataFrame) -> np.ndarray:
    if df.empty:
        return np.zeros(0)
    ok = ~df["degenerate"].astype(bool)
    return pd.to_numeric(df.loc[ok, "alignment"], errors="coerce").to_numpy(dtype=np.float64)


def _histograms_section(report: Any) -> str:
    rec = report.records
    plots = []
    for name in report.configs:
        part = rec[rec["config"] == name]
        corr = part[part["rollout_correct"].astype(bool)]
        inc = part[~part["rollout_correct"].astype(bool)]
        plots.append(svg_histogram([("correct", _valid_alignment(corr), GREEN),
                                    ("incorrect", _valid_alignment(inc), RED)], title=str(name)))
    return _section(
        "histograms", "Alignment histograms by configuration and correctness",
        "Distribution of per-node alignment in [-1, 1] (share of scored nodes per bin), separately on correct "
        "(green) and incorrect (red) rollouts. Mass right of the dashed zero line helps; the paper finds alignment "
        "higher on incorrect rollouts, where there is something to fix.",
        f'<div class="plots">{"".join(plots)}</div>',
    )


def _windows_section(report: Any) -> str:
    bw = report.by_window()
    if bw.empty:
        return _section("windows", "Alignment by depth window", "No nodes.", "")
    windows = sorted(int(w) for w in bw["window"].unique())
    labels = [stats.window_label(w) for w in windows]
    plots = []
    for subset in ("all", "incorrect", "correct"):
        series = []
        for i, name in enumerate(report.configs):
            part = bw[(bw["config"] == name) & (bw["subset"] == subset)].set_index("window")
            get = lambda col: [part[col].get(w, float("nan")) if w in part.index else float("nan") for w in windows]  # noqa: E731
            series.append((str(name), get("alignment_mean"), get("ci_low"), get("ci_high"), _color(i)))
        plots.append(svg_lines(labels, series, title=f"mean alignment by completion position ({subset} rollouts)",
                               ylabel="alignment"))
    rows = []
    sub = bw[bw["subset"] == "all"]
    for _, r in sub.iterrows():
        rows.append([_esc(r["config"]), _esc(r["window_label"]), _signed_cell(r["alignment_mean"]),
                     _esc(_ci(r["ci_low"], r["ci_high"])), _esc(_pct(r["positive_fraction"])),
                     _esc(_pct(r["degenerate_fraction"])), _esc(int(r["n_nodes"]))])
    table = _table(rows, ["configuration", "positions", "mean alignment", "CI", "positive", "degenerate", "nodes"],
                   raw=True)
    return _section(
        "windows", "Alignment by depth window",
        "Nodes grouped by completion position in exponential windows [0,1), [1,2), [2,4), [4,8), ... Bars are "
        "question-bootstrap intervals. Look for where a teacher stops helping (often late in the completion).",
        f'<div class="plots">{"".join(plots)}</div><details><summary>table (all rollouts)</summary>{table}'
        "</details>",
    )


def _success_section(report: Any) -> str:
    rol = report.rollouts
    if rol.empty:
        return _section("success", "Success rate", "No rollouts.", "")
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
    facts = _table([
        ["base rollouts", _esc(len(rol))],
        ["success rate (all rollouts)", _esc(_pct(report.success_rate))],
        ["questions", _esc(n_q)],
        ["questions never solved / always solved", _esc(f"{int((per_q == 0).sum())} / {int((per_q == 1).sum())}")],
        ["nodes", _esc(report.n_nodes)],
        ["mean covered mass of candidates", _esc(_pct(cov.mean()) if len(cov) else "–")],
    ], ["", "value"], raw=True)
    return _section(
        "success", "Success rate",
        "How often the student's own rollouts are correct (reward >= threshold), per question, and the estimated "
        "success probability V at the scored nodes. Questions that are always or never solved give degenerate nodes "
        "(nothing to learn from the verifier). 'covered mass' is the student probability of the candidate tokens "
        "whose success was measured.",
        facts + f'<div class="plots">{hist}{bars}{vhist}</div>',
    )


def _oracle_section(report: Any) -> str:
    try:
        og = report.oracle_mask_gain()
    except ValueError as exc:
        return _section("oracle", "Oracle mask gain", str(exc), "")
    rows = []
    for _, r in og.iterrows():
        rows.append([_esc(r["config"]), _esc(r["subset"]), _esc(_fmt(r["gain"], 2)),
                     _esc(_ci(r["gain_ci_low"], r["gain_ci_high"], 2)), _esc(_fmt(r["gain_median"], 2)),
                     _signed_cell(r["cos_full"]), _signed_cell(r["cos_masked"]), _esc(_pct(r["masked_fraction"])),
                     _esc(int(r["n_rollouts"]))])
    table = _table(rows, ["configuration", "rollouts", "gain (ratio of means)", "CI", "median gain",
                          "cos(G, D)", "cos(G, D+)", "nodes masked", "rollouts used"], raw=True)
    return _section(
        "oracle", "Oracle mask gain",
        "Treat a rollout's nodes as one long vector: G (ideal gradients) and D (distillation directions). D+ keeps "
        "only the nodes with positive alignment. gain = cos(G, D+) / cos(G, D): how much a perfect token mask would "
        "improve the teacher's signal (the paper: about 10-15x). Rollouts with no positive node, or all-degenerate "
        "ones, are left out; the median is over rollouts with cos(G, D) > 0.",
        table,
    )


def _correlations_section(report: Any) -> str:
    cor = report.correlations(by_window=False)
    if cor.empty:
        return _section("correlations", "Cheap proxies", "Not enough nodes.", "")
    parts = []
    names = report.configs
    for subset in ("all", "incorrect", "correct"):
        sub = cor[(cor["subset"] == subset) & (cor["window"] == "all")]
        rows = []
        for proxy in stats.PROXIES:
            ps = sub[sub["proxy"] == proxy].set_index("config")
            if ps.empty:
                continue
            cells = [_esc(proxy)]
            for n in names:
                if n in ps.index:
                    r = ps.loc[n]
                    cells.append(f'{_signed_cell(r["spearman"], 2)} <small>({_fmt(r["pearson"], 2, True)})</small>')
                else:
                    cells.append("–")
            rows.append(cells)
        parts.append(f"<h4>{_esc(subset)} rollouts</h4>" + _table(rows, ["proxy"] + [str(n) for n in names],
                                                                    raw=True))
    return _section(
        "correlations", "Cheap proxies: correlation with alignment",
        "Spearman rank correlation (Pearson in brackets) between per-node alignment and quantities that need no "
        "targeted rollouts: KL(P||Q), KL(Q||P), JS, student and teacher entropy, completion position. The paper finds "
        "them weak (positive for KL/JS): they cannot replace the rollouts. Per depth window: "
        "AlignmentReport.correlations().",
        "".join(parts),
    )


def _winners_section(report: Any) -> str:
    w = report.question_winners()
    rows = [[_esc(r["config"]), _esc(int(r["wins"])), _esc(_pct(r["win_fraction"]))] for _, r in w.iterrows()]
    return _section(
        "winners", "Which configuration wins each question",
        "Number of questions on which each configuration has the highest mean alignment (ties count for each). The "
        "paper: no configuration wins everywhere.",
        _table(rows, ["configuration", "questions won", "share"], raw=True),
    )


def _question_table_section(report: Any, limit: int = 300) -> str:
    pq = report.per_question()
    if pq.empty:
        return _section("question-table", "Per-question table", "No nodes.", "")
    names = report.configs
    wide = pq.pivot_table(index="prompt_index", columns="config", values="alignment_mean", aggfunc="first")
    sr = pq.groupby("prompt_index")["success_rate"].first()
    best = pq[pq["best"].astype(bool)].groupby("prompt_index")["config"].agg(lambda s: ", ".join(map(str, s)))
    rows = []
    for q in list(wide.index)[:limit]:
        cells = [f'<a href="#q{_esc(q)}">{_esc(q)}</a>', _esc(_pct(sr.get(q)))]
        for n in names:
            cells.append(_signed_cell(wide.loc[q].get(n, float("nan"))))
        cells.append(_esc(best.get(q, "–")))
        rows.append(cells)
    more = f"<p class=\"help\">first {limit} of {len(wide)} questions</p>" if len(wide) > limit else ""
    return _section(
        "question-table", "Per-question table",
        "Mean alignment of each configuration on each question, the question's success rate, and the best "
        "configuration there. Full data: AlignmentReport.per_question().",
        _table(rows, ["question", "success"] + [str(n) for n in names] + ["best"], raw=True) + more,
    )


def _tooltip(node: dict, configs: Sequence[str], dec: Callable[[int], str] | None, token: str) -> str:
    c = node["common"]
    ids = list(c.get("candidate_ids", []) if c.get("candidate_ids") is not None else [])
    probs = list(c.get("candidate_probs", []) if c.get("candidate_probs") is not None else [])
    succ = list(c.get("candidate_success", []) if c.get("candidate_success") is not None else [])
    nrol = list(c.get("candidate_rollouts", []) if c.get("candidate_rollouts") is not None else [])
    cand_toks = c.get("candidate_tokens")
    cand_toks = list(cand_toks) if cand_toks is not None else None
    head = (f"<b>position {_esc(int(c['position']))}</b> · token <code>{_esc(repr(token))}</code> · node value V = "
            f"{_esc(_fmt(c.get('value')))} · covered mass {_esc(_pct(c.get('covered_mass')))} · entropy "
            f"{_esc(_fmt(c.get('student_entropy'), 2))}")
    crow = []
    for k, j in enumerate(ids):
        if cand_toks is not None and k < len(cand_toks):
            t = cand_toks[k]
        elif dec is not None:
            t = dec(int(j))
        else:
            t = f"#{int(j)}"
        mark = " ←" if int(j) == int(c.get("token_id", -1)) else ""
        crow.append([_esc(repr(t) + mark), _esc(_fmt(probs[k] if k < len(probs) else None)),
                     _esc(_fmt(succ[k] if k < len(succ) else None, 2)),
                     _esc(int(nrol[k]) if k < len(nrol) else "–")])
    ctab = _table(crow, ["candidate", "P", "success S", "n"], raw=True) if crow else ""
    arow = []
    for n in configs:
        r = node["configs"].get(n)
        if r is None:
            continue
        al = "degenerate" if bool(r.get("degenerate")) else _fmt(r.get("alignment"), 3, True)
        arow.append([_esc(n), _esc(al), _esc(_fmt(r.get("teacher_advantage"), 4, True)),
                     _esc(_fmt(r.get("kl_reverse"), 3))])
    atab = _table(arow, ["configuration", "alignment", "A_T", "KL(P||Q)"], raw=True)
    return f'<span class="tip">{head}{ctab}{atab}</span>'


def _questions_section(report: Any, tokenizer: Any, max_questions: int, color_config: str | None) -> str:
    rec, rol = report.records, report.rollouts
    names = report.configs
    if rol.empty:
        return _section("questions", "Questions", "No rollouts.", "")
    if color_config is None or color_config not in names:
        rk = report.ranking() if len(rec) else pd.DataFrame()
        color_config = str(rk["config"].iloc[0]) if len(rk) else (names[0] if names else None)
    dec = _decoder(report, tokenizer)
    by_node: dict[tuple, dict] = {}
    for r in rec.to_dict("records") if len(rec) else []:
        key = (r["prompt_index"], int(r["rollout_index"]), int(r["position"]))
        by_node.setdefault(key, {"common": r, "configs": {}})["configs"][r["config"]] = r
    pq = report.per_question()
    qs = sorted(rol["prompt_index"].unique().tolist())
    shown = qs[:max_questions]
    opts = "".join(f'<option value="{i}"{" selected" if n == color_config else ""}>{_esc(n)}</option>'
                   for i, n in enumerate(names))
    legend = (
        f'<div class="legend">colour tokens by <select id="colorcfg">{opts}</select> '
        f'<span style="background:{alignment_color(-1.0)}">−1</span><span style="background:{alignment_color(-0.3)}">'
        f'−0.3</span><span style="background:{alignment_color(0.3)}">+0.3</span><span style="background:'
        f'{alignment_color(1.0)}">+1</span><span style="background:{alignment_color(None)}">degenerate</span> '
        "· underlined tokens were scored; hover (or focus) one for its candidates and every configuration's "
        "alignment</div>"
    )
    out = [legend]
    ci = names.index(color_config) if color_config in names else 0
    for q in shown:
        qrol = rol[rol["prompt_index"] == q].sort_values("rollout_index")
        prompt = qrol["prompt"].iloc[0] if "prompt" in qrol.columns and len(qrol) else ""
        sr = float(qrol["correct"].astype(float).mean()) if len(qrol) else float("nan")
        qp = pq[pq["prompt_index"] == q]
        qp = qp.assign(_o=qp["config"].map({n: i for i, n in enumerate(names)})).sort_values("_o")
        qrows = [[_esc(r["config"]), _signed_cell(r["alignment_mean"]), _esc(_pct(r["positive_fraction"])),
                  _esc(_pct(r["degenerate_fraction"])), _esc(int(_num(r["rank"])) if math.isfinite(_num(r["rank"]))
                                                              else "–")]
                 for _, r in qp.iterrows()]
        qtab = _table(qrows, ["configuration", "mean alignment", "positive", "degenerate", "rank"], raw=True)
        parts = [f'<div class="q" id="q{_esc(q)}"><h3>Question {_esc(q)} · success rate {_esc(_pct(sr))}</h3>',
                 f'<div class="prompt">{_esc(prompt)}</div>', qtab]
        for _, r in qrol.iterrows():
            ri = int(r["rollout_index"])
            ok = bool(r["correct"])
            parts.append(f'<div class="rollout"><div class="hdr">rollout {ri} · reward {_esc(_fmt(r["reward"], 2))} · '
                         f'<b style="color:{GREEN if ok else RED}">{"correct" if ok else "incorrect"}</b></div>')
            ids = list(r["completion_ids"]) if r.get("completion_ids") is not None else []
            toks = r.get("completion_tokens") if "completion_tokens" in r.index else None
            toks = list(toks) if toks is not None else None
            if toks is None and dec is not None:
                toks = [dec(int(i)) for i in ids]
            if toks is not None:
                spans = []
                for t, text in enumerate(toks):
                    node = by_node.get((q, ri, t))
                    spans.append(_token_span(node, names, ci, dec, text, t))
                parts.append(f'<div class="toks">{"".join(spans)}</div>')
            else:  # no token strings: the completion as text, then its scored tokens as chips
                parts.append(f'<div class="toks">{_esc(r.get("completion", ""))}</div>')
                chips = [_token_span(node, names, ci, dec, str(node["common"].get("token", "")), t)
                         for (qq, rr, t), node in sorted(by_node.items(), key=lambda kv: kv[0][2])
                         if qq == q and rr == ri]
                parts.append(f'<div class="toks chips">scored tokens: {"".join(chips)}</div>')
            parts.append("</div>")
        parts.append("</div>")
        out.append("".join(parts))
    more = (f'<p class="help">showing {len(shown)} of {len(qs)} questions (opd-diagnose report --max-questions N)</p>'
            if len(qs) > len(shown) else "")
    return _section(
        "questions", "Questions and rollouts, token by token",
        "Each question's prompt, its per-configuration table, and every base rollout with the scored tokens "
        "coloured by the chosen configuration's alignment (green helps, red hurts, grey: degenerate).",
        "".join(out) + more,
    )


def _token_span(node: dict | None, names: Sequence[str], ci: int, dec, text: str, t: int) -> str:
    shown = _esc(text).replace("\n", "\u21b5\n").replace("\t", "\u21e5") or "\u2205"
    if node is None:
        return f'<span class="tok">{shown}</span>'
    vals = []
    for n in names:
        r = node["configs"].get(n)
        a = float("nan") if r is None or bool(r.get("degenerate")) else _num(r.get("alignment"))
        vals.append("nan" if not math.isfinite(a) else f"{a:.4f}")
    a0 = _num(vals[ci]) if ci < len(vals) else float("nan")
    bg = alignment_color(a0 if math.isfinite(a0) else None)
    return (f'<span class="tok node" tabindex="0" data-pos="{t}" data-a="{",".join(vals)}" '
            f'style="background:{bg}">{shown}{_tooltip(node, names, dec, text)}</span>')


def _subtitle(report: Any) -> str:
    m = report.meta
    bits = []
    for k in ("student", "data"):
        if m.get(k):
            bits.append(f"{k}: {_esc(m[k])}")
    s = m.get("settings", {}) or {}
    bits.append(f"space: {_esc(s.get('space', 'logits'))}")
    for k in ("rollouts", "nodes", "continuations"):
        if isinstance(m.get(k), (int, float)):
            bits.append(f"{k}: {int(m[k])}")
    if isinstance(m.get("seconds"), (int, float)):
        bits.append(f"{m['seconds']:.0f} s")
    bits.append(f"generated {_esc(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}")
    return " · ".join(bits)


def _settings_details(report: Any) -> str:
    s = report.meta.get("settings", {}) or {}
    cfgs = report.meta.get("configs", []) or []
    srows = [[_esc(k), _esc(v)] for k, v in s.items()]
    crow = [[_esc(c.get("name")), _esc(c.get("teacher")), _esc(c.get("template") or c.get("model") or ""),
             _esc(c.get("divergence")), _esc(c.get("beta")), _esc(c.get("temperature"))] for c in cfgs]
    return ("<details><summary>settings and configurations</summary>"
            + _table(crow, ["configuration", "teacher", "template / model", "divergence", "beta", "temperature"],
                     raw=True)
            + _table(srows, ["setting", "value"], raw=True) + "</details>")


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
        tokenizer = _load_tokenizer_from_meta(report)
    body = []
    if report.meta.get("interrupted"):
        body.append(f'<div class="warn">This run was interrupted: {_esc(report.meta.get("completed_prompts", "?"))} '
                    f"of {_esc(report.meta.get('total_prompts', '?'))} prompts were scored; the report covers "
                    "those.</div>")
    if report.records.empty:
        body.append('<div class="warn">No node was scored (no records).</div>')
    body.append(_settings_details(report))
    body += [
        _summary_section(report),
        _ranking_section(report),
        _histograms_section(report),
        _windows_section(report),
        _success_section(report),
        _oracle_section(report),
        _correlations_section(report),
        _winners_section(report),
        _question_table_section(report),
        _questions_section(report, tokenizer, max_questions, color_config),
    ]
    nav = [("summary", "Summary"), ("ranking", "Ranking"), ("histograms", "Histograms"), ("windows", "Depth"),
           ("success", "Success"), ("oracle", "Oracle mask"), ("correlations", "Proxies"), ("winners", "Winners"),
           ("question-table", "Per question"), ("questions", "Tokens")]
    page = _page(title, _subtitle(report), nav, "".join(body))
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(page, encoding="utf-8")
    return page


def build_compare_html(
    a: Any, b: Any, path: str | Path | None = None, *, names: tuple[str, str] = ("A", "B"), title: str | None = None
) -> str:
    """Two runs side by side (e.g. two checkpoints of one training run): both summaries, ``B - A`` per configuration
    with a question-bootstrap interval, and both runs' alignment by depth window. Written to ``path`` when given."""
    na, nb = names
    title = title or f"OPD alignment: {na} vs {nb}"
    cmp_ = stats.compare_reports(a, b, names)
    rows = []
    for _, r in cmp_.iterrows():
        rows.append([
            _esc(r["config"]), _signed_cell(r[f"mean_{na}"]), _esc(_ci(r[f"ci_low_{na}"], r[f"ci_high_{na}"])),
            _signed_cell(r[f"mean_{nb}"]), _esc(_ci(r[f"ci_low_{nb}"], r[f"ci_high_{nb}"])), _signed_cell(r["diff"]),
            _esc(_ci(r["diff_ci_low"], r["diff_ci_high"])), _esc("yes" if r["significant"] else "no"),
            _esc(int(r[f"n_{na}"])), _esc(int(r[f"n_{nb}"])),
        ])
    table = _table(rows, ["configuration", f"mean {na}", "CI", f"mean {nb}", "CI", f"{nb} − {na}", "diff CI",
                          "significant", f"nodes {na}", f"nodes {nb}"], raw=True)
    forest = svg_forest([(str(r["config"]), r["diff"], r["diff_ci_low"], r["diff_ci_high"])
                         for _, r in cmp_.iterrows()], title=f"{nb} − {na}: mean alignment")
    rates = _table([[_esc(na), _esc(_pct(a.success_rate)), _esc(len(a.rollouts)), _esc(a.n_nodes)],
                    [_esc(nb), _esc(_pct(b.success_rate)), _esc(len(b.rollouts)), _esc(b.n_nodes)]],
                   ["run", "success rate", "rollouts", "nodes"], raw=True)
    plots = []
    for tag, rep in ((na, a), (nb, b)):
        bw = rep.by_window()
        if bw.empty:
            continue
        windows = sorted(int(w) for w in bw["window"].unique())
        series = []
        for i, name in enumerate(rep.configs):
            part = bw[(bw["config"] == name) & (bw["subset"] == "all")].set_index("window")
            get = lambda col: [part[col].get(w, float("nan")) if w in part.index else float("nan") for w in windows]  # noqa: E731
            series.append((str(name), get("alignment_mean"), get("ci_low"), get("ci_high"), _color(i)))
        plots.append(svg_lines([stats.window_label(w) for w in windows], series, title=f"{tag}: alignment by depth"))
    summaries = []
    for tag, rep in ((na, a), (nb, b)):
        summaries.append(f"<h4>{_esc(tag)}</h4>" + _summary_section(rep).replace('id="summary"', f'id="summary-{_esc(tag)}"'))
    body = (
        _section("compare", f"{nb} − {na}",
                 "Difference of mean alignment per configuration between the two runs, with a bootstrap interval that "
                 "resamples questions jointly (paired by question when both runs used the same prompts).",
                 table + f'<div class="plots">{forest}</div>')
        + _section("success", "Success rates", "Base-rollout success rate of each run.", rates)
        + _section("windows", "Alignment by depth window", "Both runs, all rollouts.",
                   f'<div class="plots">{"".join(plots)}</div>')
        + "".join(summaries)
    )
    sub = f"{_esc(na)}: {_esc(a.meta.get('student', ''))} · {_esc(nb)}: {_esc(b.meta.get('student', ''))}"
    page = _page(title, sub, [("compare", "Difference"), ("success", "Success"), ("windows", "Depth")], body,
                 script=False)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(page, encoding="utf-8")
    return page
