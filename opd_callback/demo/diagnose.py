"""The training-free half of the demo: the six configurations scored side by side on the toy lab's student rollouts,
the summary table, the ranking by the decision metric and the demo's checks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .configs import demo_configs, demo_settings

#: The configurations the demo expects to rank below the strong teacher, with a decision metric below 0.
BAD_CONFIGS = ("wrong-teacher", "hard-wrong-teacher", "self+misleading")


def _load_lab(seed: int) -> tuple[Any, float]:
    """The toy lab of ``seed`` and the seconds it took to load (or build); prints its sampled accuracies."""
    from opd_callback import toy

    t0 = time.perf_counter()
    lab = toy.build_lab(seed=seed)
    seconds = time.perf_counter() - t0
    print(f"\n[demo] toy lab ready in {seconds:.1f}s at {lab.path}")
    for k, v in lab.accuracy.items():
        print(f"[demo]   sampled accuracy {k:<18} {v:6.1%}")
    return lab, seconds


def _ranking_checks(report: Any) -> tuple[bool, bool]:
    """Print the ranking by the decision metric and whether the bad configurations rank below the strong teacher (by
    a paired CI that excludes 0) and score below 0; returns those two checks."""
    from opd_callback.report import stats

    dm = stats.DECISION_METRIC
    rk = report.ranking(reference="strong-teacher")
    print(f"\n[demo] ranking by {dm}:", " > ".join(rk["config"]))
    row = rk.set_index("config")
    below = all(bool(row.loc[b, "diff_ci_high"] < 0) for b in BAD_CONFIGS)
    negative = all(bool(row.loc[b, "value"] < 0) for b in BAD_CONFIGS)
    print(f"[demo] check: wrong, hard-wrong and misleading configurations rank below the strong teacher, each by a "
          f"paired CI that excludes 0: {'YES' if below else 'NO'}")
    print(f"[demo] check: their {dm} is below 0 (adopting them where they differ from the student loses success): "
          f"{'YES' if negative else 'NO'}")
    return below, negative


def _alignment_comparison(report: Any) -> list[bool]:
    """Print the mean alignments of the hard wrong and the strong teacher, and for how many configurations alignment
    is higher on incorrect than on correct rollouts; returns that finding per configuration with both kinds."""
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
    return higher


def run_diagnose(out_dir: Path, n_prompts: int, seed: int, quick: bool = False) -> dict:
    """The training-free diagnostic on the first ``n_prompts`` probe prompts of the toy lab of ``seed``: saves the
    report to ``out_dir``, prints the table, the ranking and the checks; returns their JSON-able summary."""
    import opd_callback as oc
    from opd_callback import toy

    lab, t_lab = _load_lab(seed)
    probe = lab.probe_examples[:n_prompts]
    t1 = time.perf_counter()
    report = oc.diagnose(
        lab.student, lab.tokenizer, probe, reward_fn=toy.reward_fn, configs=demo_configs(lab),
        settings=demo_settings(seed, quick),
    )
    t_diag = time.perf_counter() - t1
    report.save(out_dir)
    print(
        f"\n[demo] diagnostic: {len(probe)} prompts, {report.meta['rollouts']} rollouts, {report.meta['nodes']} nodes, "
        f"{report.meta['continuations']} continuations in {t_diag:.1f}s; student success rate "
        f"{report.success_rate:.1%}\n"
    )
    print(report.format_table())
    below, negative = _ranking_checks(report)
    higher = _alignment_comparison(report)
    print(f"[demo] records, rollouts and summary.json written to {out_dir}")
    return {
        "seconds_lab": t_lab,
        "seconds_diagnose": t_diag,
        "bad_rank_below_strong": below,
        "bad_below_zero": negative,
        "incorrect_higher": f"{sum(higher)}/{len(higher)}",
    }
