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
        oc.TeacherConfig("hard-wrong-teacher", oc.ExternalTeacher(lab.hard_wrong_teacher), divergence="reverse_kl"),
        oc.TeacherConfig("self+answer", oc.ContextTeacher(toy.ANSWER_TEMPLATE), divergence="reverse_kl"),
        oc.TeacherConfig("self+solution", oc.ContextTeacher(toy.SOLUTION_TEMPLATE), divergence="reverse_kl"),
        oc.TeacherConfig("self+misleading", oc.ContextTeacher(toy.MISLEADING_TEMPLATE), divergence="reverse_kl"),
    ]


def demo_settings(seed: int = 0, quick: bool = False, node_selection: str = "entropy"):
    """The demo's settings. Nodes at the highest-entropy positions of each rollout (the student's forking tokens):
    on five toy labs they separate good from bad teachers with far fewer nodes than depth windows
    (benchmarks/bench_robustness.py)."""
    import opd_callback as oc

    return oc.RolloutSettings(
        num_rollouts=4 if not quick else 2,
        max_new_tokens=48,
        node_selection=node_selection,
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
    from opd_callback.report import stats

    dm = stats.DECISION_METRIC
    rk = report.ranking(reference="strong-teacher")
    print(f"\n[demo] ranking by {dm}:", " > ".join(rk["config"]))
    bad = ("wrong-teacher", "hard-wrong-teacher", "self+misleading")
    row = rk.set_index("config")
    below = all(bool(row.loc[b, "diff_ci_high"] < 0) for b in bad)
    negative = all(bool(row.loc[b, "value"] < 0) for b in bad)
    print(f"[demo] check: wrong, hard-wrong and misleading configurations rank below the strong teacher, each by a "
          f"paired CI that excludes 0: {'YES' if below else 'NO'}")
    print(f"[demo] check: their {dm} is below 0 (adopting them where they differ from the student loses success): "
          f"{'YES' if negative else 'NO'}")
    summary = report.config_summary()
    al = {r["config"]: r["alignment_mean"] for r in summary}
    print(f"[demo] for comparison, mean alignment: hard-wrong-teacher {al['hard-wrong-teacher']:+.3f} vs "
          f"strong-teacher {al['strong-teacher']:+.3f} (a mean of per-token cosines weighs every token alike)")
    higher = []
    for r in summary:
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
        "bad_rank_below_strong": below,
        "bad_below_zero": negative,
        "incorrect_higher": f"{sum(higher)}/{len(higher)}",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_callback.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--prompts", type=int, default=24, help="probe prompts for the training-free diagnostic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller settings (for tests)")
    p.add_argument("--skip-training", action="store_true", help="only the training-free diagnostic")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the toy models are tiny, and more threads oversubscribe a "
                        "shared CPU; one thread was 23x faster than two under load)")
    args = p.parse_args(argv)
    import warnings

    import torch

    # transformers' deprecation notices (e.g. gradient_checkpointing -> activation_checkpointing) are not the demo's
    warnings.filterwarnings("ignore", category=FutureWarning)

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    t0 = time.perf_counter()
    result = {"diagnose": run_diagnose(out, args.prompts, args.seed, args.quick)}
    if not args.skip_training:
        try:
            from opd_callback.demo.training import run_training_demos
        except ImportError:
            run_training_demos = None
        if run_training_demos is not None:
            runs = result["training"] = run_training_demos(out, seed=args.seed, quick=args.quick)
            ok = (not runs["strong"]["stopped_early"] and runs["wrong"]["stopped_early"]
                  and runs["hard-wrong"]["stopped_early"])
            print(f"\n[demo] check: AlignmentEarlyStopping() with its defaults stopped the wrong teacher (at step "
                  f"{runs['wrong']['steps_run']}) and the hard wrong teacher (at step {runs['hard-wrong']['steps_run']}) "
                  f"and let the strong teacher run all {runs['strong']['max_steps']} steps: {'YES' if ok else 'NO'}")
            result["early_stopping_as_expected"] = ok
    result["seconds_total"] = time.perf_counter() - t0
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\n[demo] done in {result['seconds_total']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
