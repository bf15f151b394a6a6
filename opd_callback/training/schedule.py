"""When :class:`~opd_callback.training.callback.GradientAlignmentCallback` diagnoses: a fixed cadence or a time budget.

:class:`DiagnosticSchedule` makes every decision about *when*; the callback only asks it and runs the diagnostic.
Under the time budget the main process measures, decides the next step, and the callback broadcasts it so that every
rank diagnoses at the same steps.
"""

from __future__ import annotations

import logging
import math
import time

from opd_callback.core.settings import check_value

__all__ = ["DiagnosticSchedule"]

logger = logging.getLogger(__name__)

_OWNER = "GradientAlignmentCallback"


class DiagnosticSchedule:
    """The steps at which to diagnose.

    Decisions:

    * **Fixed cadence** (``every_n_steps`` an int): diagnose when ``step % every_n_steps == 0``.
    * **First diagnostic** (time budget, ``every_n_steps=None``): at step ``first_step`` (on resume past it,
      ``first_step`` steps after the resume step).
    * **Budget**: each later diagnostic is scheduled so that the diagnostics' total wall time, the next one included,
      stays within ``max_overhead`` of the training's wall time (measured: seconds per training step and per
      diagnostic); only a run's first diagnostic may exceed it.
    * **Start of run**: ``run_at_start`` diagnoses before the first step as well.
    * **End of run** (``run_at_end``): after the last step, if that step was not diagnosed already. Under the time
      budget only when it fits the budget, and always when no diagnostic ran before: every run gets one.
    * **Empty schedule**: when no scheduled diagnostic falls inside the run, :meth:`warn_if_empty` says so at warning
      level (naming whether the end-of-run diagnostic, or nothing, will run).

    Attributes:
        next_step: the time budget's next diagnostic step.
        train_seconds, train_steps, diag_seconds: what the budget has measured so far (main process).
        last_step: the step last diagnosed (attempted), ``None`` before the first.
        diagnostics_run: diagnostics attempted in this process's run, failed ones included.
    """

    def __init__(self, every_n_steps: int | None, max_overhead: float, first_step: int, run_at_start: bool,
                 run_at_end: bool) -> None:
        # types first (check_value returns int / float / bool or raises), then the bounds
        every_n_steps = check_value(_OWNER, "every_n_steps", every_n_steps, int | None)
        max_overhead = check_value(_OWNER, "max_overhead", max_overhead, float)
        first_step = check_value(_OWNER, "first_step", first_step, int)
        self.run_at_start = check_value(_OWNER, "run_at_start", run_at_start, bool)
        self.run_at_end = check_value(_OWNER, "run_at_end", run_at_end, bool)
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1 or None (time budget), got {every_n_steps!r}")
        if max_overhead <= 0:
            raise ValueError(f"max_overhead must be > 0 (e.g. 0.1 for 10%), got {max_overhead!r}")
        if first_step < 1:
            raise ValueError(f"first_step must be an int >= 1, got {first_step!r}")
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.first_step = first_step
        self.next_step: int = first_step
        self.train_seconds = 0.0
        self.train_steps = 0
        self.diag_seconds = 0.0
        self.last_step: int | None = None
        self.diagnostics_run = 0
        self._t_mark: float | None = None
        self._step_mark: int = 0

    @property
    def time_budget(self) -> bool:
        """Whether the time budget (rather than a fixed cadence) decides."""
        return self.every_n_steps is None

    def describe(self) -> str:
        """How often, for the start-of-run log line (``every <this> steps``)."""
        return str(self.every_n_steps) if self.every_n_steps else f"auto (<= {self.max_overhead:.0%} of training time)"

    # ------------------------------------------------------------------------------------------------ decisions
    def begin(self, step: int) -> None:
        """Training (re)starts at ``step``: start the training clock; a resume past the first diagnostic puts it
        ``first_step`` steps later."""
        self._t_mark, self._step_mark = time.perf_counter(), step
        if self.time_budget and step >= self.next_step:
            self.next_step = step + self.first_step

    def due_after_step(self, step: int, last: bool) -> bool:
        """Diagnose after optimizer step ``step`` (``last``: the run ends with it)?"""
        if self.every_n_steps is not None:
            due = step % self.every_n_steps == 0 or (self.run_at_end and last)
        else:
            # the end-of-run diagnostic respects the budget too, unless no diagnostic has run yet
            due = step >= self.next_step or (self.run_at_end and last and self.diagnostics_run == 0)
        return due and step != self.last_step

    def due_at_train_end(self, step: int) -> bool:
        """Diagnose when training ends at ``step`` without having diagnosed it (e.g. another callback stopped it)?"""
        if not self.run_at_end or self.last_step == step:
            return False
        over_budget = self.time_budget and step < self.next_step
        return not (over_budget and self.diagnostics_run > 0)

    def started(self, step: int) -> None:
        """A diagnostic starts at ``step``."""
        self.last_step = step
        self.diagnostics_run += 1

    # ------------------------------------------------------------------------------------------------ the budget
    def next_after(self, step: int, t0: float) -> int:
        """Main process: the step of the next diagnostic under the time budget, after the one at ``step`` that
        started at ``t0`` (``time.perf_counter()``); adds the training time since the last mark and this
        diagnostic's time to the measurements."""
        now = time.perf_counter()
        if self._t_mark is not None:
            self.train_seconds += max(t0 - self._t_mark, 0.0)
            self.train_steps += max(step - self._step_mark, 0)
        diag = now - t0
        self.diag_seconds += diag
        if self.train_steps == 0 or self.train_seconds <= 0:
            return step + self.first_step
        per_step = self.train_seconds / self.train_steps
        # next diagnostic once (diagnostics so far + one more) <= max_overhead * training time
        need = (self.diag_seconds + diag) / self.max_overhead - self.train_seconds
        return step + max(1, math.ceil(need / per_step))

    def advance(self, step: int, next_step: int, log: bool) -> None:
        """After the diagnostic at ``step``: take the (broadcast) ``next_step`` and restart the training clock;
        ``log`` (main process) says when the next one runs under the time budget."""
        self.next_step = int(next_step)
        self._t_mark, self._step_mark = time.perf_counter(), step
        if log and self.time_budget:
            logger.info(
                "GradientAlignmentCallback: next diagnostic at step %d (diagnostics %.1fs so far vs training %.1fs; "
                "budget %.0f%%)", self.next_step, self.diag_seconds, self.train_seconds, 100 * self.max_overhead,
            )

    # ------------------------------------------------------------------------------------------------ the warning
    def warn_if_empty(self, start: int, max_steps: int) -> None:
        """Warn when no scheduled diagnostic falls inside a run from ``start`` to ``max_steps`` (only the end-of-run
        one, or none, will run)."""
        if self.run_at_start or max_steps <= 0:
            return
        if self.every_n_steps is not None:
            first = (start // self.every_n_steps + 1) * self.every_n_steps
            what = f"every_n_steps={self.every_n_steps}"
        else:
            first = self.next_step
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
