"""``AlignmentEarlyStopping``: stop training when the watched teacher configuration pushes the student the wrong way.

The rules (absolute threshold, relative paired comparison, patience, neutral diagnostics) are documented on the
class; :class:`~opd_callback.training.callback.GradientAlignmentCallback` feeds it every diagnostic's
:meth:`~opd_callback.AlignmentReport.config_summary` and report.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from opd_callback.core.settings import check_value
from opd_callback.report import AlignmentReport
from opd_callback.report.numeric import finite_or_none
from opd_callback.training.trainers import CURRENT

__all__ = ["AlignmentEarlyStopping", "EARLY_STOPPING_METRICS"]

# early-stopping metric name -> config_summary key
EARLY_STOPPING_METRICS = {
    "teacher_gain": "teacher_gain",
    "step_alignment": "step_alignment",
    "alignment_weighted": "alignment_weighted",
    "alignment": "alignment_mean",
    "alignment_correct": "alignment_correct",
    "alignment_incorrect": "alignment_incorrect",
    "positive_fraction": "positive_fraction",
    "teacher_advantage": "teacher_advantage",
}
# early-stopping metric name -> pooled metric (opd_callback.report.stats.METRICS) for paired comparisons
_PAIRED_METRIC = {"teacher_gain": "teacher_gain", "step_alignment": "step_alignment",
                  "alignment_weighted": "alignment_weighted", "alignment": "alignment_mean",
                  "teacher_advantage": "teacher_advantage"}


def _summary_row(summary: Sequence[dict], config: str) -> dict | None:
    """The :meth:`AlignmentReport.config_summary` row of ``config`` (None when it was not scored)."""
    return next((r for r in summary if r.get("config") == config), None)


def _ci(b: dict) -> str:
    """A win's paired CI, ``[low, high]`` with signs."""
    return f"[{b['diff_ci_low']:+.3f}, {b['diff_ci_high']:+.3f}]"


