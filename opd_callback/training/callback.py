"""``GradientAlignmentCallback``: score the live teacher configuration (and alternatives) during training.

Every ``every_n_steps`` optimizer steps the callback pauses training, runs the core :class:`~opd_callback.AlignmentEngine`
on a fixed probe set with the *current* student weights, and logs how well each teacher configuration's distillation
direction aligns with the ideal per-token gradient of the student's success. The configuration the trainer is actually
using (named ``current``) is derived from the trainer (:mod:`opd_callback.training.trainers`); alternatives are
scored in the same engine pass, on the same rollouts and nodes.

Design:

* **Never hurt the run.** The CPU/CUDA/numpy/Python RNG states, every parameter's ``.grad``, the grad mode, every
  module's ``training`` flag, the tokenizer's padding/truncation side, gradient checkpointing and ``config.use_cache``
  are saved before and restored after. The engine samples with its own generators seeded by ``(seed, prompt index)``.
  A failure is logged with its traceback and counted (``opd/errors``); ``on_error="raise"`` re-raises.
* **Scalars through the trainer's own logging.** After a diagnostic at step ``s`` the ``opd/...`` scalars are sent as
  one log row through the trainer's callback handler exactly as ``Trainer.log`` does (appended to
  ``state.log_history``, then ``on_log`` to every callback), so every ``report_to`` integration records them at ``s``
  (wandb shows them as ``train/opd/...``). ``trainer.log()`` is not called (TRL flushes its metric buffers there),
  and the trainer's own log rows are untouched.
* **wandb panels** (histograms, a per-token table, an HTML heatmap) go straight to the active run on the main process,
  each row stamped ``"train/global_step": step`` and never ``step=``.
* **Several processes.** Probe prompts are strided over ranks by global index; records are gathered with
  ``gather_object``; the main process saves and logs, then broadcasts the metrics and the early-stopping decision so
  every rank takes the same one. The engine seeds each prompt by its global index, so 1 and N processes produce the
  same records. FSDP and DeepSpeed ZeRO-3 (sharded parameters) are refused at ``on_train_begin``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from opd_callback.core.settings import RolloutSettings, TeacherConfig, check_value
from opd_callback.core.engine import AlignmentEngine
from opd_callback.training.trainers import CURRENT, TrainerSpec, describe_trainer, unwrap
from opd_callback.report import AlignmentReport
from opd_callback.rollout import preserved_rng

__all__ = [
    "GradientAlignmentCallback",
    "AlignmentEarlyStopping",
    "DiagnosticError",
    "estimate_continuations",
    "preserved_training_state",
]

logger = logging.getLogger(__name__)

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
_COUNTERS = ("rollouts", "nodes", "continuations", "tokens", "seconds")


class DiagnosticError(RuntimeError):
    """A diagnostic failed (raised only with ``on_error="raise"``)."""


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ====================================================================================================================
# early stopping


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
            raise ValueError(f"AlignmentEarlyStopping: metric must be one of {sorted(EARLY_STOPPING_METRICS)}, got {metric!r}")
        owner = "AlignmentEarlyStopping"  # types checked, not coerced
        threshold = check_value(owner, "threshold", threshold, Optional[float])
        patience = check_value(owner, "patience", patience, int)
        min_step = check_value(owner, "min_step", min_step, int)
        warn_if_beaten = check_value(owner, "warn_if_beaten", warn_if_beaten, bool)
        relative = check_value(owner, "relative", relative, bool)
        margin = check_value(owner, "margin", margin, float)
        min_questions = check_value(owner, "min_questions", min_questions, int)
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

    # ---------------------------------------------------------------------------------------------- ExportableState
    def state(self) -> dict:
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
    def metric_value(self, summary: Sequence[dict]) -> float | None:
        """The watched metric from :meth:`AlignmentReport.config_summary` rows (``None`` when undefined)."""
        row = next((r for r in summary if r.get("config") == self.config), None)
        if row is None:
            return None
        if self.metric == "teacher_advantage" and _finite(row.get("alignment_mean")) is None:
            return None  # no non-degenerate node at all
        return _finite(row.get(EARLY_STOPPING_METRICS[self.metric]))

    def _evidence(self, summary: Sequence[dict], config: str) -> int | None:
        """Questions with a non-degenerate node behind ``config``'s numbers (None when the summary does not say)."""
        row = next((r for r in summary if r.get("config") == config), None) or {}
        n = row.get("n_questions_valid")
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
            lo = _finite(r["diff_ci_low"])
            if r["config"] == self.config or lo is None or lo <= margin:
                continue
            n_q = min(mine, self._evidence(summary, r["config"]) or 0)
            if n_q < self.min_questions:
                continue
            row = next(x for x in summary if x["config"] == r["config"])
            out.append({"config": r["config"], "diff": float(r["diff"]), "diff_ci_low": lo,
                        "diff_ci_high": _finite(r["diff_ci_high"]), "n_questions": n_q,
                        "n_nodes": int(row.get("n_nodes", 0))})
        return out

    def update(self, step: int, summary: Sequence[dict], report: AlignmentReport | None = None) -> dict:
        """Count one diagnostic (``report`` enables the relative rule); returns ``{"status", "value", "stop",
        "message", "beaten_by", "wins"}`` (``wins``: :meth:`better_alternatives` at margin 0, for the warnings)."""
        value = self.metric_value(summary)
        key = f"opd/{self.config}/{self.metric}"
        self.diagnostics += 1
        self.last_step = int(step)
        stop = False
        evidence = self._evidence(summary, self.config)
        # every significant win over the watched configuration (for the "beats" warnings); the relative rule keeps
        # those above the margin
        wins = self.better_alternatives(report, 0.0, summary) if self.relative or self.warn_if_beaten else []
        better = [w for w in wins if w["diff_ci_low"] > self.margin] if self.relative else []
        below = value is not None and self.threshold is not None and value < self.threshold
        if step < self.min_step:
            status = "before_min_step"
            message = f"AlignmentEarlyStopping: step {step} < min_step {self.min_step}; not counted ({key}={value})."
        elif value is None or (evidence is not None and evidence < self.min_questions):
            status = "neutral"
            self.neutral_count += 1
            why = ("is undefined (no usable node)" if value is None else
                   f"rests on {evidence} question(s) with a non-degenerate node (< min_questions={self.min_questions})")
            message = (
                f"AlignmentEarlyStopping: {key} {why} at step {step}; this diagnostic counts as neither good nor bad "
                f"(bad streak stays {self.bad_count}/{self.patience})."
            )
        elif below or better:
            status = "bad"
            self.bad_count += 1
            parts = []
            if below:
                parts.append(f"{key}={value:.4f} < {self.threshold:g}")
            for b in better:
                parts.append(f"{b['config']!r} beats it by {b['diff']:+.3f} (paired CI [{b['diff_ci_low']:+.3f}, "
                             f"{b['diff_ci_high']:+.3f}] > margin {self.margin:g}; {b['n_questions']} questions)")
            message = (f"AlignmentEarlyStopping: bad diagnostic at step {step} ({self.bad_count}/{self.patience} "
                       f"consecutive): " + "; ".join(parts) + ".")
        else:
            status = "good"
            self.bad_count = 0
            message = f"AlignmentEarlyStopping: {key}={value:.4f} at step {step} is not bad; streak reset."
        if status == "bad" and self.bad_count >= self.patience:
            stop = True
            self.stopped_step = int(step)
            why = []
            if below:
                why.append(f"{key} stayed below {self.threshold:g} (last value {value:.4f} at step {step})")
            if better:
                why.append("the current configuration was significantly worse than " + ", ".join(
                    f"{b['config']!r} (by {b['diff']:+.3f}, CI [{b['diff_ci_low']:+.3f}, {b['diff_ci_high']:+.3f}])"
                    for b in better))
            self.reason = (
                f"{self.bad_count} consecutive bad diagnostics for teacher configuration {self.config!r}: "
                + "; ".join(why) + ". Its distillation direction pushes the student away from success on the probe "
                "set. Stopping training and saving a checkpoint."
            )
            message = "AlignmentEarlyStopping: " + self.reason
        return {"status": status, "value": value, "stop": stop, "message": message,
                "beaten_by": [b["config"] for b in better], "wins": wins}

    def beaten_by(self, summary: Sequence[dict], report: AlignmentReport | None = None) -> list[str]:
        """Warnings for configurations significantly better than ``config`` (paired CI of ``metric`` above 0, at
        least ``min_questions`` questions behind both); each says how much evidence it rests on."""
        return [self.beaten_message(b) for b in self.better_alternatives(report, margin=0.0)]

    def beaten_message(self, b: dict) -> str:
        """The "beats" warning for one entry of :meth:`better_alternatives`."""
        return (
            f"configuration {b['config']!r} beats {self.config!r} on {self.metric}: paired difference "
            f"{b['diff']:+.3f}, CI [{b['diff_ci_low']:+.3f}, {b['diff_ci_high']:+.3f}] over {b['n_questions']} "
            f"questions ({b['n_nodes']} nodes)"
        )

    def __repr__(self) -> str:
        return (
            f"AlignmentEarlyStopping(metric={self.metric!r}, threshold={self.threshold}, patience={self.patience}, "
            f"config={self.config!r}, relative={self.relative}, margin={self.margin}, min_step={self.min_step}, "
            f"bad_count={self.bad_count})"
        )


