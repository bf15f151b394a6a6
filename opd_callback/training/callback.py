"""``GradientAlignmentCallback``: score the live teacher configuration (and alternatives) during training.

Every ``every_n_steps`` optimizer steps the callback pauses training, runs the core
:class:`~opd_callback.AlignmentEngine` on a fixed probe set with the *current* student weights, and logs how well each
teacher configuration's distillation direction aligns with the ideal per-token gradient of the student's success. The
configuration the trainer is actually using (named ``current``) is derived from the trainer
(:mod:`opd_callback.training.trainers`); alternatives are scored in the same engine pass, on the same rollouts and
nodes.

Design:

* **Never hurt the run.** The CPU/CUDA/numpy/Python RNG states, every parameter's ``.grad``, the grad mode, every
  module's ``training`` flag, the tokenizer's padding/truncation side, gradient checkpointing and ``config.use_cache``
  are saved before and restored after (:mod:`opd_callback.training.state`). The engine samples with its own
  generators seeded by ``(seed, prompt index)``. A failure is logged with its traceback and counted (``opd/errors``);
  ``on_error="raise"`` re-raises.
* **When**: a fixed cadence or a time budget, decided by :class:`~opd_callback.training.schedule.DiagnosticSchedule`.
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

import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import TrainerCallback

from opd_callback.core.engine import AlignmentEngine
from opd_callback.core.nodes import estimate_continuations
from opd_callback.core.settings import RolloutSettings, TeacherConfig, check_value
from opd_callback.report import AlignmentReport
from opd_callback.report.numeric import finite_or_none
from opd_callback.training.early_stopping import AlignmentEarlyStopping
from opd_callback.training.probe import probe_set
from opd_callback.training.ranks import Outcome, engine_payload, from_main, gathered_from_ranks, merged_report
from opd_callback.training.schedule import DiagnosticSchedule
from opd_callback.training.state import preserved_training_state
from opd_callback.training.trainers import CURRENT, TrainerSpec, describe_trainer, unwrap

__all__ = [
    "GradientAlignmentCallback",
    "AlignmentEarlyStopping",
    "DiagnosticError",
    "estimate_continuations",
    "preserved_training_state",
]

logger = logging.getLogger(__name__)

_OWNER = "GradientAlignmentCallback"


class DiagnosticError(RuntimeError):
    """A diagnostic failed (raised only with ``on_error="raise"``)."""


# ====================================================================================================================
# construction helpers


def _check_trainer(trainer: Any, reward_fn: Any) -> None:
    """The two required arguments: a trainer (with a callback handler) and a callable verifier."""
    if trainer is None or not hasattr(trainer, "callback_handler"):
        raise TypeError(
            "GradientAlignmentCallback needs the trainer as its first argument (a callback never receives it): "
            "cb = GradientAlignmentCallback(trainer, reward_fn=...); trainer.add_callback(cb)"
        )
    if not callable(reward_fn):
        raise TypeError("reward_fn must be callable: reward_fn(prompts, completions, **columns) -> list[float]")


def _check_options(probe_size: Any, max_heatmap_rollouts: Any, include_current: Any, save_records: Any,
                   output_subdir: Any, heatmap_config: Any, on_error: Any) -> None:
    """Types (checked, not coerced) and ranges of the callback's plain options."""
    probe_size = check_value(_OWNER, "probe_size", probe_size, int)
    check_value(_OWNER, "max_heatmap_rollouts", max_heatmap_rollouts, int)
    check_value(_OWNER, "include_current", include_current, bool)
    check_value(_OWNER, "save_records", save_records, bool)
    check_value(_OWNER, "output_subdir", output_subdir, str | None)
    check_value(_OWNER, "heatmap_config", heatmap_config, str | None)
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
    if not isinstance(probe_size, int) or probe_size < 1:
        raise ValueError(f"probe_size must be an int >= 1, got {probe_size!r}")


