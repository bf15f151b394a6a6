"""Inline SVG plots for the HTML report: overlaid histograms, forest plots, lines over categories, bars.

Every label is escaped (:func:`~opd_callback.report.html.format.esc`); nothing is loaded from elsewhere.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from opd_callback.report.html.format import ci, esc, series_color
from opd_callback.report.numeric import as_float

__all__ = ["SvgCanvas", "svg_histogram", "svg_forest", "svg_lines", "svg_bars"]


class SvgCanvas:
    """An SVG image built element by element (coordinates in pixels, text escaped)."""

    def __init__(self, width: int, height: int, title: str = "") -> None:
        self.w, self.h = width, height
        self.parts: list[str] = []
        if title:
            self.text(width / 2, 14, title, anchor="middle", size=12, weight="bold")

    def add(self, s: str) -> None:
        """Append raw SVG markup (the caller escaped any text in it)."""
        self.parts.append(s)

    def text(self, x: float, y: float, s: Any, *, anchor: str = "start", size: int = 10, color: str = "#333",
             weight: str = "normal", rotate: float | None = None) -> None:
        """Text ``s`` (escaped) at ``(x, y)``, optionally rotated about that point."""
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}" '
                 f'font-weight="{weight}"{tr}>{esc(s)}</text>')

    def line(self, x1: float, y1: float, x2: float, y2: float, color: str = "#999", width: float = 1.0,
             dash: str | None = None) -> None:
        """A straight line, dashed when ``dash`` (an SVG dash pattern) is given."""
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
                 f'stroke-width="{width}"{d}/>')

    def axes(self, left: float, top: float, pw: float, ph: float) -> None:
        """The x axis under and the y axis left of the plot area ``(left, top, pw, ph)``."""
        self.line(left, top + ph, left + pw, top + ph, "#666")
        self.line(left, top, left, top + ph, "#666")

    def rect(self, x: float, y: float, w: float, h: float, color: str, opacity: float = 1.0,
             title: str | None = None) -> None:
        """A filled rectangle (negative sizes drawn as 0) with an optional hover title (escaped)."""
        t = f"<title>{esc(title)}</title>" if title else ""
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" fill="{color}" '
                 f'fill-opacity="{opacity}">{t}</rect>')

    def circle(self, x: float, y: float, r: float, color: str, title: str | None = None) -> None:
        """A filled circle with an optional hover title (escaped)."""
        t = f"<title>{esc(title)}</title>" if title else ""
        self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}">{t}</circle>')

    def polyline(self, pts: Sequence[tuple[float, float]], color: str, width: float = 1.5,
                 dash: str | None = None) -> None:
        """A line through ``pts`` (nothing for fewer than two points)."""
        if len(pts) < 2:
            return
        d = f' stroke-dasharray="{dash}"' if dash else ""
        p = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        self.add(f'<polyline points="{p}" fill="none" stroke="{color}" stroke-width="{width}"{d}/>')

    def render(self) -> str:
        """The ``<svg>`` element."""
        return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}" role="img">' + "".join(self.parts) + "</svg>")


def _finite(values: Sequence) -> list[float]:
    """The finite numbers among ``values``."""
    return [v for v in (as_float(x) for x in values) if math.isfinite(v)]


def _padded_range(vals: list[float], pad_min: float) -> tuple[float, float]:
    """``[min, max]`` of ``vals`` widened by 8% (at least ``pad_min``) on each side; ``[-1, 1]`` without values."""
    lo, hi = (min(vals), max(vals)) if vals else (-1.0, 1.0)
    pad = max((hi - lo) * 0.08, pad_min)
    return lo - pad, hi + pad


def _short(label: str, n: int) -> str:
    """``label`` cut to ``n`` characters with an ellipsis."""
    return label if len(label) <= n else label[:n - 1] + "…"


def svg_histogram(series: Sequence[tuple[str, np.ndarray, str]], *, title: str = "", bins: int = 20,
                  lo: float = -1.0, hi: float = 1.0, width: int = 300, height: int = 190) -> str:
    """Overlaid histograms (fraction of each series' values per bin) of values in ``[lo, hi]``."""
    svg = SvgCanvas(width, height, title)
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
    svg.axes(left, top, pw, ph)
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
    svg = SvgCanvas(width, height, title)
    left, right, top = 150, 16, 26
    pw = width - left - right
    lo, hi = _padded_range(_finite([x for r in rows for x in r[1:]] + [zero]), 1e-3)

    def X(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    bottom = top + 22 * max(len(rows), 1)
    svg.line(X(zero), top - 4, X(zero), bottom, "#999", dash="3,3")
    for i, (label, v, a, b) in enumerate(rows):
        y = top + 22 * i + 11
        c = colors[i] if colors else series_color(i)
        v, a, b = as_float(v), as_float(a), as_float(b)
        svg.text(left - 6, y + 4, _short(label, 24), anchor="end", size=10)
        if math.isfinite(a) and math.isfinite(b):
            svg.line(X(a), y, X(b), y, c, 2)
            svg.line(X(a), y - 4, X(a), y + 4, c, 1.5)
            svg.line(X(b), y - 4, X(b), y + 4, c, 1.5)
        if math.isfinite(v):
            svg.circle(X(v), y, 4, c, f"{label}: {v:+.3f} {ci(a, b)}")
    svg.line(left, bottom + 2, left + pw, bottom + 2, "#666")
    for t in np.linspace(lo, hi, 5):
        svg.line(X(t), bottom + 2, X(t), bottom + 5, "#666")
        svg.text(X(t), bottom + 16, f"{t:+.2f}", anchor="middle", size=9)
    return svg.render()


def svg_lines(xlabels: Sequence[str], series: Sequence[tuple[str, Sequence[float], Sequence[float],
              Sequence[float], str]], *, title: str = "", width: int = 520, height: int = 240,
              ylim: tuple[float, float] | None = None, ylabel: str = "") -> str:
    """Lines over categorical x with interval bars: ``(label, means, lows, highs, color)`` per series."""
    svg = SvgCanvas(width, height, title)
    left, right, top, bottom = 46, 130, 24, 34
    pw, ph = width - left - right, height - top - bottom
    vals = _finite([v for _, m, lo_, hi_, _ in series for v in list(m) + list(lo_) + list(hi_)])
    lo, hi = ylim if ylim is not None else _padded_range(vals + [0.0] if vals else [], 0.01)
    n = max(len(xlabels), 1)

    def X(i: float) -> float:
        return left + (i + 0.5) / n * pw

    def Y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * ph

    svg.axes(left, top, pw, ph)
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
            m, a, b = as_float(m), as_float(a), as_float(b)
            if math.isfinite(a) and math.isfinite(b):
                svg.line(X(i) + off, Y(a), X(i) + off, Y(b), color, 1.2)
            if math.isfinite(m):
                pts.append((X(i) + off, Y(m)))
                svg.circle(X(i) + off, Y(m), 3, color, f"{label} {xlabels[i]}: {m:+.3f} {ci(a, b)}")
        svg.polyline(pts, color)
        y = top + 10 + 14 * si
        svg.line(left + pw + 10, y - 3, left + pw + 24, y - 3, color, 2)
        svg.text(left + pw + 28, y, _short(label, 18), size=9)
    return svg.render()


def svg_bars(labels: Sequence[str], values: Sequence[float], *, title: str = "", width: int = 520,
             height: int = 200, ylim: tuple[float, float] = (0.0, 1.0), color: str = "#4477aa") -> str:
    """Vertical bars, one per label, clipped to ``ylim`` (every ``n/25``-th label written under its bar)."""
    svg = SvgCanvas(width, height, title)
    left, right, top, bottom = 40, 10, 24, 30
    pw, ph = width - left - right, height - top - bottom
    lo, hi = ylim
    n = max(len(labels), 1)
    bw = pw / n
    svg.axes(left, top, pw, ph)
    for t in np.linspace(lo, hi, 5):
        y = top + (hi - t) / (hi - lo) * ph
        svg.text(left - 4, y + 3, f"{t:.2f}", anchor="end", size=9)
    step = max(1, int(math.ceil(n / 25)))
    for i, (lab, v) in enumerate(zip(labels, values)):
        v = as_float(v)
        if math.isfinite(v):
            h = (min(max(v, lo), hi) - lo) / (hi - lo) * ph
            svg.rect(left + i * bw + 0.5, top + ph - h, max(bw - 1, 0.5), h, color, 0.8, f"{lab}: {v:.3f}")
        if i % step == 0:
            svg.text(left + (i + 0.5) * bw, top + ph + 12, lab, anchor="middle", size=8)
    return svg.render()
