"""The offline HTML report: one self-contained file (inline CSS, inline SVG plots, a few lines of inline JavaScript),
and the token heatmap of the wandb panels.

:func:`build_html` renders an :class:`~opd_callback.report.AlignmentReport`; :func:`build_compare_html` renders two
side by side; :func:`token_heatmap_html` renders a few rollouts as coloured tokens. Nothing is loaded from the network
(no CDN, no external URL). **Every** piece of model, dataset or user text (prompts, completions, tokens, configuration
names, paths) is escaped (:func:`~opd_callback.report.html.format.esc`) before it is placed in the page, so a
completion containing ``<script>`` is displayed as text and never runs. The report's own script only re-colours tokens
when another configuration is picked; it reads numbers from ``data-`` attributes that this package writes.

Modules: ``format`` (escaping, numbers, colours, tables), ``svg`` (plots), ``page`` (CSS, script, page shell),
``sections`` and ``questions`` (the report's sections), ``tokens`` (scored nodes, token decoding), ``heatmap`` (the
wandb token heatmap), ``build`` (the two pages). Section ids: :data:`SECTIONS`; ``docs/report.md`` explains how to
read each.
"""

from opd_callback.report.html.build import SECTIONS, build_compare_html, build_html
from opd_callback.report.html.format import alignment_color
from opd_callback.report.html.heatmap import token_heatmap_html

__all__ = ["SECTIONS", "alignment_color", "build_compare_html", "build_html", "token_heatmap_html"]