def _checked_configs(configs: Sequence[TeacherConfig], early_stopping: Any) -> list[TeacherConfig]:
    """The alternatives as a list of ``TeacherConfig`` (and ``early_stopping``'s type checked)."""
    if early_stopping is not None and not isinstance(early_stopping, AlignmentEarlyStopping):
        raise TypeError("early_stopping must be an AlignmentEarlyStopping")
    configs = list(configs or [])
    for c in configs:
        if not isinstance(c, TeacherConfig):
            raise TypeError(f"configs must be TeacherConfig objects, got {type(c).__name__}")
    return configs


def _diagnostic_settings(settings: RolloutSettings | None, spec: TrainerSpec) -> RolloutSettings:
    """``settings``, or the default: nodes at the student's forking tokens, with the trainer's sampling temperature
    and completion length. A sampling temperature other than the trainer's is noted in ``spec.notes``."""
    if settings is None:
        # nodes at the student's forking tokens: where a teacher's push decides the outcome (on five toy labs the
        # verdicts separate good from bad teachers with far fewer nodes than depth windows; method.md)
        kw: dict[str, Any] = {"node_selection": "entropy"}
        if spec.sampling_temperature:
            kw["temperature"] = float(spec.sampling_temperature)
        if spec.max_new_tokens:
            kw["max_new_tokens"] = int(spec.max_new_tokens)
        settings = RolloutSettings(**kw)
    if not isinstance(settings, RolloutSettings):
        raise TypeError("settings must be a RolloutSettings")
    samp = spec.sampling_temperature
    if samp is not None and float(samp) != float(settings.temperature):
        spec.notes.append(
            f"{spec.trainer_name} samples at temperature {samp:g} but settings.temperature is "
            f"{settings.temperature:g}: the diagnostic measures the success gradient of the student sampled at "
            f"{settings.temperature:g}."
        )
    return settings


def _rollout_provider(trainer: Any, backend: Any, vllm_options: Any) -> Any:
    """``None`` for the transformers backend; for ``backend="vllm"`` the vLLM engine provider (the trainer's colocated
    engine, or one of its own; :mod:`opd_callback.rollout.vllm_backend`)."""
    if backend in (None, "transformers"):
        return None
    if backend != "vllm":
        raise ValueError(f"backend must be None, 'transformers' or 'vllm', got {backend!r}")
    from opd_callback.rollout.vllm_backend import VLLMBackendProvider

    return VLLMBackendProvider(trainer, vllm_options)


# ====================================================================================================================
# the callback


