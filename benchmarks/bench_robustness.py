"""Do the verdicts hold across labs? Five independently trained toy labs, every metric, early stopping.

A lab trained on another machine is another lab (training is seeded, but float order differs between CPUs and thread
counts, and training amplifies it). This benchmark trains (or loads) several labs -- seeds 0..3 with one thread per
process, seed 4 with two -- and measures on each:

1. **Training-free diagnostic** (the demo's settings and configurations, the hard wrong teacher included): every
   configuration-level metric of :data:`opd_callback.report.stats.METRICS` with its question-bootstrap CI, and whether
   the paired CI of ``strong - bad`` excludes 0 for each bad configuration (wrong, hard-wrong, misleading), at the full
   probe budget and at half of it (the first half of the probe questions).
2. **Early stopping**: ``DistillationTrainer`` runs with the strong, the wrong and the hard-wrong teacher as the
   trainer's teacher and ``AlignmentEarlyStopping()`` with its defaults (the demo's training settings): does it stop,
   and when.

Writes ``benchmarks/results/robustness.json`` and prints a per-lab table. Usage::

    python benchmarks/bench_robustness.py                 # all phases (about 25 min on 2 cores with labs cached)
    python benchmarks/bench_robustness.py --phase diagnose
    python benchmarks/bench_robustness.py --phase train --labs 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

LABS = [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2)]  # (seed, training threads per process)
BAD = ("wrong-teacher", "hard-wrong-teacher", "self+misleading")
DEMO_LR = 1e-4  # opd_callback.demo.training's learning rate


def lab_name(seed: int, threads: int) -> str:
    return f"seed{seed}" + (f"-threads{threads}" if threads != 1 else "")


def load(seed: int, threads: int, cache_dir: str | None):
    from opd_callback import toy

    return toy.build_lab(cache_dir=cache_dir, seed=seed, threads=threads, verbose=True)


SELECTIONS = ("entropy", "depth_windows")


def diagnose_lab(lab, out: Path, n_prompts: int) -> dict:
    """The demo's training-free diagnostic on ``lab``, once per node selection; every metric at full and half budget."""
    result = {}
    for sel in SELECTIONS:
        result[sel] = _diagnose_one(lab, out / f"diag-{sel}", n_prompts, sel)
    return result


