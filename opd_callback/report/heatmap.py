"""Old import path of :mod:`opd_callback.report.html.heatmap` (kept until ``opd_callback/training/wandb_panels.py``
imports from there)."""

from opd_callback.report.html.heatmap import alignment_color, token_heatmap_html

__all__ = ["token_heatmap_html", "alignment_color"]
