"""The training half of the demo: on-policy distillation on the toy lab with the callback attached.

Three runs (``runs/demo/train-strong``, ``train-wrong``, ``train-hard-wrong``): ``trl.DistillationTrainer`` distils
the strong teacher, the wrong teacher (trained on a no-carry rule) and the hard wrong teacher (the strong teacher
fine-tuned on that rule: wrong only at the decisive tokens) into the weak student (reverse KL, TRL's default
``beta=1``). Every ``every_n_steps`` steps the callback pauses training and scores the trainer's own configuration
(``current``) and the demo's other configurations side by side on the same rollouts and nodes; wandb runs offline.
``AlignmentEarlyStopping()`` with its defaults watches ``current``: it lets the strong-teacher run finish and stops
the other two.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .configs import TEACHERS, demo_configs, training_settings

#: Metrics of each diagnostic kept in a run's summary (besides the student's success rate).
_RUN_METRICS = ("/alignment", "/teacher_advantage", "/teacher_gain")


@dataclass
class TrainingRun:
    """One ``DistillationTrainer`` run of the demo: the student of ``lab`` distilled from ``teacher`` for ``steps``
    steps, the callback scoring ``alternatives`` beside ``current`` every ``every`` steps, ``early_stopping`` (an
    ``AlignmentEarlyStopping`` or None) watching it; output under ``out``."""

    name: str
    out: Path
    lab: Any
    teacher: Any
    alternatives: list
    steps: int
    every: int
    seed: int
    early_stopping: Any = None
    quick: bool = False
    learning_rate: float = 1e-4


def _dataset(rows: list[dict]):
    from datasets import Dataset

    keep = ("prompt", "answer", "solution", "misleading_answer", "misleading_solution")
    return Dataset.from_list([{k: r[k] for k in keep if k in r} for r in rows])


def _trainer(run: TrainingRun):
    """The run's ``DistillationTrainer`` on a copy of the lab's student (reverse KL, CPU, wandb offline in
    ``run.out``)."""
    import copy

    from trl import DistillationConfig, DistillationTrainer

    from opd_callback.toy import CPU_TRAINER_ARGS

    student = copy.deepcopy(run.lab.student)  # never train the cached weights in place
    run.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_DIR"] = str(run.out)
    os.environ.setdefault("WANDB_SILENT", "true")
    cfg = DistillationConfig(
        output_dir=str(run.out),
        run_name=f"opd-demo-{run.name}",
        max_steps=run.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=run.learning_rate,
        lr_scheduler_type="constant",
        max_completion_length=48,
        temperature=1.0,
        beta=1.0,
        logging_steps=run.every,
        report_to=["wandb"],
        seed=run.seed,
        **CPU_TRAINER_ARGS,
    )
    return DistillationTrainer(
        model=student,
        teacher_model=run.teacher,
        args=cfg,
        train_dataset=_dataset(run.lab.train_examples[:2000]),
        processing_class=run.lab.tokenizer,
    )


def _attach_callback(trainer: Any, run: TrainingRun):
    """Attach the ``GradientAlignmentCallback`` (diagnostics at the start, every ``run.every`` steps and at the end)
    and remove the per-log printer; returns the callback."""
    import opd_callback as oc
    from opd_callback import toy

    cb = oc.GradientAlignmentCallback(
        trainer,
        reward_fn=toy.reward_fn,
        probe_dataset=run.lab.probe_examples[: (4 if run.quick else 8)],
        every_n_steps=run.every,
        configs=run.alternatives,
        settings=training_settings(run.seed, run.quick),
        early_stopping=run.early_stopping,
        run_at_start=True,
        run_at_end=True,
    )
    trainer.add_callback(cb)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the demo prints its own tables (wandb gets every row)
    return cb


def _train(trainer: Any) -> tuple[float, Path | None]:
    """Train, then close the wandb run; returns the seconds trained and the wandb run's folder (None without one)."""
    import wandb

    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    run_dir = Path(wandb.run.dir).parent if wandb.run is not None else None
    wandb.finish()
    teardown = getattr(wandb, "teardown", None)
    if callable(teardown):  # the next run re-reads WANDB_DIR
        teardown()
    return seconds, run_dir


def _diagnostic_rows(history: list[dict]) -> list[dict]:
    """Per diagnostic: its step, the student's success rate, and every configuration's alignment, teacher advantage
    and teacher gain (keys ``<config>/<metric>``)."""
    rows = []
    for h in history:
        m = h["metrics"]
        rows.append(
            {
                "step": h["step"],
                "success_rate": m.get("opd/student/success_rate"),
                **{k[len("opd/"):]: v for k, v in m.items() if k.endswith(_RUN_METRICS)},
            }
        )
    return rows


