"""Reports: the record schema, :class:`AlignmentReport` and its statistics, the token heatmap and the HTML report.

Modules: ``records`` (schema), ``alignment_report`` (:class:`AlignmentReport`: statistics, ranking, save/load),
``bootstrap`` (the question bootstrap), ``selection`` (keys, subsets, valid nodes, the reference of a comparison),
``metrics`` (the pooled decision metrics), ``stats`` (the analyses of method.md §6), ``numeric`` (number
conversions), ``html`` (the HTML report and the token heatmap).

Depends on numpy and pandas only (the HTML report loads a tokenizer lazily when asked to decode tokens).
"""

from opd_callback.report.alignment_report import AlignmentReport
from opd_callback.report.bootstrap import bootstrap_mean_ci
from opd_callback.report.records import (
    EXTRA_RECORD_COLUMNS,
    RECORD_COLUMNS,
    REQUIRED_RECORD_COLUMNS,
    ROLLOUT_COLUMNS,
    SUBSETS,
)

__all__ = ["AlignmentReport", "EXTRA_RECORD_COLUMNS", "RECORD_COLUMNS", "REQUIRED_RECORD_COLUMNS", "ROLLOUT_COLUMNS",
           "SUBSETS", "bootstrap_mean_ci"]
