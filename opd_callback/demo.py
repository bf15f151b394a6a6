"""The demo: the training-free diagnostic on the offline toy lab (``make demo`` / ``python -m opd_callback.demo``).

Builds (or loads from cache) the toy lab — a weak student, a strong teacher, a wrong teacher trained on a no-carry
rule — then scores five teacher configurations side by side on the same student rollouts and nodes:

* ``strong-teacher``   external teacher, reverse KL (TRL DistillationTrainer's default, beta=1)
* ``wrong-teacher``    external teacher that learned to drop carries
* ``self+answer``      the student itself, given the final answer in its prompt
* ``self+solution``    the student itself, given the worked solution
* ``self+misleading``  the student itself, given a wrong answer

prints the summary table, and writes ``runs/demo/`` (records.parquet, rollouts.parquet, summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def demo_configs(lab):
    import opd_callback as oc
    from opd_callback import toy

    return [
        oc.TeacherConfig("strong-teacher", oc.ExternalTeacher(lab.strong_teacher), divergence="reverse_kl"),
        oc.TeacherConfig("wrong-teacher", oc.ExternalTeacher(lab.wrong_teacher), divergence="reverse_kl"),
        oc.TeacherConfig("self+answer", oc.ContextTeacher(toy.ANSWER_TEMPLATE), divergence="reverse_kl"),
        oc.TeacherConfig("self+solution", oc.ContextTeacher(toy.SOLUTION_TEMPLATE), divergence="reverse_kl"),
        oc.TeacherConfig("self+misleading", oc.ContextTeacher(toy.MISLEADING_TEMPLATE), divergence="reverse_kl"),
    ]


def demo_settings(seed: int = 0, quick: bool = False):
    import opd_callback as oc

    return oc.RolloutSettings(
        num_rollouts=4 if not quick else 2,
        max_new_tokens=48,
        node_selection="depth_windows",
        nodes_per_window=2,
        max_nodes_per_rollout=10,
        top_k=4,
        teacher_top_k=2,
        rollouts_per_branch=8 if not quick else 4,
        batch_size=256,
        seed=seed,
    )


def run_diagnose(out_dir: Path, n_prompts: int, seed: int, quick: bool = False) -> dict:
    import opd_callback as oc
    from opd_callback import toy

    t0 = time.perf_counter()
    lab = toy.build_lab(seed=seed)
    t_lab = time.perf_counter() - t0
    print(f"\n[demo] toy lab ready in {t_lab:.1f}s at {lab.path}")
    for k, v in lab.accuracy.items():
        print(f"[demo]   sampled accuracy {k:<18} {v:6.1%}")
    probe = lab.probe_examples[:n_prompts]
    configs = demo_configs(lab)
    settings = demo_settings(seed, quick)
    t1 = time.perf_counter()
    report = oc.diagnose(
        lab.student, lab.tokenizer, probe, reward_fn=toy.reward_fn, configs=configs, settings=settings
    )
    t_diag = time.perf_counter() - t1
    report.save(out_dir)
    print(
        f"\n[demo] diagnostic: {len(probe)} prompts, {report.meta['rollouts']} rollouts, {report.meta['nodes']} nodes, "
        f"{report.meta['continuations']} continuations in {t_diag:.1f}s; student success rate "
        f"{report.success_rate:.1%}\n"
    )
    print(report.format_table())
    rows = {r["config"]: r for r in report.config_summary()}
    ranked = sorted(rows.values(), key=lambda r: -(r["alignment_mean"] if r["alignment_mean"] is not None else -9))
    print("\n[demo] ranking by mean alignment:", " > ".join(r["config"] for r in ranked))
    bad = {"wrong-teacher", "self+misleading"}
    worst_two = {r["config"] for r in ranked[-2:]}
    print(f"[demo] wrong and misleading configurations rank worst: {'YES' if worst_two == bad else 'NO'}")
    higher = []
    for r in ranked:
        c, i = r["alignment_correct"], r["alignment_incorrect"]
        if c is not None and i is not None:
            higher.append(i > c)
    print(
        f"[demo] paper finding 'alignment higher on incorrect than on correct rollouts' holds for "
        f"{sum(higher)}/{len(higher)} configurations with both kinds of rollouts"
    )
    print(f"[demo] records, rollouts and summary.json written to {out_dir}")
    return {
        "seconds_lab": t_lab,
        "seconds_diagnose": t_diag,
        "worst_are_bad": worst_two == bad,
        "incorrect_higher": f"{sum(higher)}/{len(higher)}",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_callback.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--prompts", type=int, default=24, help="probe prompts for the training-free diagnostic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller settings (for tests)")
    p.add_argument("--skip-training", action="store_true", help="only the training-free diagnostic")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    result = {"diagnose": run_diagnose(out, args.prompts, args.seed, args.quick)}
    if not args.skip_training:
        try:
            from .demo_training import run_training_demos
        except ImportError:
            run_training_demos = None
        if run_training_demos is not None:
            result["training"] = run_training_demos(out, seed=args.seed, quick=args.quick)
    result["seconds_total"] = time.perf_counter() - t0
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\n[demo] done in {result['seconds_total']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