def _diagnose_one(lab, rec: Path, n_prompts: int, selection: str) -> dict:
    import opd_callback as oc
    from opd_callback import toy
    from opd_callback.demo.configs import demo_configs, demo_settings
    from opd_callback.report import stats

    if (rec / "records.parquet").exists():
        report = oc.AlignmentReport.load(rec)
    else:
        t0 = time.perf_counter()
        report = oc.diagnose(lab.student, lab.tokenizer, lab.probe_examples[:n_prompts], reward_fn=toy.reward_fn,
                             configs=demo_configs(lab), settings=demo_settings(0, node_selection=selection),
                             progress=False)
        report.meta["wall_seconds"] = time.perf_counter() - t0
        report.save(rec)
    result = {"success_rate": report.success_rate, "nodes": report.n_nodes,
              "continuations": report.meta.get("continuations"), "seconds": report.meta.get("wall_seconds")}
    budgets = (("full", report), ("half", _first_questions(report, n_prompts // 2)),
               ("third", _first_questions(report, n_prompts // 3)))
    for label, rep in budgets:
        table = stats.metric_table(rep)
        table = table[table["subset"] == "all"]
        per = {}
        for metric in stats.METRICS:
            t = table[table["metric"] == metric].set_index("config")
            diffs = stats.metric_differences(rep, metric, reference="strong-teacher").set_index("config")
            per[metric] = {
                c: {"value": _num(t.loc[c, "value"]), "ci": [_num(t.loc[c, "ci_low"]), _num(t.loc[c, "ci_high"])],
                    "diff_vs_strong": _num(diffs.loc[c, "diff"]),
                    "diff_ci": [_num(diffs.loc[c, "diff_ci_low"]), _num(diffs.loc[c, "diff_ci_high"])]}
                for c in t.index
            }
            per[metric]["separates"] = {b: bool(per[metric][b]["diff_ci"][1] is not None
                                                and per[metric][b]["diff_ci"][1] < 0) for b in BAD}
            # absolute verdicts at 0, no reference needed: the bad configuration's CI below 0, the strong one's above
            per[metric]["bad_below_zero"] = {b: bool(per[metric][b]["ci"][1] is not None
                                                     and per[metric][b]["ci"][1] < 0) for b in BAD}
            lo = per[metric]["strong-teacher"]["ci"][0]
            per[metric]["strong_above_zero"] = bool(lo is not None and lo > 0)
            value = {c: _num(t.loc[c, "value"]) for c in t.index}
            per[metric]["ranking"] = sorted(t.index, key=lambda c: -(value[c] if value[c] is not None else -9))
        result[label] = per
    by_corr = {}
    for subset in ("correct", "incorrect"):
        table = stats.metric_table(report)
        t = table[(table["subset"] == subset) & (table["metric"] == "alignment_mean")].set_index("config")
        by_corr[subset] = {c: _num(t.loc[c, "value"]) for c in t.index}
    result["alignment_by_correctness"] = by_corr
    both = [c for c in by_corr["correct"] if by_corr["correct"][c] is not None
            and by_corr["incorrect"].get(c) is not None]
    result["incorrect_higher"] = f"{sum(by_corr['incorrect'][c] > by_corr['correct'][c] for c in both)}/{len(both)}"
    return result


def _first_questions(report, n: int):
    """The report restricted to its first ``n`` questions (a smaller probe budget, same nodes)."""
    import opd_callback as oc

    keep = sorted(report.records["prompt_index"].unique())[:n]
    rec = report.records[report.records["prompt_index"].isin(keep)].reset_index(drop=True)
    rol = report.rollouts[report.rollouts["prompt_index"].isin(keep)].reset_index(drop=True)
    return oc.AlignmentReport(rec, rol, report.meta)


def _num(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


#: Early-stopping rules replayed on every run's saved diagnostics ("default" is AlignmentEarlyStopping()).
RULES = {
    "default": {},
    "patience=1": {"patience": 1},
    "patience=3": {"patience": 3},
    "absolute only": {"relative": False},
    "relative only": {"threshold": None},
    "margin=0": {"margin": 0.0},
    "margin=0.1": {"margin": 0.1},
    "margin=0.15": {"margin": 0.15},
    "margin=0.5": {"margin": 0.5},
    "patience=1, margin=0.1": {"patience": 1, "margin": 0.1},
    "patience=1, margin=0.5": {"patience": 1, "margin": 0.5},
    "patience=1, absolute only": {"patience": 1, "relative": False},
    "step_alignment<0": {"metric": "step_alignment"},
    "alignment_weighted<0": {"metric": "alignment_weighted"},
    "teacher_advantage<0": {"metric": "teacher_advantage", "relative": False},
    "alignment<0.5 (old README)": {"metric": "alignment", "threshold": 0.5, "relative": False},
}


def load_diagnostics(records_dir: Path) -> list:
    """``(step, config_summary, report)`` of every diagnostic a run saved, in step order."""
    import opd_callback as oc

    steps = sorted(int(p.name.split("-")[1]) for p in records_dir.glob("step-*") if (p / "records.parquet").exists())
    out = []
    for step in steps:
        rep = oc.AlignmentReport.load(records_dir / f"step-{step:07d}")
        out.append((step, rep.config_summary(), rep))
    return out


def replay(diagnostics: list, kwargs: dict) -> dict:
    """Feed a run's saved diagnostics, in step order, to a fresh ``AlignmentEarlyStopping(**kwargs)``: the decision
    depends only on each diagnostic's report, so this is the decision the live callback takes."""
    import opd_callback as oc

    es = oc.AlignmentEarlyStopping(**kwargs)
    trace = []
    for step, summary, rep in diagnostics:
        d = es.update(step, summary, rep)
        trace.append({"step": step, "status": d["status"], "value": _num(d["value"]), "beaten_by": d["beaten_by"]})
        if d["stop"]:
            return {"stopped_at": step, "trace": trace}
    return {"stopped_at": None, "trace": trace}


def train_lab(lab, out: Path, seed: int, lr: float) -> dict:
    """The demo's three training runs without early stopping (every diagnostic saved), then every rule replayed."""
    from opd_callback.demo.training import early_stopping_runs

    runs = {}
    out = out / f"lr{lr:g}"
    for name in ("strong", "wrong", "hard-wrong"):
        rec = out / f"train-{name}" / "opd_alignment"
        if rec.is_dir() and any(rec.glob("step-0000040")):
            runs[name] = {"records_dir": str(rec)}
        else:
            runs[name] = early_stopping_runs(lab, out, seed=seed, which=(name,), early_stopping=False,
                                             learning_rate=lr)[name]
    result = {}
    for name, run in runs.items():
        diags = load_diagnostics(Path(run["records_dir"]))
        result[name] = {
            "success_rate": [[step, _num(rep.success_rate)] for step, _, rep in diags],
            "seconds": run.get("seconds"),
            "rules": {rule: replay(diags, kw) for rule, kw in RULES.items()},
        }
    return result


def print_tables(results: dict) -> None:
    from opd_callback.report import stats

    labs = list(results["labs"])
    for selection, metric in [(sel, m) for sel in SELECTIONS for m in stats.METRICS]:
        print(f"\n== {metric}, nodes by {selection} (full budget; * = paired CI of strong - bad excludes 0) ==")
        configs = None
        for name in labs:
            d = results["labs"][name].get("diagnose", {}).get(selection, {}).get("full", {}).get(metric)
            if not d:
                continue
            verdicts = ("separates", "ranking", "bad_below_zero", "strong_above_zero")
            configs = configs or [c for c in d if c not in verdicts]
            if name == labs[0]:
                print(f"{'lab':<16}" + "".join(f"{c[:18]:>20}" for c in configs))
            cells = []
            for c in configs:
                v = d[c]["value"]
                star = "*" if c in d["separates"] and d["separates"][c] else " "
                cells.append(f"{'nan' if v is None else format(v, '+.3f')}{star}".rjust(20))
            print(f"{name:<16}" + "".join(cells))
        seps = [sum(results["labs"][n]["diagnose"][selection]["full"][metric]["separates"][b] for n in labs
                    if "diagnose" in results["labs"][n]) for b in BAD]
        print("separates strong from " + ", ".join(f"{b}: {s}/{len(labs)}" for b, s in zip(BAD, seps)))
    print("\n== summary over labs: paired separation of strong from each bad configuration / bad CI below 0 / strong "
          "CI above 0 ==")
    names = [n for n in labs if "diagnose" in results["labs"][n]]
    for selection in SELECTIONS:
        for budget in ("full", "half", "third"):
            cells = []
            for metric in stats.METRICS:
                sep = below = above = 0
                for n in names:
                    d = results["labs"][n]["diagnose"][selection].get(budget, {}).get(metric)
                    if not d:
                        continue
                    sep += sum(d["separates"].values())
                    below += sum(d.get("bad_below_zero", {}).values())
                    above += bool(d.get("strong_above_zero"))
                cells.append(f"{metric}: {sep}/{3 * len(names)} {below}/{3 * len(names)} {above}/{len(names)}")
            print(f"{selection:<14} {budget:<6} " + " | ".join(cells))
    print("\n== early stopping (40 steps, a diagnostic every 5): step where each rule stops each run, '-' = never ==")
    trained = [n for n in labs if results["labs"][n].get("train")]
    for rule in RULES:
        cells = []
        counts = {"strong": 0, "wrong": 0, "hard-wrong": 0}
        for n in trained:
            tr = results["labs"][n]["train"]
            cell = []
            for run in ("strong", "wrong", "hard-wrong"):
                at = tr[run]["rules"].get(rule, {}).get("stopped_at", "?")
                counts[run] += at is not None
                cell.append("-" if at is None else str(at))
            cells.append("/".join(cell))
        print(f"{rule:<28}" + "".join(f"{c:>12}" for c in cells)
              + f"   stops strong {counts['strong']}/{len(trained)}, wrong {counts['wrong']}/{len(trained)}, "
                f"hard-wrong {counts['hard-wrong']}/{len(trained)}")
    print(f"{'(strong/wrong/hard-wrong)':<28}" + "".join(f"{n:>12}" for n in trained))


def markdown(results: dict) -> str:
    """The README's tables: per lab (decision metric and early stopping), metrics compared, stopping rules compared."""
    from opd_callback.report import stats

    labs = [n for n in results["labs"] if "diagnose" in results["labs"][n]]
    out = ["| lab (CPU threads) | student / strong / wrong / hard-wrong acc. | teacher_gain: strong | wrong "
           "| hard-wrong | misleading | self+solution | early stop (strong / wrong / hard-wrong) |", "|" + "---|" * 8]
    for n in labs:
        e = results["labs"][n]
        acc = e["accuracy"]
        d = e["diagnose"]["entropy"]["full"]["teacher_gain"]

        def cell(c):
            v, (lo, hi) = d[c]["value"], d[c]["ci"]
            star = "*" if c in d["separates"] and d["separates"][c] else ""
            return f"{v:+.2f} [{lo:+.2f}, {hi:+.2f}]{star}"

        tr = e.get("train", {})
        stops = " / ".join(
            "—" if tr.get(r, {}).get("rules", {}).get("default", {}).get("stopped_at") is None
            else f"step {tr[r]['rules']['default']['stopped_at']}" for r in ("strong", "wrong", "hard-wrong"))
        out.append(f"| {n} ({e['lab']['threads']}) | {acc['student']:.2f} / {acc['strong_teacher']:.2f} / "
                   f"{acc['wrong_teacher']:.2f} / {acc['hard_wrong_teacher']:.2f} | {cell('strong-teacher')} | "
                   f"{cell('wrong-teacher')} | {cell('hard-wrong-teacher')} | {cell('self+misleading')} | "
                   f"{cell('self+solution')} | {stops} |")
    out += ["", "| nodes | budget | " + " | ".join(stats.METRICS) + " |", "|---|---|" + "---|" * len(stats.METRICS)]
    for selection in SELECTIONS:
        for budget, label in (("full", "24 prompts"), ("half", "12 prompts"), ("third", "8 prompts")):
            cells = []
            for metric in stats.METRICS:
                sep = below = above = 0
                for n in labs:
                    d = results["labs"][n]["diagnose"][selection][budget][metric]
                    sep += sum(d["separates"].values())
                    below += sum(d["bad_below_zero"].values())
                    above += bool(d["strong_above_zero"])
                cells.append(f"{sep}/{3 * len(labs)} · {below}/{3 * len(labs)} · {above}/{len(labs)}")
            out.append(f"| {selection} | {label} | " + " | ".join(cells) + " |")
    trained = [n for n in labs if results["labs"][n].get("train")]
    out += ["", "| rule (replayed on every run's diagnostics) | stops strong | stops wrong | stops hard-wrong |",
            "|---|---|---|---|"]
    for rule in RULES:
        c = {r: sum(results["labs"][n]["train"][r]["rules"].get(rule, {}).get("stopped_at") is not None
                    for n in trained) for r in ("strong", "wrong", "hard-wrong")}
        out.append(f"| `{rule}` | {c['strong']}/{len(trained)} | {c['wrong']}/{len(trained)} | "
                   f"{c['hard-wrong']}/{len(trained)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labs", type=int, nargs="*", default=None, help="lab indices into LABS (default all)")
    p.add_argument("--phase", choices=["all", "diagnose", "train", "print", "markdown"], default="all")
    p.add_argument("--cache-dir", default=None, help="toy-lab cache (default $OPD_TOY_CACHE or ~/.cache/...)")
    p.add_argument("--work", default="runs/robustness", help="records of every run (not committed)")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the training runs (the demo's)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    path = RESULTS / "robustness.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("labs", {})
    chosen = [LABS[i] for i in (args.labs if args.labs is not None else range(len(LABS)))]
    if args.phase == "markdown":
        print(markdown(results))
        return 0
    for seed, threads in chosen if args.phase != "print" else []:
        name = lab_name(seed, threads)
        lab = load(seed, threads, args.cache_dir)
        entry = results["labs"].setdefault(name, {})
        entry["accuracy"] = lab.accuracy
        entry["lab"] = {"seed": seed, "threads": threads, "path": str(lab.path), "cpu": lab.meta.get("cpu")}
        out = Path(args.work) / name
        if args.phase in ("all", "diagnose"):
            entry["diagnose"] = diagnose_lab(lab, out, args.prompts)
        if args.phase in ("all", "train"):
            entry.setdefault("train_by_lr", {})[f"{args.lr:g}"] = train_lab(lab, out, seed=0, lr=args.lr)
            if args.lr == DEMO_LR:
                entry["train"] = entry["train_by_lr"][f"{args.lr:g}"]
        write_result("robustness", {k: v for k, v in results.items() if k not in ("benchmark", "date", "machine")})
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