class GradientAlignmentCallback(TrainerCallback):
    """Pause on-policy distillation every ``every_n_steps`` steps and score teacher configurations.

    Logged metrics: after each diagnostic one row of scalars (``opd/<config>/teacher_gain``, ``opd/<config>/alignment``,
    ``opd/student/success_rate``, ...) goes through the trainer's log; every key is listed in docs/callback.md,
    "Logged metrics" (a test keeps that list complete).

    Args:
        trainer: the trainer (``trl.DistillationTrainer``, ``trl.experimental.gkd.GKDTrainer``,
            ``trl.experimental.sdft.SDFTTrainer``, or any ``transformers.Trainer`` with explicit ``configs``). The
            current teacher configuration is derived from it. Add the callback with ``trainer.add_callback(cb)``.
        reward_fn: the verifier, TRL signature ``reward_fn(prompts, completions, **columns) -> list[float]``.
        probe_dataset: the fixed probe prompts (list of dicts or ``datasets.Dataset`` with ``prompt`` and the columns
            the reward and templates use). Default: a fixed random sample of ``probe_size`` rows of
            ``trainer.train_dataset`` (seeded by ``settings.seed``).
        every_n_steps: ``None`` (default): a **time budget** — the first diagnostic runs at step ``first_step``, and
            each later one is scheduled so that the diagnostics' total wall time stays within ``max_overhead`` of the
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
        vllm_options: ``backend="vllm"``: :class:`~opd_callback.rollout.vllm_backend.VLLMOptions` (or a dict of its
            fields) of the engine the callback starts.

    Attributes:
        schedule: the :class:`~opd_callback.training.schedule.DiagnosticSchedule` (when to diagnose, what the time
            budget measured).
        spec: what the callback derived from the trainer (:class:`~opd_callback.training.trainers.TrainerSpec`).
        probe_rows: the probe set; ``errors``: failed diagnostics; ``history``: ``{"step", "metrics"}`` per
            successful diagnostic (main process); ``last_report``: the last merged report.
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
        _check_trainer(trainer, reward_fn)
        # decided on the main process, broadcast with each diagnostic
        self.schedule = DiagnosticSchedule(every_n_steps, max_overhead, first_step, run_at_start, run_at_end)
        _check_options(probe_size, max_heatmap_rollouts, include_current, save_records, output_subdir, heatmap_config,
                       on_error)
        self.trainer = trainer
        self.reward_fn = reward_fn
        self.alternatives = _checked_configs(configs, early_stopping)
        self.include_current = bool(include_current)
        self.on_error = on_error
        self.max_heatmap_rollouts = int(max_heatmap_rollouts)
        self.output_subdir = output_subdir
        self.save_records = bool(save_records) and output_subdir is not None
        self.probe_size = int(probe_size)
        self.spec: TrainerSpec = describe_trainer(trainer)
        self._check_current(self.alternatives)
        self.settings = _diagnostic_settings(settings, self.spec)
        self.heatmap_config = self._checked_heatmap_config(heatmap_config)
        self.probe_rows, self.probe_source = probe_set(trainer, probe_dataset, self.probe_size, self.settings.seed,
                                                       self.spec.prepare_example)
        self.early_stopping = self._attached(early_stopping)
        self._rollouts = _rollout_provider(trainer, backend, vllm_options)
        self.errors = 0
        self.history: list[dict] = []  # {"step", "metrics"} per successful diagnostic (main process)
        self.last_report: AlignmentReport | None = None
        self._beaten_warned: set[str] = set()  # configurations already reported (at WARNING) as beating the watched one
        self._panels = None
        self._validated = False

    # ------------------------------------------------------------------------------------------------ configuration
    def _check_current(self, configs: list[TeacherConfig]) -> None:
        """Refuse configurations that cannot be scored: a reserved name, nothing to score, or a ``current`` the
        trainer cannot provide."""
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

    def _checked_heatmap_config(self, heatmap_config: str | None) -> str:
        """The configuration colouring the heatmap (default: the first); configuration names must be unique."""
        names = self.config_names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"configuration names must be unique; repeated: {dup}")
        chosen = heatmap_config or names[0]
        if chosen not in names:
            raise ValueError(f"heatmap_config {chosen!r} is not one of the configurations {names}")
        return chosen

    def _attached(self, early_stopping: AlignmentEarlyStopping | None) -> AlignmentEarlyStopping | None:
        """``early_stopping``, checked to watch a scored configuration and added to the trainer's callbacks (so that
        its counters are saved in checkpoints)."""
        if early_stopping is None:
            return None
        names = self.config_names
        if early_stopping.config not in names:
            raise ValueError(
                f"AlignmentEarlyStopping watches configuration {early_stopping.config!r}, which is not scored "
                f"(configurations: {names})"
                + (". The trainer has no derivable 'current' configuration."
                   if early_stopping.config == CURRENT else "")
            )
        if early_stopping not in self.trainer.callback_handler.callbacks:
            self.trainer.add_callback(early_stopping)
        return early_stopping

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
        """Names of the scored configurations (``current`` first when scored)."""
        head = [CURRENT] if self.include_current and self.spec.current is not None else []
        return head + [c.name for c in self.alternatives]

    # ------------------------------------------------------------------------------------------------ plumbing
    @property
    def accelerator(self):
        """The trainer's ``accelerate.Accelerator`` (None for trainers without one)."""
        return getattr(self.trainer, "accelerator", None)

    @property
    def world(self) -> tuple[int, int, bool]:
        """``(number of processes, this process's index, whether it is the main process)``."""
        acc = self.accelerator
        if acc is None:
            return 1, 0, True
        return int(acc.num_processes), int(acc.process_index), bool(acc.is_main_process)

    def student(self) -> torch.nn.Module:
        """The student, unwrapped from DDP / accelerate."""
        return unwrap(self.trainer, self.trainer.model)

    def tokenizer(self) -> Any:
        """The trainer's text tokenizer (a multimodal processor's inner one)."""
        tok = getattr(self.trainer, "processing_class", None) or getattr(self.trainer, "tokenizer", None)
        inner = getattr(tok, "tokenizer", None)
        if inner is not None and not hasattr(tok, "get_vocab"):
            tok = inner  # a multimodal processor: use its text tokenizer
        if tok is None:
            raise ValueError("the trainer has no processing_class (tokenizer); the diagnostic needs one")
        return tok

    def build_engine(self, configs: list[TeacherConfig] | None = None) -> AlignmentEngine:
        """An engine over the unwrapped student and ``configs`` (default: :meth:`current_configs`)."""
        configs = self.current_configs() if configs is None else configs
        engine = AlignmentEngine(self.student(), self.tokenizer(), configs, self.reward_fn, self.settings)
        if self._rollouts is not None:  # vLLM: synced to the current weights now
            engine.backend = self._rollouts.backend(
                engine.student, eos_ids=engine.eos_ids, pad_id=engine.pad_id, temperature=self.settings.temperature,
                batch_size=self.settings.batch_size,
            )
        return engine

    def _check_distributed(self) -> None:
        """Refuse FSDP and DeepSpeed ZeRO-3 (sharded parameters)."""
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
        """Where the records of each diagnostic go (None when not saved)."""
        if not self.save_records:
            return None
        return Path(args.output_dir) / str(self.output_subdir)

    def _resolve_stopper(self, state: Any) -> None:
        """Use the early-stopping instance the trainer actually calls, with its checkpointed counters."""
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
        """Refuse sharded set-ups, restore the early-stopping counters, check the probe set and the reward function
        on every rank, log the plan, and diagnose at the start when asked."""
        self._check_distributed()
        self._resolve_stopper(state)
        self._check_probe()
        self._validated = True
        if self.world[2]:
            self._log_plan(args, state)
        self.schedule.begin(state.global_step)
        if self.schedule.run_at_start and not self._already_saved(args, state.global_step):
            self._diagnose(args, state, control)
        return control

    def _check_probe(self) -> None:
        """Build an engine (checks vocabularies, EOS, configurations), prepare the probe prompts (prompts and template
        fields) and call the reward function once with an empty completion (its signature)."""
        engine = self.build_engine()
        with preserved_training_state(self.student(), self.tokenizer()):
            prepared = engine.prepare(self.probe_rows)
            try:
                engine.score(prepared[0], [[]])
            except Exception as exc:
                raise ValueError(
                    f"the reward function failed on a probe prompt (called with an empty completion to check its "
                    f"signature before training): {exc}"
                ) from exc

    def _log_plan(self, args: Any, state: Any) -> None:
        """Main process, at the start of training: what is scored, how often and at what cost; the trainer notes;
        an empty schedule; records of an earlier run in the output directory."""
        world = self.world[0]
        cost = estimate_continuations(self.settings, len(self.probe_rows), len(self.config_names))
        desc = f"; current = {self.spec.description}" if CURRENT in self.config_names else ""
        logger.info(
            "GradientAlignmentCallback on %s: configurations %s%s; probe: %s; every %s steps; at most ~%d "
            "continuations per diagnostic (%s).",
            self.spec.trainer_name, self.config_names, desc, self.probe_source, self.schedule.describe(), cost,
            "split over %d processes" % world if world > 1 else "one process",
        )
        for note in self.spec.notes:
            logger.warning("GradientAlignmentCallback: %s", note)
        self.schedule.warn_if_empty(int(state.global_step), int(getattr(state, "max_steps", 0) or 0))
        d = self._records_dir(args)
        if d is not None and state.global_step == 0 and d.is_dir() and any(d.glob("step-*")):
            logger.warning(
                "GradientAlignmentCallback: %s already holds records of an earlier run; AlignmentReport.load "
                "will read them together with this run's (steps are overwritten as they are diagnosed).",
                d,
            )

    def _already_saved(self, args: Any, step: int) -> bool:
        """On resume: were this step's records written before? (The main process decides, for every rank.)"""
        d = self._records_dir(args)
        found = bool(step > 0 and d is not None and (d / f"step-{step:07d}" / "records.parquet").exists())
        return from_main(found, self.world[0])

    def on_step_end(self, args, state, control, **kwargs):
        """Diagnose after this optimizer step when the schedule says so."""
        step = state.global_step
        last = bool(control.should_training_stop) or (state.max_steps > 0 and step >= state.max_steps)
        if self.schedule.due_after_step(step, last):
            self._diagnose(args, state, control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """The end-of-run diagnostic when training stopped at a step not diagnosed (e.g. another callback stopped it
        after our ``on_step_end``)."""
        if self._validated and self.schedule.due_at_train_end(state.global_step):
            self._diagnose(args, state, control)
        return control

    # ------------------------------------------------------------------------------------------------ the diagnostic
    def run_diagnostic(self, args: Any = None, state: Any = None, control: Any = None) -> AlignmentReport | None:
        """Run one diagnostic now with the trainer's current state (also usable outside training). Returns the
        merged report (on every rank), or ``None`` when it failed with ``on_error="warn"``."""
        t = self.trainer
        return self._diagnose(args or t.args, state or t.state, control or t.control)

    def _diagnose(self, args: Any, state: Any, control: Any) -> AlignmentReport | None:
        """One diagnostic at ``state.global_step`` on every rank; then the schedule's next step, decided on the main
        process and broadcast (also after a failure)."""
        step = int(state.global_step)
        self.schedule.started(step)
        t0 = time.perf_counter()
        try:
            return self._diagnose_now(args, state, control, step, t0)
        finally:
            world, _, main = self.world
            next_step = from_main(self.schedule.next_after(step, t0) if main else None, world)
            self.schedule.advance(step, next_step, log=main)

    def _diagnose_now(self, args: Any, state: Any, control: Any, step: int, t0: float) -> AlignmentReport | None:
        """Score every rank's share of the probe set, gather and merge the records, let the main process save, log
        and decide, and apply its decision on every rank."""
        world, _, main = self.world
        share, local_meta = self._score_share(args, step)
        gathered = gathered_from_ranks(share, world)
        failed = [(r, e) for r, e, _ in gathered if e]
        if failed:
            return self._failed(args, state, control, failed)
        report = merged_report([p for _, _, p in gathered], local_meta, step, self.spec)
        outcome = from_main(self._process(report, args, step, t0) if main else Outcome(), world)
        if outcome.error:
            return self._failed(args, state, control, [(0, outcome.error)])
        self._apply(outcome, args, state, control)
        self.last_report = report
        return report

    def _score_share(self, args: Any, step: int) -> tuple[tuple[int, str | None, dict | None], dict]:
        """Score this rank's prompts (strided by global index) with the training state preserved. Returns ``(rank,
        traceback or None, payload)``, gathered from every rank, and the local report's metadata (settings and
        configurations: kept here, not pickled across ranks)."""
        world, rank, _ = self.world
        mine = [i for i in range(len(self.probe_rows)) if i % world == rank]
        error, payload, meta = None, None, {}
        student, tok = self.student(), self.tokenizer()
        try:
            configs = self.current_configs()
            others = [c.teacher.model for c in configs if c.teacher.model is not None]
        except Exception:  # noqa: BLE001 - raised again, and reported, when the engine is built
            configs, others = None, []
        with preserved_training_state(student, tok, others, getattr(args, "gradient_checkpointing_kwargs", None)):
            try:
                payload, meta = engine_payload(self.build_engine(configs), self.probe_rows, mine)
            except Exception:  # noqa: BLE001 - reported below, training continues unless on_error="raise"
                error = traceback.format_exc()
                logger.error(
                    "GradientAlignmentCallback: the diagnostic at step %d failed on process %d:\n%s", step, rank, error
                )
        return (rank, error, payload), meta

    def _failed(self, args: Any, state: Any, control: Any, failed: list) -> None:
        """Count and log a failed diagnostic (``failed``: ``(process, traceback)`` pairs); raise
        :class:`DiagnosticError` with ``on_error="raise"``."""
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

    def scalars(self, report: AlignmentReport, seconds: float,
                summary: Sequence[dict] | None = None) -> dict[str, float]:
        """The ``opd/...`` scalars of one diagnostic (undefined values are left out); ``summary``: the report's
        ``config_summary()`` when the caller has it already."""
        out: dict[str, float] = {}

        def put(key: str, value: Any) -> None:
            v = finite_or_none(value)
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

    def _process(self, report: AlignmentReport, args: Any, step: int, t0: float) -> Outcome:
        """Main process: save the records, decide early stopping, log the wandb panels and compute the scalars. A
        failure here is returned (as a traceback) for every rank to count."""
        try:
            d = self._records_dir(args)
            if d is not None:
                report.save(d / f"step-{step:07d}")
            summary = report.config_summary()
            outcome = self._early_stopping_decision(report, summary, step)
            self._log_wandb(report, args, step)
            outcome.metrics = {**self.scalars(report, time.perf_counter() - t0, summary), **outcome.metrics}
            self.history.append({"step": step, "metrics": dict(outcome.metrics)})
            return outcome
        except Exception:  # noqa: BLE001
            error = traceback.format_exc()
            logger.error("GradientAlignmentCallback: processing the diagnostic at step %d failed:\n%s", step, error)
            return Outcome(error=error)

    def _early_stopping_decision(self, report: AlignmentReport, summary: Sequence[dict], step: int) -> Outcome:
        """Main process: feed the diagnostic to the early stopping (if any), log its message and the "beats"
        warnings (WARNING the first time a configuration beats the watched one, INFO when it repeats)."""
        es = self.early_stopping
        if es is None:
            return Outcome()
        decision = es.update(step, summary, report)
        logger.log(logging.WARNING if decision["stop"] else logging.INFO, decision["message"])
        if es.warn_if_beaten:
            for b in decision["wins"]:
                level = logging.INFO if b["config"] in self._beaten_warned else logging.WARNING
                self._beaten_warned.add(b["config"])
                logger.log(level, "GradientAlignmentCallback at step %d: %s", step, es.beaten_message(b))
        stop = bool(decision["stop"])
        metrics = {"opd/early_stopping/bad_count": float(es.bad_count), "opd/early_stopping/stop": 1.0 if stop else 0.0}
        return Outcome(metrics=metrics, stop=stop, stopper=dict(es.state()["attributes"]))

    def _apply(self, outcome: Outcome, args: Any, state: Any, control: Any) -> None:
        """Every rank: take the main process's early-stopping counters, log the scalars, stop training when decided."""
        if self.early_stopping is not None and outcome.stopper is not None:
            for k, v in outcome.stopper.items():
                setattr(self.early_stopping, k, v)
        self._emit(args, state, control, {**outcome.metrics, "opd/errors": float(self.errors)})
        if outcome.stop:
            control.should_training_stop = True
            control.should_save = True

    def _log_wandb(self, report: AlignmentReport, args: Any, step: int) -> None:
        """Main process: the wandb panels of this diagnostic, when a wandb run is active."""
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