# ====================================================================================================================
# state preservation


def _is_checkpointing(model: torch.nn.Module) -> bool | None:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            try:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return bool(getattr(model, attr))
            except Exception:  # noqa: BLE001
                continue
    return None


@contextlib.contextmanager
def preserved_training_state(
    model: torch.nn.Module,
    tokenizer: Any = None,
    other_models: Sequence[torch.nn.Module] = (),
    checkpointing_kwargs: dict | None = None,
) -> Iterator[None]:
    """Run a block and restore afterwards everything it could disturb: the CPU, CUDA, numpy and Python RNG states;
    every module's ``training`` flag (student and ``other_models``); the tokenizer's ``padding_side`` /
    ``truncation_side``; gradient checkpointing; ``config.use_cache``; the grad mode; and every parameter's ``.grad``
    (the same tensor object is put back if it was replaced; an in-place change is reported as an error, since the
    engine only uses ``torch.no_grad`` sampling and ``torch.autograd.grad``)."""
    grad_mode = torch.is_grad_enabled()
    modes: list[tuple[torch.nn.Module, bool]] = []
    seen: set[int] = set()
    for m in [model, *other_models]:
        if m is None:
            continue
        for sub in m.modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                modes.append((sub, sub.training))
    grads = [(p, p.grad, None if p.grad is None else p.grad._version) for p in model.parameters()]
    pad_side = getattr(tokenizer, "padding_side", None)
    trunc_side = getattr(tokenizer, "truncation_side", None)
    ckpt = _is_checkpointing(model)
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None) if cfg is not None else None
    try:
        with preserved_rng():
            yield
    finally:
        torch.set_grad_enabled(grad_mode)
        for sub, was in modes:
            if sub.training != was:
                sub.training = was
        changed = 0
        for p, g, version in grads:
            if p.grad is not g:
                p.grad = g
            elif g is not None and g._version != version:
                changed += 1
        if changed:
            logger.error("GradientAlignmentCallback: %d parameter gradients were modified in place by the diagnostic", changed)
        if tokenizer is not None:
            if pad_side is not None and getattr(tokenizer, "padding_side", None) != pad_side:
                tokenizer.padding_side = pad_side
            if trunc_side is not None and getattr(tokenizer, "truncation_side", None) != trunc_side:
                tokenizer.truncation_side = trunc_side
        if ckpt is not None and _is_checkpointing(model) != ckpt:
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
            else:
                model.gradient_checkpointing_disable()
        if cfg is not None and use_cache is not None and getattr(cfg, "use_cache", None) != use_cache:
            cfg.use_cache = use_cache


