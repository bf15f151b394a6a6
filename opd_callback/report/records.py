"""The record schema: the columns of the per-token records and of the rollouts table, and the subsets every
statistic is reported on. The engine writes records with these columns; the report reads them."""

from __future__ import annotations

__all__ = ["EXTRA_RECORD_COLUMNS", "RECORD_COLUMNS", "REQUIRED_RECORD_COLUMNS", "ROLLOUT_COLUMNS", "SUBSETS"]

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
