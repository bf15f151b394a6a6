"""The record schema: the columns of the per-token records and of the rollouts table, and the subsets every
statistic is reported on. The engine writes records with these columns; the report reads them."""

from __future__ import annotations

__all__ = ["EXTRA_RECORD_COLUMNS", "RECORD_COLUMNS", "REQUIRED_RECORD_COLUMNS", "ROLLOUT_COLUMNS", "SUBSETS",
           "make_record", "make_rollout_record"]

RECORD_COLUMNS = [
    "prompt_index",
    "rollout_index",
    "position",
    "token_id",
    "token",
    "rollout_reward",
    "rollout_correct",
    "window",
    "student_entropy",
    "covered_mass",
    "value",
    "candidate_ids",
    "candidate_probs",
    "candidate_success",
    "candidate_rollouts",
    "config",
    "alignment",
    "inner",
    "teacher_advantage",
    "kl_reverse",
    "kl_forward",
    "js",
    "teacher_entropy",
    "degenerate",
]
# Optional columns written by newer engines (absent from old records): per-node norms |g| and |d| in the scored space
# (enough, with ``inner``, for the rollout-level cosines of the oracle mask gain), and in parameter space
# (``RolloutSettings(space="params")``) the logit-space alignment of the same node for comparison.
EXTRA_RECORD_COLUMNS = ["g_norm", "d_norm", "alignment_logits"]
# what AlignmentReport.load insists on (every statistic reads these)
REQUIRED_RECORD_COLUMNS = ["prompt_index", "rollout_index", "position", "config", "alignment", "degenerate",
                           "rollout_correct", "teacher_advantage", "inner"]
ROLLOUT_COLUMNS = ["prompt_index", "rollout_index", "prompt", "completion", "completion_ids", "reward", "correct"]

SUBSETS = ("all", "correct", "incorrect")


def _row(table: str, columns: list[str], optional: list[str], fields: dict) -> dict:
    """``fields`` in schema order; refuses unknown columns and missing ``columns`` (``optional`` ones may be absent)."""
    unknown = [k for k in fields if k not in columns and k not in optional]
    missing = [k for k in columns if k not in fields]
    if unknown or missing:
        raise ValueError(f"a {table} row must have the schema's columns: unknown {unknown}, missing {missing}")
    return {k: fields[k] for k in columns + [c for c in optional if c in fields]}


def make_record(**fields: object) -> dict:
    """One per-token record (a row of ``AlignmentReport.records``): every column of :data:`RECORD_COLUMNS`, and any of
    :data:`EXTRA_RECORD_COLUMNS`, in schema order. Raises ``ValueError`` on an unknown or a missing column."""
    return _row("record", RECORD_COLUMNS, EXTRA_RECORD_COLUMNS, fields)


def make_rollout_record(**fields: object) -> dict:
    """One row of the rollouts table: the columns of :data:`ROLLOUT_COLUMNS`, in schema order. Raises ``ValueError``
    on an unknown or a missing column."""
    return _row("rollout", ROLLOUT_COLUMNS, [], fields)