def _run_one(run: TrainingRun) -> dict:
    """Train ``run`` with the callback attached; returns its JSON-able summary."""
    trainer = _trainer(run)
    cb = _attach_callback(trainer, run)
    seconds, run_dir = _train(trainer)
    return {
        "name": run.name,
        "steps_run": trainer.state.global_step,
        "max_steps": run.steps,
        "stopped_early": trainer.state.global_step < run.steps,
        "stop_reason": run.early_stopping.reason if run.early_stopping is not None else None,
        "seconds": seconds,
        "wandb_run_dir": str(run_dir) if run_dir else None,
        "records_dir": str(run.out / "opd_alignment"),
        "diagnostics": _diagnostic_rows(cb.history),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def _print_diagnostics(diagnostics: list[dict]) -> None:
    """The table of a run's diagnostics: teacher gain per configuration, then the mean alignment of ``current``."""
    keys = [k for k in diagnostics[0] if k.endswith("/teacher_gain")]
    print("teacher_gain (the decision metric) per configuration at each diagnostic; mean alignment of `current` last")
    head = (f"{'step':>5} {'success':>8} " + " ".join(f"{k.split('/')[0][:18]:>18}" for k in keys)
            + f" {'align(current)':>15}")
    print(head)
    for d in diagnostics:
        vals = " ".join(f"{'nan':>18}" if d.get(k) is None else f"{d[k]:>+18.3f}" for k in keys)
        al = d.get("current/alignment")
        sr = d.get("success_rate")
        print(f"{d['step']:>5} {'nan' if sr is None else format(sr, '.1%'):>8} {vals} "
              f"{'nan' if al is None else format(al, '+.3f'):>15}")


def _print_run(res: dict) -> None:
    """A run's summary: steps, diagnostics table, stop reason, losses, where its records and wandb run are."""
    print(f"\n[demo:{res['name']}] {res['steps_run']}/{res['max_steps']} steps in {res['seconds']:.1f}s"
          f"{' (stopped early by AlignmentEarlyStopping)' if res['stopped_early'] else ''}")
    if res["diagnostics"]:
        _print_diagnostics(res["diagnostics"])
    if res.get("stop_reason"):
        print(f"[demo:{res['name']}] {res['stop_reason']}")
    if res["losses"]:
        print(f"[demo:{res['name']}] loss: first {res['losses'][0]:.4f}, last {res['losses'][-1]:.4f}")
    print(f"[demo:{res['name']}] per-token records: {res['records_dir']}  (oc.AlignmentReport.load(path))")
    if res["wandb_run_dir"]:
        print(f"[demo:{res['name']}] wandb offline run: {res['wandb_run_dir']}")
        print(f"[demo:{res['name']}]   inspect: wandb leet inspect --json {res['wandb_run_dir']}")
        print(f"[demo:{res['name']}]   upload (with an account): wandb sync {res['wandb_run_dir']}")


def early_stopping_runs(lab: Any, out: Path, seed: int = 0, quick: bool = False,
                        which: tuple[str, ...] = ("strong", "wrong", "hard-wrong"), verbose: bool = True,
                        early_stopping: bool = True, learning_rate: float = 1e-4) -> dict:
    """``DistillationTrainer`` runs on ``lab``, one per teacher in ``which``, each with the callback scoring the
    demo's other configurations side by side and ``AlignmentEarlyStopping()`` **with its defaults** watching
    ``current`` (``early_stopping=False``: none, every run goes to the end -- the robustness benchmark replays
    stopping rules on the saved diagnostics). The strong-teacher run is meant to go to the end; the wrong and
    hard-wrong ones to be stopped."""
    import opd_callback as oc

    runs = {}
    for name in which:
        attr, config_name = TEACHERS[name]
        run = TrainingRun(
            name=name,
            out=out / f"train-{name}",
            lab=lab,
            teacher=getattr(lab, attr),
            alternatives=[c for c in demo_configs(lab) if c.name != config_name],
            steps=20 if quick else 40,
            every=5,
            seed=seed,
            early_stopping=oc.AlignmentEarlyStopping() if early_stopping else None,
            quick=quick,
            learning_rate=learning_rate,
        )
        res = _run_one(run)
        if verbose:
            _print_run(res)
        runs[name] = res
    return runs


def run_training_demos(out: Path, seed: int = 0, quick: bool = False) -> dict:
    """The demo's training runs (strong, wrong and hard-wrong teacher, default early stopping); returns a JSON-able
    summary (also written to ``<out>/training.json``)."""
    from opd_callback import toy

    lab = toy.build_lab(seed=seed, verbose=False)
    res = early_stopping_runs(lab, out, seed=seed, quick=quick)
    (out / "training.json").write_text(json.dumps(res, indent=2, default=str))
    return res
