"""Benchmark: wall-time and memory overhead of ``GradientAlignmentCallback`` on a real ``trl.DistillationTrainer`` run.

Toy lab (``opd_callback.toy``): the student is distilled from the strong teacher for ``--steps`` optimizer steps
(default 1000). The callback runs at its default cadence: the time budget (``every_n_steps=None``: first diagnostic at
step 50, later ones scheduled so that diagnostics take at most ``max_overhead=10%`` of training time). Runs *with*
the callback (its defaults: ``RolloutSettings()`` with the trainer's temperature and completion length, a probe of
8 rows sampled from the training set, records saved; configurations ``current`` = strong teacher reverse KL, plus
``self+answer`` and ``self+solution``, as in the demo) and *without* it run in ``--repeats`` alternated pairs
(default 3; the order inside a pair alternates too); the headline is the **median of the per-pair overheads** (the
machine is shared and noisy: a pair's two runs see similar load).

Peak memory: in two fresh subprocesses (same trainer, models loaded, one warm-up step done), the peak RSS increase
over the current RSS of (a) one training step and (b) one diagnostic pass, read from ``VmHWM`` after resetting it
with ``/proc/self/clear_refs`` (fallback: ``getrusage`` ``ru_maxrss``).

Usage: ``python benchmarks/bench_overhead.py [--steps 1000] [--repeats 3] [--threads 1] [--quick]``; writes
``benchmarks/results/overhead.json``. The headline (overhead at the default cadence) is printed last.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_result  # noqa: E402  (also sets HF_HUB_OFFLINE / HF_HUB_DISABLE_TELEMETRY)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

BATCH = 8  # TrainingArguments' default per_device_train_batch_size
MAX_COMPLETION = 32  # a toy solution is 31 tokens with its EOS


# ---------------------------------------------------------------------------------------------------- set-up
def make_trainer(lab, out_dir: str, steps: int, with_callback: bool, **cb_kwargs):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    import opd_callback as oc
    from opd_callback import toy

    rows = [{k: e[k] for k in ("prompt", "answer", "solution")} for e in lab.train_examples[: max(64, steps * BATCH)]]
    args = DistillationConfig(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-4,
        max_completion_length=MAX_COMPLETION,
        logging_steps=10,
        report_to="none",
        seed=0,
        **toy.CPU_TRAINER_ARGS,
    )
    trainer = DistillationTrainer(
        model=lab.load_model("student"),  # fresh copies: every run starts from the same weights
        teacher_model=lab.load_model("strong_teacher"),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=lab.tokenizer,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no per-log printing (identical in both arms anyway)
    cb = None
    if with_callback:
        cb = oc.GradientAlignmentCallback(
            trainer,
            reward_fn=toy.reward_fn,
            configs=[
                oc.TeacherConfig("self+answer", oc.ContextTeacher(toy.ANSWER_TEMPLATE)),
                oc.TeacherConfig("self+solution", oc.ContextTeacher(toy.SOLUTION_TEMPLATE)),
            ],
            **cb_kwargs,
        )
        trainer.add_callback(cb)
    return trainer, cb


def timed_run(lab, steps: int, with_callback: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as d:
        trainer, cb = make_trainer(lab, d, steps, with_callback)
        gc.collect()
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        out = {"with_callback": with_callback, "wall_s": wall, "global_step": trainer.state.global_step}
        if cb is not None:
            out["diagnostics"] = [
                {"step": h["step"], "seconds": h["metrics"].get("opd/seconds"),
                 "continuations": h["metrics"].get("opd/continuations"), "nodes": h["metrics"].get("opd/nodes")}
                for h in cb.history
            ]
            out["errors"] = cb.errors
        return out


# ---------------------------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak RSS increase of a code region over the RSS at its start (MiB)."""

    def start(self) -> None:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (and ru_maxrss) to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
        self.rss0 = _status_kb("VmRSS") or 0
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self) -> dict:
        hwm = _status_kb("VmHWM") if self.reset else None
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = hwm if hwm is not None else ru
        return {
            "rss_before_mib": self.rss0 / 1024,
            "peak_mib": peak / 1024,
            "peak_increase_mib": max(0, peak - self.rss0) / 1024,
            "method": "VmHWM after clear_refs" if hwm is not None else "ru_maxrss delta (lower bound)",
        }


