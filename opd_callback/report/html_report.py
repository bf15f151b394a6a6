"""Old import path of :mod:`opd_callback.report.html` (kept until ``opd_callback/cli.py`` imports from there)."""

from opd_callback.report.html import SECTIONS, alignment_color, build_compare_html, build_html

__all__ = ["build_html", "build_compare_html", "alignment_color", "SECTIONS"]
