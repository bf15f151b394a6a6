"""The training half of the demo: on-policy distillation on the toy lab with the callback attached.

Run 1 (``runs/demo/train-strong``): ``trl.DistillationTrainer`` distils the strong teacher into the weak student
(reverse KL, TRL's default ``beta=1``). Every ``every_n_steps`` steps the callback pauses training and scores the
trainer's own configuration (``current``) and four alternatives side by side on the same rollouts and nodes; wandb
runs offline.

Run 2 (``runs/demo/train-wrong``): the same with the **wrong** teacher as the trainer's teacher, and
``AlignmentEarlyStopping`` watching ``current``: it stops the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def _dataset(rows: list[dict]):
    from datasets import Dataset

    keep = ("prompt", "answer", "solution", "misleading_answer", "misleading_solution")
    return Dataset.from_list([{k: r[k] for k in keep if k in r} for r in rows])


def _run_one(
    name: str,
    out: Path,
    lab: Any,
    teacher: Any,
    alternatives: list,
    *,
    steps: int,
    every: int,
    seed: int,
    early_stopping: Any = None,
    quick: bool = False,
) -> dict:
    import copy

    import wandb
    from trl import DistillationConfig, DistillationTrainer

    import opd_callback as oc
    from opd_callback import toy

    student = copy.deepcopy(lab.student)  # never train the cached weights in place
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_DIR"] = str(out)
    os.environ.setdefault("WANDB_SILENT", "true")
    cfg = DistillationConfig(
        output_dir=str(out),
        run_name=f"opd-demo-{name}",
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        max_completion_length=48,
        temperature=1.0,
        beta=1.0,
        logging_steps=every,
        save_strategy="no",
        report_to=["wandb"],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=seed,
        disable_tqdm=True,
    )
    train = _dataset(lab.train_examples[:2000])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg,
        train_dataset=train,
        processing_class=lab.tokenizer,
    )
    settings = oc.RolloutSettings(
        num_rollouts=2,
        max_new_tokens=48,
        node_selection="depth_windows",
        nodes_per_window=1,
        max_nodes_per_rollout=6,
        top_k=3,
        teacher_top_k=1,
        rollouts_per_branch=4 if quick else 6,
        batch_size=256,
        seed=seed,
    )
    cb = oc.GradientAlignmentCallback(
        trainer,
        reward_fn=toy.reward_fn,
        probe_dataset=lab.probe_examples[: (4 if quick else 8)],
        every_n_steps=every,
        configs=alternatives,
        settings=settings,
        early_stopping=early_stopping,
        run_at_start=True,
        run_at_end=True,
    )
    trainer.add_callback(cb)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    run_dir = Path(wandb.run.dir).parent if wandb.run is not None else None
    wandb.finish()
    teardown = getattr(wandb, "teardown", None)
    if callable(teardown):  # the next run re-reads WANDB_DIR
        teardown()
    rec_dir = out / "opd_alignment"
    rows = []
    for h in cb.history:
        m = h["metrics"]
        rows.append(
            {
                "step": h["step"],
                "success_rate": m.get("opd/student/success_rate"),
                **{k[len("opd/"):]: v for k, v in m.items() if k.endswith("/alignment") or k.endswith("/teacher_advantage")},
            }
        )
    return {
        "name": name,
        "steps_run": trainer.state.global_step,
        "max_steps": steps,
        "stopped_early": trainer.state.global_step < steps,
        "seconds": seconds,
        "wandb_run_dir": str(run_dir) if run_dir else None,
        "records_dir": str(rec_dir),
        "diagnostics": rows,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def _print_run(res: dict) -> None:
    print(f"\n[demo:{res['name']}] {res['steps_run']}/{res['max_steps']} steps in {res['seconds']:.1f}s"
          f"{' (stopped early by AlignmentEarlyStopping)' if res['stopped_early'] else ''}")
    if res["diagnostics"]:
        keys = [k for k in res["diagnostics"][0] if k.endswith("/alignment")]
        print("mean alignment per configuration at each diagnostic (teacher advantage of `current` in the last column)")
        head = f"{'step':>5} {'success':>8} " + " ".join(f"{k.split('/')[0][:15]:>15}" for k in keys) + f" {'A_T(current)':>13}"
        print(head)
        for d in res["diagnostics"]:
            vals = " ".join(
                f"{'nan':>15}" if d.get(k) is None else f"{d[k]:>15.3f}" for k in keys
            )
            at = d.get("current/teacher_advantage")
            sr = d.get("success_rate")
            print(f"{d['step']:>5} {'nan' if sr is None else format(sr, '.1%'):>8} {vals} "
                  f"{'nan' if at is None else format(at, '+.4f'):>13}")
    if res["losses"]:
        print(f"[demo:{res['name']}] loss: first {res['losses'][0]:.4f}, last {res['losses'][-1]:.4f}")
    print(f"[demo:{res['name']}] per-token records: {res['records_dir']}  (oc.AlignmentReport.load(path))")
    if res["wandb_run_dir"]:
        print(f"[demo:{res['name']}] wandb offline run: {res['wandb_run_dir']}")
        print(f"[demo:{res['name']}]   inspect: wandb leet inspect --json {res['wandb_run_dir']}")
        print(f"[demo:{res['name']}]   upload (with an account): wandb sync {res['wandb_run_dir']}")


def run_training_demos(out: Path, seed: int = 0, quick: bool = False) -> dict:
    """Both training runs; returns a JSON-able summary (also written to ``<out>/training.json``)."""
    import opd_callback as oc
    from opd_callback import toy

    lab = toy.build_lab(seed=seed, verbose=False)
    from .demo import demo_configs

    def others(current: str) -> list:  # the core demo's five configurations, less the trainer's own teacher
        return [c for c in demo_configs(lab) if c.name != current]

    steps = 20 if quick else 40
    every = 10 if quick else 20
    strong = _run_one(
        "strong",
        out / "train-strong",
        lab,
        lab.strong_teacher,
        others("strong-teacher"),
        steps=steps,
        every=every,
        seed=seed,
        quick=quick,
    )
    _print_run(strong)
    # The wrong teacher drives training. Early stopping watches the mean alignment of the current configuration:
    # the strong teacher's stays in 0.52-0.65 during run 1; two consecutive diagnostics below 0.5 stop the run.
    # (Its teacher advantage, the other natural signal, goes to ~0 as the student absorbs the wrong rule.)
    stopper = oc.AlignmentEarlyStopping(metric="alignment", threshold=0.5, patience=2, config="current")
    wrong = _run_one(
        "wrong",
        out / "train-wrong",
        lab,
        lab.wrong_teacher,
        others("wrong-teacher"),
        steps=steps * 2,
        every=every // 2,
        seed=seed,
        early_stopping=stopper,
        quick=quick,
    )
    _print_run(wrong)
    res = {"strong": strong, "wrong": wrong}
    (out / "training.json").write_text(json.dumps(res, indent=2, default=str))
    return res