class AlignmentEarlyStopping(TrainerCallback, ExportableState):
    """Stop training when the current teacher configuration pushes the student the wrong way.

    Pass it to :class:`GradientAlignmentCallback` (``early_stopping=``), which adds it to the trainer and feeds it
    every diagnostic. A diagnostic is **bad** when either rule fires:

    * *absolute*: ``metric`` of configuration ``config`` is below ``threshold``;
    * *relative* (``relative=True``, metrics with a paired comparison): another scored configuration beats
      ``config`` by more than ``margin`` with the paired question-bootstrap CI of the difference entirely above
      ``margin`` -- "the named alternative is significantly better than the current teacher".

    Training stops after ``patience`` consecutive bad diagnostics at or after ``min_step``. A diagnostic counts as
    neither good nor bad (*neutral*) when the metric is undefined or rests on fewer than ``min_questions`` questions
    with a non-degenerate node. On a stop the callback sets ``control.should_training_stop`` and
    ``control.should_save`` (a final checkpoint) on every rank and logs why. Its counters are saved in checkpoints
    (``ExportableState``) and restored on resume.

    The defaults watch the decision metric ``teacher_gain`` (method.md, "Deciding between configurations"): the
    success the student would gain by adopting the teacher at the probed nodes, as a fraction of what the best
    candidate token would gain; below 0 the teacher makes the student worse where it differs from it. Measured on
    five independently trained toy labs (``benchmarks/bench_robustness.py``), the defaults stop a teacher trained on
    a wrong rule, and the strong teacher fine-tuned on it (wrong only at the decisive tokens), and never the strong
    teacher.

    Args:
        metric: ``"teacher_gain"`` (default), ``"step_alignment"``, ``"alignment_weighted"``, ``"alignment"``,
            ``"alignment_correct"``, ``"alignment_incorrect"``, ``"positive_fraction"`` or ``"teacher_advantage"``.
        threshold: absolute rule: a diagnostic is bad when the metric is strictly below it (``None``: no absolute
            rule).
        patience: consecutive bad diagnostics that stop training.
        config: the configuration watched (default ``"current"``, the trainer's own).
        min_step: diagnostics before this global step are not counted.
        warn_if_beaten: log a warning when another configuration is significantly better than ``config`` by the
            paired CI of ``metric`` (with at least ``min_questions`` questions behind it); the first time per
            configuration at WARNING level, repeats at INFO.
        relative: use the relative rule (needs alternatives in the callback's ``configs``).
        margin: the relative rule's margin, in units of ``metric``.
        min_questions: the least number of questions with a non-degenerate node for a diagnostic (or a "beats"
            warning) to count.
    """

    def __init__(
        self,
        metric: str = "teacher_gain",
        threshold: float | None = 0.0,
        patience: int = 2,
        config: str = CURRENT,
        min_step: int = 0,
        warn_if_beaten: bool = True,
        relative: bool = True,
        margin: float = 0.25,
        min_questions: int = 4,
    ) -> None:
        if metric not in EARLY_STOPPING_METRICS:
            raise ValueError(f"AlignmentEarlyStopping: metric must be one of {sorted(EARLY_STOPPING_METRICS)}, "
                             f"got {metric!r}")
        owner = "AlignmentEarlyStopping"  # types checked, not coerced
        threshold = check_value(owner, "threshold", threshold, Optional[float])
        patience = check_value(owner, "patience", patience, int)
        min_step = check_value(owner, "min_step", min_step, int)
        warn_if_beaten = check_value(owner, "warn_if_beaten", warn_if_beaten, bool)
        relative = check_value(owner, "relative", relative, bool)
        margin = check_value(owner, "margin", margin, float)
        min_questions = check_value(owner, "min_questions", min_questions, int)
        self._check_values(metric, threshold, patience, config, relative, margin, min_questions)
        self.metric = metric
        self.threshold = None if threshold is None else float(threshold)
        self.patience = patience
        self.config = config
        self.min_step = int(min_step)
        self.warn_if_beaten = bool(warn_if_beaten)
        self.relative = bool(relative)
        self.margin = float(margin)
        self.min_questions = int(min_questions)
        # counters (saved in checkpoints)
        self.bad_count = 0
        self.neutral_count = 0
        self.diagnostics = 0
        self.last_step = -1
        self.stopped_step: int | None = None
        self.reason: str | None = None

    @staticmethod
    def _check_values(metric: str, threshold: Any, patience: int, config: Any, relative: bool, margin: Any,
                      min_questions: Any) -> None:
        """The range checks of the arguments (their types are checked already)."""
        if patience < 1:
            raise ValueError(f"AlignmentEarlyStopping: patience must be an int >= 1, got {patience!r}")
        if not isinstance(config, str) or not config:
            raise ValueError("AlignmentEarlyStopping: config must be a configuration name")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(float(threshold))):
            raise ValueError(f"AlignmentEarlyStopping: threshold must be a finite number or None, got {threshold!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise ValueError(f"AlignmentEarlyStopping: margin must be a finite number >= 0, got {margin!r}")
        if not isinstance(min_questions, int) or isinstance(min_questions, bool) or min_questions < 1:
            raise ValueError(f"AlignmentEarlyStopping: min_questions must be an int >= 1, got {min_questions!r}")
        if threshold is None and not (relative and metric in _PAIRED_METRIC):
            raise ValueError("AlignmentEarlyStopping: with threshold=None the relative rule must be on (relative=True "
                             f"and a metric among {sorted(_PAIRED_METRIC)}), or nothing could ever stop training")

    # ---------------------------------------------------------------------------------------------- ExportableState
    def state(self) -> dict:
        """The arguments (which identify this instance) and the counters, as saved in checkpoints."""
        return {
            "args": {
                "metric": self.metric,
                "threshold": self.threshold,
                "patience": self.patience,
                "config": self.config,
                "min_step": self.min_step,
                "warn_if_beaten": self.warn_if_beaten,
                "relative": self.relative,
                "margin": self.margin,
                "min_questions": self.min_questions,
            },
            "attributes": {
                "bad_count": self.bad_count,
                "neutral_count": self.neutral_count,
                "diagnostics": self.diagnostics,
                "last_step": self.last_step,
                "stopped_step": self.stopped_step,
                "reason": self.reason,
            },
        }

    def restore_from(self, trainer_state: Any) -> bool:
        """Load counters saved in a checkpoint's ``trainer_state.json`` (``state.stateful_callbacks``), matching this
        instance by its arguments. Idempotent; returns whether something was loaded."""
        stored = (getattr(trainer_state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if stored is None:
            return False
        items = stored if isinstance(stored, list) else [stored]
        mine = self.state()["args"]
        for item in items:
            if isinstance(item, dict) and item.get("args") == mine:
                for k, v in (item.get("attributes") or {}).items():
                    if k in self.state()["attributes"]:
                        setattr(self, k, v)
                return True
        return False

    # ---------------------------------------------------------------------------------------------- decisions
    @property
    def _key(self) -> str:
        """The logged scalar of the watched metric (``opd/<config>/<metric>``)."""
        return f"opd/{self.config}/{self.metric}"

    def metric_value(self, summary: Sequence[dict]) -> float | None:
        """The watched metric from :meth:`AlignmentReport.config_summary` rows (``None`` when undefined)."""
        row = _summary_row(summary, self.config)
        if row is None:
            return None
        if self.metric == "teacher_advantage" and finite_or_none(row.get("alignment_mean")) is None:
            return None  # no non-degenerate node at all
        return finite_or_none(row.get(EARLY_STOPPING_METRICS[self.metric]))

    def _evidence(self, summary: Sequence[dict], config: str) -> int | None:
        """Questions with a non-degenerate node behind ``config``'s numbers (None when the summary does not say)."""
        n = (_summary_row(summary, config) or {}).get("n_questions_valid")
        return None if n is None else int(n)

    def better_alternatives(self, report: AlignmentReport | None, margin: float | None = None,
                            summary: Sequence[dict] | None = None) -> list[dict]:
        """Configurations whose ``metric`` beats ``config``'s by more than ``margin`` (default ``self.margin``) with
        the paired question-bootstrap CI of the difference entirely above it, and at least ``min_questions``
        questions behind both. Each: ``{"config", "diff", "diff_ci_low", "diff_ci_high", "n_questions",
        "n_nodes"}``. Empty for metrics without a paired comparison. ``summary``: the report's
        :meth:`~AlignmentReport.config_summary` when the caller has it already."""
        pm_name = _PAIRED_METRIC.get(self.metric)
        if report is None or pm_name is None or report.records.empty or self.config not in report.configs:
            return []
        from opd_callback.report import stats

        margin = self.margin if margin is None else margin
        diffs = stats.metric_differences(report, pm_name, reference=self.config)
        summary = report.config_summary() if summary is None else summary
        mine = self._evidence(summary, self.config) or 0
        out = []
        for _, r in diffs.iterrows():
            lo = finite_or_none(r["diff_ci_low"])
            if r["config"] == self.config or lo is None or lo <= margin:
                continue
            n_q = min(mine, self._evidence(summary, r["config"]) or 0)
            if n_q < self.min_questions:
                continue
            row = _summary_row(summary, r["config"])
            out.append({"config": r["config"], "diff": float(r["diff"]), "diff_ci_low": lo,
                        "diff_ci_high": finite_or_none(r["diff_ci_high"]), "n_questions": n_q,
                        "n_nodes": int(row.get("n_nodes", 0))})
        return out

    def update(self, step: int, summary: Sequence[dict], report: AlignmentReport | None = None) -> dict:
        """Count one diagnostic (``report`` enables the relative rule); returns ``{"status", "value", "stop",
        "message", "beaten_by", "wins"}`` (``wins``: :meth:`better_alternatives` at margin 0, for the warnings)."""
        value = self.metric_value(summary)
        self.diagnostics += 1
        self.last_step = int(step)
        # every significant win over the watched configuration (for the "beats" warnings); the relative rule keeps
        # those above the margin
        wins = self.better_alternatives(report, 0.0, summary) if self.relative or self.warn_if_beaten else []
        better = [w for w in wins if w["diff_ci_low"] > self.margin] if self.relative else []
        below = value is not None and self.threshold is not None and value < self.threshold
        status, message = self._count(step, value, self._evidence(summary, self.config), below, better)
        stop = status == "bad" and self.bad_count >= self.patience
        if stop:
            self.stopped_step = int(step)
            self.reason = self._stop_reason(step, value, below, better)
            message = "AlignmentEarlyStopping: " + self.reason
        return {"status": status, "value": value, "stop": stop, "message": message,
                "beaten_by": [b["config"] for b in better], "wins": wins}

    def _count(self, step: int, value: float | None, evidence: int | None, below: bool,
               better: list[dict]) -> tuple[str, str]:
        """Classify one diagnostic (``before_min_step``, ``neutral``, ``bad`` or ``good``), update the counters, and
        say why."""
        key = self._key
        if step < self.min_step:
            return "before_min_step", (f"AlignmentEarlyStopping: step {step} < min_step {self.min_step}; not counted "
                                       f"({key}={value}).")
        if value is None or (evidence is not None and evidence < self.min_questions):
            self.neutral_count += 1
            why = ("is undefined (no usable node)" if value is None else
                   f"rests on {evidence} question(s) with a non-degenerate node (< min_questions={self.min_questions})")
            return "neutral", (f"AlignmentEarlyStopping: {key} {why} at step {step}; this diagnostic counts as "
                               f"neither good nor bad (bad streak stays {self.bad_count}/{self.patience}).")
        if below or better:
            self.bad_count += 1
            parts = [f"{key}={value:.4f} < {self.threshold:g}"] if below else []
            parts += [f"{b['config']!r} beats it by {b['diff']:+.3f} (paired CI {_ci(b)} > margin {self.margin:g}; "
                      f"{b['n_questions']} questions)" for b in better]
            return "bad", (f"AlignmentEarlyStopping: bad diagnostic at step {step} ({self.bad_count}/{self.patience} "
                           f"consecutive): " + "; ".join(parts) + ".")
        self.bad_count = 0
        return "good", f"AlignmentEarlyStopping: {key}={value:.4f} at step {step} is not bad; streak reset."

    def _stop_reason(self, step: int, value: float | None, below: bool, better: list[dict]) -> str:
        """Why training stops after ``patience`` consecutive bad diagnostics."""
        why = []
        if below:
            why.append(f"{self._key} stayed below {self.threshold:g} (last value {value:.4f} at step {step})")
        if better:
            why.append("the current configuration was significantly worse than " + ", ".join(
                f"{b['config']!r} (by {b['diff']:+.3f}, CI {_ci(b)})" for b in better))
        return (
            f"{self.bad_count} consecutive bad diagnostics for teacher configuration {self.config!r}: "
            + "; ".join(why) + ". Its distillation direction pushes the student away from success on the probe "
            "set. Stopping training and saving a checkpoint."
        )

    def beaten_by(self, summary: Sequence[dict], report: AlignmentReport | None = None) -> list[str]:
        """Warnings for configurations significantly better than ``config`` (paired CI of ``metric`` above 0, at
        least ``min_questions`` questions behind both); each says how much evidence it rests on."""
        return [self.beaten_message(b) for b in self.better_alternatives(report, margin=0.0)]

    def beaten_message(self, b: dict) -> str:
        """The "beats" warning for one entry of :meth:`better_alternatives`."""
        return (
            f"configuration {b['config']!r} beats {self.config!r} on {self.metric}: paired difference "
            f"{b['diff']:+.3f}, CI {_ci(b)} over {b['n_questions']} questions ({b['n_nodes']} nodes)"
        )

    def __repr__(self) -> str:
        return (
            f"AlignmentEarlyStopping(metric={self.metric!r}, threshold={self.threshold}, patience={self.patience}, "
            f"config={self.config!r}, relative={self.relative}, margin={self.margin}, min_step={self.min_step}, "
            f"bad_count={self.bad_count})"
        )