def estimate_continuations(settings: RolloutSettings, n_prompts: int, n_configs: int) -> int:
    """Upper bound on the continuations one diagnostic samples:
    ``prompts x num_rollouts x nodes_per_rollout x |C| x rollouts_per_branch`` with
    ``|C| <= top_k + n_configs x teacher_top_k + 1`` and nodes per rollout bounded by the node selection."""
    T = settings.max_new_tokens
    if settings.node_selection == "all":
        nodes = T
    elif settings.node_selection == "positions":
        nodes = len([p for p in settings.positions or [] if p < T])
    elif settings.node_selection == "entropy":
        nodes = min(settings.max_nodes_per_rollout, T)
    else:
        windows = 1 + max(0, (T - 1).bit_length()) if T > 0 else 0
        nodes = min(settings.max_nodes_per_rollout, windows * settings.nodes_per_window, T)
    cands = settings.top_k + n_configs * settings.teacher_top_k + 1
    return int(n_prompts * settings.num_rollouts * nodes * cands * settings.rollouts_per_branch)


# ====================================================================================================================
# the callback


def _as_rows(data: Any, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of a list of dicts / ``datasets.Dataset`` / iterable; a fixed random sample of ``limit`` when given."""
    if data is None:
        return []
    if isinstance(data, dict):
        raise TypeError("probe_dataset must be a list of dicts or a datasets.Dataset, not a dict")
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        n = len(data)
        if limit is not None and n > limit:
            idx = sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=limit, replace=False))
        else:
            idx = list(range(n))
        return [dict(data[i]) for i in idx]
    rows = []
    for r in data:
        rows.append(dict(r))
        if limit is not None and len(rows) >= limit:
            break
    return rows


class GradientAlignmentCallback(TrainerCallback):
    """Pause on-policy distillation every ``every_n_steps`` steps and score teacher configurations.

    Args:
        trainer: the trainer (``trl.DistillationTrainer``, ``trl.experimental.gkd.GKDTrainer``,
            ``trl.experimental.sdft.SDFTTrainer``, or any ``transformers.Trainer`` with explicit ``configs``). The
            current teacher configuration is derived from it. Add the callback with ``trainer.add_callback(cb)``.
        reward_fn: the verifier, TRL signature ``reward_fn(prompts, completions, **columns) -> list[float]``.
        probe_dataset: the fixed probe prompts (list of dicts or ``datasets.Dataset`` with ``prompt`` and the columns
            the reward and templates use). Default: a fixed random sample of ``probe_size`` rows of
            ``trainer.train_dataset`` (seeded by ``settings.seed``).
        every_n_steps: ``None`` (default): a **time budget** — the first diagnostic runs at step ``first_step``, and each
            later one is scheduled so that the diagnostics' total wall time stays within ``max_overhead`` of the
            training's wall time (measured: seconds per training step and per diagnostic). An int: a fixed cadence,
            diagnose when ``global_step % every_n_steps == 0``.
        max_overhead: the budget of the default schedule (0.1 = diagnostics take at most ~10% of training time). It
            holds over the whole run, the end-of-run diagnostic included; only a run's first diagnostic may exceed it
            (every run gets one).
        first_step: step of the first diagnostic under the default schedule.
        configs: alternative :class:`~opd_callback.TeacherConfig` s scored side by side with ``current``.
        settings: :class:`~opd_callback.RolloutSettings`. Default: ``RolloutSettings(node_selection="entropy")``
            (nodes at each rollout's highest-entropy positions, the student's forking tokens) with the trainer's
            sampling temperature and completion length.
        early_stopping: an :class:`AlignmentEarlyStopping`.
        include_current: score the trainer's own configuration as ``current`` (refused with a message where it
            cannot be derived faithfully, e.g. SDPO; plain ``Trainer`` s have none and need ``configs``).
        run_at_start: also diagnose before the first step (step 0; on resume, at the resume step if not done yet).
        run_at_end: also diagnose after the last step (if that step was not already diagnosed). Under the time budget
            it runs when it fits the budget, and always when no diagnostic ran before: with the default
            ``run_at_end=True`` every run gets at least one diagnostic. When no scheduled diagnostic falls inside the
            run, ``on_train_begin`` says so at warning level.
        on_error: ``"warn"`` (log the traceback, count ``opd/errors``, continue training) or ``"raise"``.
        max_heatmap_rollouts: rollouts shown in the wandb HTML heatmap (0 disables it).
        output_subdir: records go to ``<output_dir>/<output_subdir>/step-XXXXXXX/`` (``None`` disables saving).
        probe_size: size of the default probe sample.
        heatmap_config: configuration colouring the heatmap (default ``current``, else the first).
        save_records: write per-token records (parquet) of every diagnostic on the main process.
        backend: the student's rollout engine: ``None``/``"transformers"`` (default) or ``"vllm"``: the trainer's own
            vLLM engine when TRL runs one in colocate mode (synced to the current weights first), else one engine
            started once and loaded with the student's current weights before each diagnostic (docs/backends.md).
        vllm_options: ``backend="vllm"``: :class:`~opd_callback.rollout.vllm_backend.VLLMOptions` (or a dict of its fields) of
            the engine the callback starts.
    """

    def __init__(
        self,
        trainer: Any,
        reward_fn: Callable[..., Sequence[float]],
        probe_dataset: Any = None,
        every_n_steps: int | None = None,
        configs: Sequence[TeacherConfig] = (),
        settings: RolloutSettings | None = None,
        early_stopping: AlignmentEarlyStopping | None = None,
        include_current: bool = True,
        run_at_start: bool = False,
        run_at_end: bool = True,
        on_error: str = "warn",
        max_heatmap_rollouts: int = 4,
        output_subdir: str | None = "opd_alignment",
        probe_size: int = 8,
        heatmap_config: str | None = None,
        save_records: bool = True,
        max_overhead: float = 0.1,
        first_step: int = 50,
        backend: Any = None,
        vllm_options: Any = None,
    ) -> None:
        if trainer is None or not hasattr(trainer, "callback_handler"):
            raise TypeError(
                "GradientAlignmentCallback needs the trainer as its first argument (a callback never receives it): "
                "cb = GradientAlignmentCallback(trainer, reward_fn=...); trainer.add_callback(cb)"
            )
        if not callable(reward_fn):
            raise TypeError("reward_fn must be callable: reward_fn(prompts, completions, **columns) -> list[float]")
        owner = "GradientAlignmentCallback"  # types checked, not coerced (issue 12)
        every_n_steps = check_value(owner, "every_n_steps", every_n_steps, int | None)
        max_overhead = check_value(owner, "max_overhead", max_overhead, float)
        first_step = check_value(owner, "first_step", first_step, int)
        probe_size = check_value(owner, "probe_size", probe_size, int)
        max_heatmap_rollouts = check_value(owner, "max_heatmap_rollouts", max_heatmap_rollouts, int)
        for flag, value in (("include_current", include_current), ("run_at_start", run_at_start),
                            ("run_at_end", run_at_end), ("save_records", save_records)):
            check_value(owner, flag, value, bool)
        check_value(owner, "output_subdir", output_subdir, str | None)
        check_value(owner, "heatmap_config", heatmap_config, str | None)
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an int >= 1 or None (time budget), got {every_n_steps!r}")
        if not (isinstance(max_overhead, (int, float)) and 0 < max_overhead):
            raise ValueError(f"max_overhead must be > 0 (e.g. 0.1 for 10%), got {max_overhead!r}")
        if not isinstance(first_step, int) or first_step < 1:
            raise ValueError(f"first_step must be an int >= 1, got {first_step!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size must be an int >= 1, got {probe_size!r}")
        if early_stopping is not None and not isinstance(early_stopping, AlignmentEarlyStopping):
            raise TypeError("early_stopping must be an AlignmentEarlyStopping")
        configs = list(configs or [])
        for c in configs:
            if not isinstance(c, TeacherConfig):
                raise TypeError(f"configs must be TeacherConfig objects, got {type(c).__name__}")
        self.trainer = trainer
        self.reward_fn = reward_fn
        self.every_n_steps = every_n_steps
        self.max_overhead = float(max_overhead)
        self.first_step = first_step
        # time-budget schedule (every_n_steps=None); decided on the main process, broadcast with each diagnostic
        self._next_step: int = first_step
        self._prev_diag_step: int = 0
        self._t_mark: float | None = None
        self._step_mark: int = 0
        self._train_seconds = 0.0
        self._train_steps = 0
        self._diag_seconds = 0.0
        self.alternatives = configs
        self.include_current = bool(include_current)
        self.run_at_start = bool(run_at_start)
        self.run_at_end = bool(run_at_end)
        self.on_error = on_error
        self.max_heatmap_rollouts = int(max_heatmap_rollouts)
        self.output_subdir = output_subdir
        self.save_records = bool(save_records) and output_subdir is not None
        self.probe_size = probe_size

        self.spec: TrainerSpec = describe_trainer(trainer)
        self._check_current(configs)
        if settings is None:
            # nodes at the student's forking tokens: where a teacher's push decides the outcome (on five toy labs the
            # verdicts separate good from bad teachers with far fewer nodes than depth windows; method.md)
            kw: dict[str, Any] = {"node_selection": "entropy"}
            if self.spec.sampling_temperature:
                kw["temperature"] = float(self.spec.sampling_temperature)
            if self.spec.max_new_tokens:
                kw["max_new_tokens"] = int(self.spec.max_new_tokens)
            settings = RolloutSettings(**kw)
        if not isinstance(settings, RolloutSettings):
            raise TypeError("settings must be a RolloutSettings")
        samp = self.spec.sampling_temperature
        if samp is not None and float(samp) != float(settings.temperature):
            self.spec.notes.append(
                f"{self.spec.trainer_name} samples at temperature {samp:g} but settings.temperature is "
                f"{settings.temperature:g}: the diagnostic measures the success gradient of the student sampled at "
                f"{settings.temperature:g}."
            )
        self.settings = settings
        names = self.config_names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"configuration names must be unique; repeated: {dup}")
        self.heatmap_config = heatmap_config or names[0]
        if self.heatmap_config not in names:
            raise ValueError(f"heatmap_config {self.heatmap_config!r} is not one of the configurations {names}")

        # the probe set: fixed for the whole run
        if probe_dataset is None:
            rows = _as_rows(getattr(trainer, "train_dataset", None), limit=probe_size, seed=settings.seed)
            source = f"a fixed sample of {len(rows)} rows of trainer.train_dataset"
        else:
            rows = _as_rows(probe_dataset)
            source = f"probe_dataset ({len(rows)} rows)"
        if not rows:
            raise ValueError(
                "the probe set is empty: pass probe_dataset=[{'prompt': ..., <reward columns>}, ...] or give the "
                "trainer a non-empty train_dataset"
            )
        if self.spec.prepare_example is not None:
            rows = [self.spec.prepare_example(r) for r in rows]
        missing = [i for i, r in enumerate(rows) if "prompt" not in r]
        if missing:
            raise ValueError(
                f"probe row {missing[0]} (from {source}) has no 'prompt' field (its fields: {sorted(rows[missing[0]])}); "
                "pass probe_dataset=[{'prompt': ..., <reward columns>}, ...]"
            )
        self.probe_rows = rows
        self.probe_source = source

        self.early_stopping = early_stopping
        if early_stopping is not None:
            if early_stopping.config not in names:
                raise ValueError(
                    f"AlignmentEarlyStopping watches configuration {early_stopping.config!r}, which is not scored "
                    f"(configurations: {names})"
                    + (". The trainer has no derivable 'current' configuration." if early_stopping.config == CURRENT else "")
                )
            if early_stopping not in trainer.callback_handler.callbacks:
                trainer.add_callback(early_stopping)  # so that its counters are saved in checkpoints

        # issue 9: backend="vllm" (opd_callback/rollout/vllm_backend.py)
        self._rollouts = None
        if backend not in (None, "transformers"):
            if backend != "vllm":
                raise ValueError(f"backend must be None, 'transformers' or 'vllm', got {backend!r}")
            from opd_callback.rollout.vllm_backend import VLLMBackendProvider

            self._rollouts = VLLMBackendProvider(trainer, vllm_options)

        self.errors = 0
        self.history: list[dict] = []  # {"step", "metrics"} per successful diagnostic (main process)
        self.last_report: AlignmentReport | None = None
        self._last_step: int | None = None
        self._diagnostics_run = 0  # attempted in this process's run (failed ones included)
        self._beaten_warned: set[str] = set()  # configurations already reported (at WARNING) as beating the watched one
        self._panels = None
        self._validated = False

    # ------------------------------------------------------------------------------------------------ configuration
    def _check_current(self, configs: list[TeacherConfig]) -> None:
        spec = self.spec
        if any(c.name == CURRENT for c in configs):
            raise ValueError(
                f"the name {CURRENT!r} is reserved for the trainer's own configuration; rename that TeacherConfig"
            )
        if not self.include_current:
            if not configs:
                raise ValueError("include_current=False and no configs: there is nothing to score")
            return
        if spec.kind == "refused":
            raise ValueError(
                f"GradientAlignmentCallback cannot derive the current teacher configuration of {spec.trainer_name}: "
                f"{spec.refusal} Pass include_current=False and describe the teachers to score with "
                "configs=[TeacherConfig(...)]."
            )
        if spec.current is None and not configs:
            raise ValueError(
                f"{spec.trainer_name} has no teacher the callback can derive (supported: trl.DistillationTrainer, "
                "trl.experimental.gkd.GKDTrainer, trl.experimental.sdft.SDFTTrainer). Pass the teacher "
                "configurations to score with configs=[TeacherConfig(...)]."
            )

    def current_configs(self) -> list[TeacherConfig]:
        """The configurations scored now: ``current`` (re-derived from the trainer) first, then the alternatives."""
        out: list[TeacherConfig] = []
        if self.include_current:
            spec = describe_trainer(self.trainer)
            if spec.current is not None:
                out.append(spec.current)
        return out + list(self.alternatives)

    @property
    def config_names(self) -> list[str]:
        head = [CURRENT] if self.include_current and self.spec.current is not None else []
        return head + [c.name for c in self.alternatives]

    # ------------------------------------------------------------------------------------------------ plumbing
    @property
    def accelerator(self):
        return getattr(self.trainer, "accelerator", None)

    @property
    def world(self) -> tuple[int, int, bool]:
        acc = self.accelerator
        if acc is None:
            return 1, 0, True
        return int(acc.num_processes), int(acc.process_index), bool(acc.is_main_process)

    def student(self) -> torch.nn.Module:
        return unwrap(self.trainer, self.trainer.model)

    def tokenizer(self) -> Any:
        tok = getattr(self.trainer, "processing_class", None) or getattr(self.trainer, "tokenizer", None)
        inner = getattr(tok, "tokenizer", None)
        if inner is not None and not hasattr(tok, "get_vocab"):
            tok = inner  # a multimodal processor: use its text tokenizer
        if tok is None:
            raise ValueError("the trainer has no processing_class (tokenizer); the diagnostic needs one")
        return tok

    def build_engine(self) -> AlignmentEngine:
        """An engine over the unwrapped student and the current configurations."""
        engine = AlignmentEngine(self.student(), self.tokenizer(), self.current_configs(), self.reward_fn, self.settings)
        if self._rollouts is not None:  # vLLM: synced to the current weights now
            engine.backend = self._rollouts.backend(
                engine.student, eos_ids=engine.eos_ids, pad_id=engine.pad_id, temperature=self.settings.temperature,
                batch_size=self.settings.batch_size,
            )
        return engine

    def _check_distributed(self) -> None:
        t = self.trainer
        if getattr(t, "is_fsdp_enabled", False):
            raise ValueError(
                "GradientAlignmentCallback does not support FSDP: the student's parameters are sharded, and the "
                "diagnostic would need every rank to gather them and generate in lockstep. Use DDP or DeepSpeed "
                "ZeRO-1/2, or run oc.diagnose on a saved checkpoint."
            )
        if getattr(t, "is_deepspeed_enabled", False):
            plugin = getattr(getattr(self.accelerator, "state", None), "deepspeed_plugin", None)
            stage = getattr(plugin, "zero_stage", None)
            if stage is None or int(stage) >= 3:
                raise ValueError(
                    "GradientAlignmentCallback does not support DeepSpeed ZeRO-3 (parameters are partitioned across "
                    "ranks and generation would have to run in lockstep). Use ZeRO-1/2 or DDP, or run oc.diagnose on "
                    "a saved checkpoint."
                )

    def _records_dir(self, args: Any) -> Path | None:
        if not self.save_records:
            return None
        return Path(args.output_dir) / str(self.output_subdir)

    def _resolve_stopper(self, state: Any) -> None:
        es = self.early_stopping
        if es is None:
            return
        live = [cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, AlignmentEarlyStopping)]
        if not any(cb is es for cb in live):
            # transformers re-created it from its checkpointed args (restore_callback_states_from_checkpoint=True)
            same = [cb for cb in live if cb.state()["args"] == es.state()["args"]]
            if same:
                self.early_stopping = es = same[0]
        es.restore_from(state)

    # ------------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        self._check_distributed()
        self._resolve_stopper(state)
        world, rank, main = self.world
        engine = self.build_engine()  # validates vocabularies, EOS, configs
        with preserved_training_state(self.student(), self.tokenizer()):
            prepared = engine.prepare(self.probe_rows)  # validates prompts and template fields on every rank
            try:
                engine.score(prepared[0], [[]])
            except Exception as exc:
                raise ValueError(
                    f"the reward function failed on a probe prompt (called with an empty completion to check its "
                    f"signature before training): {exc}"
                ) from exc
        self._validated = True
        if main:
            cost = estimate_continuations(self.settings, len(self.probe_rows), len(self.config_names))
            desc = f"; current = {self.spec.description}" if CURRENT in self.config_names else ""
            logger.info(
                "GradientAlignmentCallback on %s: configurations %s%s; probe: %s; every %s steps; at most ~%d "
                "continuations per diagnostic (%s).",
                self.spec.trainer_name,
                self.config_names,
                desc,
                self.probe_source,
                self.every_n_steps if self.every_n_steps else f"auto (<= {self.max_overhead:.0%} of training time)",
                cost,
                "split over %d processes" % world if world > 1 else "one process",
            )
            for note in self.spec.notes:
                logger.warning("GradientAlignmentCallback: %s", note)
            self._warn_if_schedule_is_empty(state)
            d = self._records_dir(args)
            if d is not None and state.global_step == 0 and d.is_dir() and any(d.glob("step-*")):
                logger.warning(
                    "GradientAlignmentCallback: %s already holds records of an earlier run; AlignmentReport.load "
                    "will read them together with this run's (steps are overwritten as they are diagnosed).",
                    d,
                )
        self._t_mark, self._step_mark = time.perf_counter(), state.global_step
        if self.every_n_steps is None and state.global_step >= self._next_step:  # resumed past the first step
            self._next_step = state.global_step + self.first_step
        if self.run_at_start and not self._already_saved(args, state.global_step):
            self._diagnose(args, state, control)
        return control

    def _warn_if_schedule_is_empty(self, state: Any) -> None:
        """Warn when no scheduled diagnostic falls inside the run (only the end-of-run one, or none, will run)."""
        max_steps = int(getattr(state, "max_steps", 0) or 0)
        if self.run_at_start or max_steps <= 0:
            return
        start = int(state.global_step)
        if self.every_n_steps is not None:
            first = (start // self.every_n_steps + 1) * self.every_n_steps
            what = f"every_n_steps={self.every_n_steps}"
        else:
            first = self._next_step
            what = f"the time-budget schedule (first_step={self.first_step})"
        if first <= max_steps:
            return
        if self.run_at_end:
            logger.warning(
                "GradientAlignmentCallback: with %s no scheduled diagnostic falls within this run (max_steps=%d); the "
                "only diagnostic will be the end-of-run one at step %d. Pass a smaller first_step / every_n_steps, "
                "or run_at_start=True, for more.", what, max_steps, max_steps,
            )
        else:
            logger.warning(
                "GradientAlignmentCallback: with %s and run_at_end=False NO diagnostic will run in this run "
                "(max_steps=%d). Pass run_at_end=True (the default), run_at_start=True, or a smaller first_step / "
                "every_n_steps.", what, max_steps,
            )

    def _already_saved(self, args: Any, step: int) -> bool:
        """On resume: were this step's records written before? (The main process decides, for every rank.)"""
        d = self._records_dir(args)
        found = [bool(step > 0 and d is not None and (d / f"step-{step:07d}" / "records.parquet").exists())]
        if self.world[0] > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(found, from_process=0)
        return found[0]

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        last = bool(control.should_training_stop) or (state.max_steps > 0 and step >= state.max_steps)
        if self.every_n_steps is not None:
            due = step % self.every_n_steps == 0 or (self.run_at_end and last)
        else:
            # time budget; the end-of-run diagnostic respects it too, unless no diagnostic has run yet
            due = step >= self._next_step or (self.run_at_end and last and self._diagnostics_run == 0)
        if due and step != self._last_step:
            self._diagnose(args, state, control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # Training stopped at a step we did not diagnose (e.g. another callback stopped it after our on_step_end).
        if self.run_at_end and self._last_step != state.global_step and self._validated:
            over_budget = self.every_n_steps is None and state.global_step < self._next_step
            if over_budget and self._diagnostics_run > 0:
                return control
            self._diagnose(args, state, control)
        return control

    # ------------------------------------------------------------------------------------------------ the diagnostic
    def run_diagnostic(self, args: Any = None, state: Any = None, control: Any = None) -> AlignmentReport | None:
        """Run one diagnostic now with the trainer's current state (also usable outside training). Returns the
        merged report (on every rank), or ``None`` when it failed with ``on_error="warn"``."""
        t = self.trainer
        return self._diagnose(args or t.args, state or t.state, control or t.control)

    def _schedule(self, step: int, t0: float) -> int:
        """Main process: the step of the next diagnostic under the time budget (after the one that started at t0)."""
        now = time.perf_counter()
        if self._t_mark is not None:
            self._train_seconds += max(t0 - self._t_mark, 0.0)
            self._train_steps += max(step - self._step_mark, 0)
        diag = now - t0
        self._diag_seconds += diag
        if self._train_steps == 0 or self._train_seconds <= 0:
            return step + self.first_step
        per_step = self._train_seconds / self._train_steps
        # next diagnostic once (diagnostics so far + one more) <= max_overhead * training time
        need = (self._diag_seconds + diag) / self.max_overhead - self._train_seconds
        return step + max(1, math.ceil(need / per_step))

    def _diagnose(self, args: Any, state: Any, control: Any) -> AlignmentReport | None:
        step = int(state.global_step)
        self._last_step = step
        self._diagnostics_run += 1
        world, rank, main = self.world
        t0 = time.perf_counter()
        try:
            return self._diagnose_inner(args, state, control, step, world, rank, main, t0)
        finally:
            self._after_diagnostic(step, t0, world, main)

    def _after_diagnostic(self, step: int, t0: float, world: int, main: bool) -> None:
        box = [self._schedule(step, t0) if main else None]
        if world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box, from_process=0)
        self._prev_diag_step, self._next_step = step, int(box[0])
        self._t_mark, self._step_mark = time.perf_counter(), step
        if main and self.every_n_steps is None:
            logger.info(
                "GradientAlignmentCallback: next diagnostic at step %d (diagnostics %.1fs so far vs training %.1fs; "
                "budget %.0f%%)",
                self._next_step,
                self._diag_seconds,
                self._train_seconds,
                100 * self.max_overhead,
            )

    def _diagnose_inner(self, args, state, control, step, world, rank, main, t0) -> AlignmentReport | None:
        mine = [i for i in range(len(self.probe_rows)) if i % world == rank]
        local_error = None
        payload: dict | None = None
        local_meta: dict = {}
        student = self.student()
        tok = self.tokenizer()
        try:
            configs = self.current_configs()
            others = [c.teacher.model for c in configs if c.teacher.model is not None]
        except Exception:  # noqa: BLE001
            others = []
        with preserved_training_state(
            student, tok, others, getattr(args, "gradient_checkpointing_kwargs", None)
        ):
            try:
                engine = self.build_engine()
                payload = {"records": [], "rollouts": [], "meta": {}}
                if mine:
                    rep = engine.run([self.probe_rows[i] for i in mine], indices=mine)
                    local_meta = rep.meta  # settings and configurations: kept here, not pickled across ranks
                    payload = {
                        "records": rep.records.to_dict("records"),
                        "rollouts": rep.rollouts.to_dict("records"),
                        "meta": {k: v for k, v in rep.meta.items() if k in _COUNTERS},
                    }
            except Exception:  # noqa: BLE001 - reported below, training continues unless on_error="raise"
                local_error = traceback.format_exc()
                logger.error(
                    "GradientAlignmentCallback: the diagnostic at step %d failed on process %d:\n%s", step, rank, local_error
                )
        gathered = [(rank, local_error, payload)]
        if world > 1:
            from accelerate.utils import gather_object

            gathered = gather_object(gathered)
        failed = [(r, e) for r, e, _ in gathered if e]
        if failed:
            return self._failed(args, state, control, failed)

        report = self._merge([p for _, _, p in gathered], step, local_meta)
        outcome: dict[str, Any] = {"metrics": {}, "stop": False, "error": None, "stopper": None}
        if main:
            try:
                outcome = self._postprocess(report, args, state, step, t0)
            except Exception:  # noqa: BLE001
                outcome["error"] = traceback.format_exc()
                logger.error(
                    "GradientAlignmentCallback: processing the diagnostic at step %d failed:\n%s", step, outcome["error"]
                )
        if world > 1:
            from accelerate.utils import broadcast_object_list

            box = [outcome]
            broadcast_object_list(box, from_process=0)
            outcome = box[0]
        if outcome.get("error"):
            return self._failed(args, state, control, [(0, outcome["error"])])
        if self.early_stopping is not None and outcome.get("stopper") is not None:
            for k, v in outcome["stopper"].items():
                setattr(self.early_stopping, k, v)
        self._emit(args, state, control, {**outcome["metrics"], "opd/errors": float(self.errors)})
        if outcome.get("stop"):
            control.should_training_stop = True
            control.should_save = True
        self.last_report = report
        return report

    def _failed(self, args: Any, state: Any, control: Any, failed: list):
        step = int(state.global_step)
        self.errors += 1
        self._emit(args, state, control, {"opd/errors": float(self.errors)})
        where = ", ".join(f"process {r}" for r, _ in failed)
        if self.on_error == "raise":
            raise DiagnosticError(
                f"GradientAlignmentCallback: the diagnostic at step {step} failed on {where}:\n{failed[0][1]}"
            )
        _, _, main = self.world
        if main:
            logger.warning(
                "GradientAlignmentCallback: diagnostic at step %d failed on %s (%d failures so far); training "
                "continues (on_error='warn').",
                step,
                where,
                self.errors,
            )
        return None

    def _merge(self, payloads: list[dict | None], step: int, local_meta: dict) -> AlignmentReport:
        records: list[dict] = []
        rollouts: list[dict] = []
        meta = {k: v for k, v in local_meta.items() if k not in _COUNTERS}
        for k in _COUNTERS:
            meta[k] = 0
        for p in payloads:
            if not p:
                continue
            records.extend(p["records"])
            rollouts.extend(p["rollouts"])
            for k, v in (p.get("meta") or {}).items():
                if isinstance(v, (int, float)):
                    meta[k] = max(meta[k], v) if k == "seconds" else meta[k] + v
        # same order as one process: by prompt, keeping the engine's order inside a prompt (stable sort)
        records.sort(key=lambda r: int(r["prompt_index"]))
        rollouts.sort(key=lambda r: (int(r["prompt_index"]), int(r["rollout_index"])))
        for r in records:
            r["step"] = step
        for r in rollouts:
            r["step"] = step
        meta.update({"step": step, "trainer": self.spec.trainer_name, "current": self.spec.description or None})
        return AlignmentReport(records, rollouts, meta)

    def scalars(self, report: AlignmentReport, seconds: float,
                summary: Sequence[dict] | None = None) -> dict[str, float]:
        """The ``opd/...`` scalars of one diagnostic (undefined values are left out); ``summary``: the report's
        ``config_summary()`` when the caller has it already."""
        out: dict[str, float] = {}

        def put(key: str, value: Any) -> None:
            v = _finite(value)
            if v is not None:
                out[key] = v

        for row in report.config_summary() if summary is None else summary:
            c = row["config"]
            put(f"opd/{c}/alignment", row["alignment_mean"])
            put(f"opd/{c}/alignment_correct", row["alignment_correct"])
            put(f"opd/{c}/alignment_incorrect", row["alignment_incorrect"])
            put(f"opd/{c}/positive_fraction", row["positive_fraction"])
            put(f"opd/{c}/teacher_advantage", row["teacher_advantage"])
            put(f"opd/{c}/degenerate_fraction", row["degenerate_fraction"])
            put(f"opd/{c}/alignment_ci_low", row["ci_low"])
            put(f"opd/{c}/alignment_ci_high", row["ci_high"])
            for metric in ("teacher_gain", "step_alignment", "alignment_weighted"):
                put(f"opd/{c}/{metric}", row[metric])
            put(f"opd/{c}/teacher_gain_ci_low", row["teacher_gain_ci"][0])
            put(f"opd/{c}/teacher_gain_ci_high", row["teacher_gain_ci"][1])
        put("opd/student/success_rate", report.success_rate)
        put("opd/rollouts", len(report.rollouts))
        put("opd/nodes", report.n_nodes)
        put("opd/continuations", report.meta.get("continuations", 0))
        put("opd/seconds", seconds)
        return out

    def _postprocess(self, report: AlignmentReport, args: Any, state: Any, step: int, t0: float) -> dict:
        """Main process: save the records, log wandb panels, decide early stopping. Returns what every rank needs."""
        d = self._records_dir(args)
        if d is not None:
            report.save(d / f"step-{step:07d}")
        summary = report.config_summary()
        stop = False
        stopper_state = None
        metrics: dict[str, float] = {}
        es = self.early_stopping
        if es is not None:
            decision = es.update(step, summary, report)
            level = logging.WARNING if decision["stop"] else logging.INFO
            logger.log(level, decision["message"])
            if es.warn_if_beaten:
                for b in decision["wins"]:
                    # a WARNING the first time a configuration beats the watched one; INFO when it repeats
                    level = logging.INFO if b["config"] in self._beaten_warned else logging.WARNING
                    self._beaten_warned.add(b["config"])
                    logger.log(level, "GradientAlignmentCallback at step %d: %s", step, es.beaten_message(b))
            stop = bool(decision["stop"])
            stopper_state = dict(es.state()["attributes"])
            metrics["opd/early_stopping/bad_count"] = float(es.bad_count)
            metrics["opd/early_stopping/stop"] = 1.0 if stop else 0.0
        self._log_wandb(report, args, step)
        seconds = time.perf_counter() - t0
        metrics = {**self.scalars(report, seconds, summary), **metrics}
        self.history.append({"step": step, "metrics": dict(metrics)})
        return {"metrics": metrics, "stop": stop, "error": None, "stopper": stopper_state}

    def _log_wandb(self, report: AlignmentReport, args: Any, step: int) -> None:
        from opd_callback.training.wandb_panels import WandbPanels, wandb_active

        if not wandb_active(args):
            return
        if self._panels is None:
            self._panels = WandbPanels(self.config_names, self.max_heatmap_rollouts, self.heatmap_config)
        tok = self.tokenizer()
        self._panels.log(report, step, lambda ids: tok.decode(list(ids), skip_special_tokens=False))

    # ------------------------------------------------------------------------------------------------ scalars
    def _emit(self, args: Any, state: Any, control: Any, metrics: dict[str, float]) -> None:
        """Send one row of scalars through the trainer's callback handler, as ``Trainer.log`` does (append to
        ``state.log_history``, then ``on_log`` to every callback: wandb, tensorboard, trackio, the printer...).

        ``trainer.log()`` itself is not called: TRL trainers flush and clear their metric buffers there.
        """
        logs = dict(metrics)
        if getattr(state, "epoch", None) is not None:
            logs.setdefault("epoch", state.epoch)
        state.log_history.append({**logs, "step": state.global_step})
        # CallbackHandler.on_log resets control.should_log: keep the trainer's own pending log of this step.
        was = bool(getattr(control, "should_log", False))
        self.trainer.callback_handler.on_log(args, state, control, logs=logs)
        if was:
            control.should_log = True
