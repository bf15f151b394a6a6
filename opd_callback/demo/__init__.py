"""The demo: the training-free diagnostic on the offline toy lab (``make demo`` / ``python -m opd_callback.demo``).

Loads the toy lab shipped with the package — a weak student, a strong teacher, a wrong teacher trained on a no-carry
rule, and a *hard* wrong teacher (the strong teacher fine-tuned on that rule: wrong only at the decisive tokens) —
then scores six teacher configurations side by side on the same student rollouts and nodes:

* ``strong-teacher``   external teacher, reverse KL (TRL DistillationTrainer's default, beta=1)
* ``wrong-teacher``    external teacher that learned to drop carries
* ``hard-wrong-teacher`` the strong teacher fine-tuned to drop carries
* ``self+answer``      the student itself, given the final answer in its prompt
* ``self+solution``    the student itself, given the worked solution
* ``self+misleading``  the student itself, given a wrong answer

prints the summary table, and writes ``runs/demo/`` (records.parquet, rollouts.parquet, summary.json); then, unless
``--skip-training``, the three training runs of :mod:`opd_callback.demo.training`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from .configs import demo_configs, demo_settings  # noqa: E402
from .diagnose import run_diagnose  # noqa: E402
from .training import run_training_demos  # noqa: E402

__all__ = ["main", "demo_configs", "demo_settings", "run_diagnose", "run_training_demos"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opd_callback.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--prompts", type=int, default=24, help="probe prompts for the training-free diagnostic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller settings (for tests)")
    p.add_argument("--skip-training", action="store_true", help="only the training-free diagnostic")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the toy models are tiny, and more threads oversubscribe a "
                        "shared CPU; one thread was 23x faster than two under load)")
    return p


def _early_stopping_check(runs: dict) -> bool:
    """Print whether ``AlignmentEarlyStopping()`` stopped the wrong and hard wrong teachers' runs and let the strong
    teacher's run go to the end; returns that check."""
    ok = (not runs["strong"]["stopped_early"] and runs["wrong"]["stopped_early"]
          and runs["hard-wrong"]["stopped_early"])
    print(f"\n[demo] check: AlignmentEarlyStopping() with its defaults stopped the wrong teacher (at step "
          f"{runs['wrong']['steps_run']}) and the hard wrong teacher (at step {runs['hard-wrong']['steps_run']}) "
          f"and let the strong teacher run all {runs['strong']['max_steps']} steps: {'YES' if ok else 'NO'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    """``python -m opd_callback.demo``: the training-free diagnostic, then (unless ``--skip-training``) the training
    runs with early stopping; writes ``<out>/demo_result.json``."""
    args = _parser().parse_args(argv)
    import warnings

    import torch

    # transformers' deprecation notices (e.g. gradient_checkpointing -> activation_checkpointing) are not the demo's
    warnings.filterwarnings("ignore", category=FutureWarning)

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    t0 = time.perf_counter()
    result = {"diagnose": run_diagnose(out, args.prompts, args.seed, args.quick)}
    if not args.skip_training:
        runs = result["training"] = run_training_demos(out, seed=args.seed, quick=args.quick)
        result["early_stopping_as_expected"] = _early_stopping_check(runs)
    result["seconds_total"] = time.perf_counter() - t0
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\n[demo] done in {result['seconds_total']:.1f}s")
    return 0