def memory_worker(mode: str, threads: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from opd_callback import toy

    torch.set_num_threads(threads)
    lab = toy.build_lab(verbose=False)
    meter = PeakMeter()
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="opd-bench-mem-") as d:
        if mode == "step":
            class MeasureSecondStep(TrainerCallback):
                def on_step_begin(self, args, state, control, **kw):
                    if state.global_step == 1:  # after the warm-up step (optimizer state allocated)
                        meter.start()

                def on_step_end(self, args, state, control, **kw):
                    if state.global_step == 2:
                        result.update(meter.stop())

            trainer, _ = make_trainer(lab, d, 2, with_callback=False)
            trainer.add_callback(MeasureSecondStep())
            trainer.train()
        else:
            trainer, cb = make_trainer(lab, d, 1, with_callback=True, run_at_end=False)
            trainer.train()  # one warm-up step (and the callback's on_train_begin checks)
            meter.start()
            cb.run_diagnostic()
            result.update(meter.stop())
            result["continuations"] = cb.history[-1]["metrics"].get("opd/continuations") if cb.history else None
    result["mode"] = mode
    return result


def run_memory(mode: str, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", mode, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory worker {mode} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("MEMORY_JSON "):])


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="alternated pairs of runs without / with the callback")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest on 2 shared cores)")
    p.add_argument("--quick", action="store_true", help="--steps 50 --repeats 1 (smoke test)")
    p.add_argument("--memory-worker", choices=["step", "diagnostic"], help=argparse.SUPPRESS)
    args = p.parse_args()
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("opd_callback").setLevel(logging.ERROR)
    if args.memory_worker:
        print("MEMORY_JSON " + json.dumps(memory_worker(args.memory_worker, args.threads)), flush=True)
        return
    if args.quick:
        args.steps, args.repeats = 120, 1
    torch.set_num_threads(args.threads)

    import opd_callback as oc
    from opd_callback import toy
    from opd_callback.core.nodes import estimate_continuations

    t_start = time.perf_counter()
    lab = toy.build_lab(verbose=False)
    every = inspect.signature(oc.GradientAlignmentCallback).parameters["every_n_steps"].default  # None: time budget
    budget = inspect.signature(oc.GradientAlignmentCallback).parameters["max_overhead"].default
    cadence = f"every {every} steps" if every else f"time budget {budget:.0%} (first at step 50)"
    settings = oc.RolloutSettings(max_new_tokens=MAX_COMPLETION, node_selection="entropy")  # the callback's default
    bound = estimate_continuations(settings, 8, 3)
    print(f"[overhead] toy lab, DistillationTrainer {args.steps} steps x batch {BATCH}, callback cadence: {cadence} "
          f"(<= {bound:,} continuations per diagnostic), {args.repeats} runs with / without, "
          f"{args.threads} torch thread(s)", flush=True)

    # warm-up (imports, first-call allocations) so that the first timed run is not penalized
    timed_run(lab, 2, with_callback=False)

    runs = []
    pairs = []
    for r in range(args.repeats):
        pair = {}
        for with_cb in ((False, True) if r % 2 == 0 else (True, False)):
            res = timed_run(lab, args.steps, with_cb)
            res["pair"] = r
            runs.append(res)
            pair[with_cb] = res["wall_s"]
            diag = ""
            if with_cb:
                diag = " diagnostics " + ", ".join(
                    f"step {d['step']}: {d['seconds']:.2f}s/{d['continuations']:.0f} cont." for d in res["diagnostics"])
            arm = "with   " if with_cb else "without"
            print(f"[overhead] pair {r + 1} {arm} callback: {res['wall_s']:7.2f}s{diag}", flush=True)
        pairs.append(pair[True] / pair[False] - 1.0)
        print(f"[overhead] pair {r + 1}: overhead {pairs[-1]:+.1%}", flush=True)

    without = min(x["wall_s"] for x in runs if not x["with_callback"])
    with_ = min(x["wall_s"] for x in runs if x["with_callback"])
    best_with = min((x for x in runs if x["with_callback"]), key=lambda x: x["wall_s"])
    assert all(x.get("errors", 0) == 0 for x in runs), "a diagnostic failed"
    n_done = len(best_with["diagnostics"])
    step_s = without / args.steps
    overhead = float(sorted(pairs)[len(pairs) // 2]) if len(pairs) % 2 else float(
        (sorted(pairs)[len(pairs) // 2 - 1] + sorted(pairs)[len(pairs) // 2]) / 2)
    overhead_of_minima = with_ / without - 1.0
    per_diag = (with_ - without) / max(n_done, 1)
    diag_logged = [d["seconds"] for x in runs if x["with_callback"] for d in x["diagnostics"]]
    per_diag_logged = min(diag_logged) if diag_logged else float("nan")
    # cadence needed for <= 10 % overhead at this per-diagnostic cost
    every_for_10 = math.ceil(per_diag / (0.10 * step_s)) if per_diag > 0 else 1

    # supplement: one diagnostic with the cheaper starting settings of examples/gsm8k_distill.py (same probe, configs)
    cheap = oc.RolloutSettings(max_new_tokens=MAX_COMPLETION, num_rollouts=2, max_nodes_per_rollout=4, top_k=4,
                               teacher_top_k=1, rollouts_per_branch=4)
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as d:
        trainer, cb = make_trainer(lab, d, 1, with_callback=True, settings=cheap)
        cheap_s = []
        for _ in range(2):
            t0 = time.perf_counter()
            cb.run_diagnostic()
            cheap_s.append(time.perf_counter() - t0)
        cheap_cont = cb.history[-1]["metrics"].get("opd/continuations")
    cheap_every = math.ceil(min(cheap_s) / (0.10 * step_s))
    print(f"[overhead] example settings (num_rollouts=2, max_nodes=4, teacher_top_k=1, rollouts_per_branch=4): one "
          f"diagnostic {min(cheap_s):.2f}s ({cheap_cont:.0f} continuations) = {min(cheap_s) / step_s:.1f} "
          "training steps",
          flush=True)

    print("[overhead] measuring peak memory in fresh subprocesses ...", flush=True)
    mem_step = run_memory("step", args.threads)
    mem_diag = run_memory("diagnostic", args.threads)

    payload = {
        "setup": {
            "steps": args.steps,
            "batch_size": BATCH,
            "max_completion_length": MAX_COMPLETION,
            "every_n_steps": every,
            "cadence": cadence,
            "diagnostics_per_run": n_done,
            "configs": ["current (strong teacher, reverse_kl)", "self+answer", "self+solution"],
            "settings": "the callback's default: RolloutSettings(node_selection='entropy') (num_rollouts=4, "
                        "max_nodes_per_rollout=8, top_k=4, teacher_top_k=2, rollouts_per_branch=8), max_new_tokens=32 "
                        "from the trainer; probe: 8 rows of train_dataset",
            "estimate_continuations": bound,
            "repeats": args.repeats,
            "torch_threads": args.threads,
            "student_params": sum(p.numel() for p in lab.student.parameters()),
            "teacher_params": sum(p.numel() for p in lab.strong_teacher.parameters()),
        },
        "runs": runs,
        "wall_without_s": without,
        "wall_with_s": with_,
        "overhead_fraction": overhead,
        "overhead_statistic": "median over alternated pairs of (with / without - 1)",
        "overhead_per_pair": pairs,
        "overhead_of_minima": overhead_of_minima,
        "diagnostics_per_run_all": [len(x["diagnostics"]) for x in runs if x["with_callback"]],
        "training_step_s": step_s,
        "overhead_per_diagnostic_s": per_diag,
        "diagnostic_seconds_logged_min": per_diag_logged,
        "overhead_per_diagnostic_in_training_steps": per_diag / step_s,
        "every_n_steps_for_10pct": every_for_10,
        "example_settings": {
            "settings": "num_rollouts=2, max_nodes_per_rollout=4, top_k=4, teacher_top_k=1, rollouts_per_branch=4, "
                        "max_new_tokens=32 (examples/gsm8k_distill.py defaults); run_diagnostic() outside training",
            "estimate_continuations": estimate_continuations(cheap, 8, 3),
            "continuations": cheap_cont,
            "diagnostic_s": min(cheap_s),
            "diagnostic_in_training_steps": min(cheap_s) / step_s,
            "overhead_at_every_50": min(cheap_s) / (50 * step_s),
            "every_n_steps_for_10pct": cheap_every,
        },
        "memory": {"training_step": mem_step, "diagnostic": mem_diag,
                   "diagnostic_over_step": (mem_diag["peak_increase_mib"] / mem_step["peak_increase_mib"])
                   if mem_step["peak_increase_mib"] > 0 else None},
        "total_seconds": None,
    }
    payload["total_seconds"] = time.perf_counter() - t_start
    path = write_result("overhead", payload)

    print(f"[overhead] training step (no callback): {step_s * 1000:.0f} ms; one diagnostic adds {per_diag:.2f}s "
          f"(logged opd/seconds min {per_diag_logged:.2f}s) = {per_diag / step_s:.1f} training steps")
    print(f"[overhead] peak RSS increase: training step {mem_step['peak_increase_mib']:.1f} MiB, diagnostic "
          f"{mem_diag['peak_increase_mib']:.1f} MiB (RSS before: {mem_step['rss_before_mib']:.0f} / "
          f"{mem_diag['rss_before_mib']:.0f} MiB; {mem_diag['method']})")
    print(f"[overhead] for <= 10% overhead: every_n_steps >= {every_for_10} with the defaults, >= {cheap_every} with "
          f"the example's settings ({min(cheap_s) / (50 * step_s):.0%} at every 50)")
    print(f"[overhead] wrote {path} in {payload['total_seconds']:.0f}s")
    print(f"HEADLINE callback overhead at the default cadence ({cadence}, {n_done} diagnostics in "
          f"{args.steps} steps): median {overhead:+.1%} wall time over {len(pairs)} alternated pairs (per pair: "
          + ", ".join(f"{x:+.1%}" for x in pairs) + f"; minima {without:.1f}s -> {with_:.1f}s)")


if __name__ == "__main__":
    main()
