"""``opd-diagnose run``: score the plan's prompts one by one, saving a consistent report every ``--save-every`` prompts,
on Ctrl-C (status 130) and on an error (status 1), then print the tables and write the HTML report."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from opd_callback.cli.errors import PROG
from opd_callback.cli.output import print_ranking, write_html
from opd_callback.cli.plan import RunPlan, plan_run

__all__ = ["cmd_run"]

_TOTALS = ("rollouts", "nodes", "continuations", "tokens")


@dataclasses.dataclass
class RunProgress:
    """The prompts scored so far (a resumed run's included): their records and rollouts and the counters
    ``meta.json`` keeps; :meth:`snapshot` saves them as a consistent report."""

    out: Path
    meta_base: dict
    records: list[dict]
    rollouts: list[dict]
    totals: dict[str, int]
    completed: int
    seconds_before: float
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, plan: RunPlan, argv: list[str], completed: int) -> "RunProgress":
        """Progress at the start: empty, or the saved run's when resuming (``completed`` prompts already done)."""
        prev = plan.previous
        meta_prev = prev.meta if prev is not None else {}
        return cls(
            out=plan.out, meta_base=plan.meta(argv),
            records=[] if prev is None else prev.records.to_dict("records"),
            rollouts=[] if prev is None else prev.rollouts.to_dict("records"),
            totals={k: int(meta_prev.get(k, 0) or 0) for k in _TOTALS},
            completed=completed, seconds_before=float(meta_prev.get("seconds", 0.0) or 0.0),
        )

    def add(self, records: list[dict], rollouts: list[dict], stats: dict) -> None:
        """One more prompt scored: its records, rollouts and counts."""
        self.records.extend(records)
        self.rollouts.extend(rollouts)
        for k in self.totals:
            self.totals[k] += int(stats.get(k, 0))
        self.completed += 1

    def snapshot(self, interrupted: bool) -> Any:
        """Save everything scored so far into the output directory (atomically: :meth:`AlignmentReport.save` writes
        into a temporary directory and renames the files into place) and return the report."""
        import pandas as pd

        from opd_callback.report import AlignmentReport

        meta = {**self.meta_base, **self.totals, "seconds": self.seconds_before + time.perf_counter() - self.t0,
                "completed_prompts": self.completed, "interrupted": interrupted}
        rep = AlignmentReport(pd.DataFrame(self.records) if self.records else [],
                              pd.DataFrame(self.rollouts) if self.rollouts else [], meta)
        rep.save(self.out)
        return rep


def cmd_run(args: argparse.Namespace) -> int:
    """``opd-diagnose run``: 0 when every prompt is scored, 130 on Ctrl-C, 1 on an error while scoring (the prompts
    finished before either are saved); a bad argument raises :class:`CliError` before any prompt is scored."""
    from opd_callback.rollout.base import eval_mode

    plan = plan_run(args)
    todo = _prompts_to_do(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    progress = RunProgress.start(plan, getattr(args, "_argv", []) or [], len(plan.prepared) - len(todo))
    bar = None if args.no_progress else _progress_bar(len(plan.prepared), progress.completed)
    with eval_mode(plan.student, *plan.engine.teacher_models()):
        try:
            interrupted = _score_prompts(plan, progress, todo, bar)
        except Exception as exc:  # noqa: BLE001 - e.g. RewardFunctionError: save what is done, then report it
            return _fail(progress, bar, exc)
    if bar is not None:
        bar.close()
    return _finish(plan, progress, interrupted, write=not args.no_html)


def _prompts_to_do(plan: RunPlan) -> list:
    """The prepared prompts the saved run (when resuming) has not scored yet."""
    done = plan.previous.rollouts if plan.previous is not None else None
    done_idx = set(done["prompt_index"].tolist()) if done is not None and len(done) else set()
    return [p for p in plan.prepared if p.index not in done_idx]


def _progress_bar(total: int, initial: int) -> Any:
    """A tqdm bar over the prompts."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=PROG, unit="prompt", dynamic_ncols=True)


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own."""
    return list(tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False)) if len(ids) else []


def _score_prompts(plan: RunPlan, progress: RunProgress, todo: list, bar: Any) -> bool:
    """Score ``todo`` prompt by prompt (token strings added for the report), saving every ``save_every`` prompts;
    True when Ctrl-C stopped it."""
    save_every = plan.request["save_every"]
    n_correct = sum(bool(r["correct"]) for r in progress.rollouts)
    try:
        for i, prep in enumerate(todo):
            rec, rol, st = plan.engine.run_prompt(prep)
            for r in rec:
                r["candidate_tokens"] = _token_strings(plan.tokenizer, r["candidate_ids"])
            for r in rol:
                r["completion_tokens"] = _token_strings(plan.tokenizer, r["completion_ids"])
            progress.add(rec, rol, st)
            n_correct += sum(bool(r["correct"]) for r in rol)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(nodes=progress.totals["nodes"],
                                success=f"{n_correct / max(len(progress.rollouts), 1):.0%}")
            if save_every and (i + 1) % int(save_every) == 0 and i + 1 < len(todo):
                progress.snapshot(False)
    except KeyboardInterrupt:
        return True
    return False


def _fail(progress: RunProgress, bar: Any, exc: Exception) -> int:
    """An error while scoring: save the prompts finished before it, say so in one line or two; status 1."""
    if bar is not None:
        bar.close()
    saved = bool(progress.records or progress.rollouts)
    if saved:
        progress.snapshot(True)
    print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    if saved:
        print(f"{PROG}: the {progress.completed} prompts finished before the error are saved in {progress.out} "
              "(--resume continues)", file=sys.stderr)
    return 1


def _finish(plan: RunPlan, progress: RunProgress, interrupted: bool, write: bool) -> int:
    """Save the (complete or interrupted) report, write its HTML page (``write``), print the tables; 0 or 130."""
    out = plan.out
    report = progress.snapshot(interrupted)
    if write:
        write_html(report, out / "report.html", max_questions=int(plan.request["max_questions"]))
    print(report.format_table())
    print_ranking(report, plan.settings, progress.totals["nodes"])
    where = f"{out}" + ("" if not write else f" (open {out / 'report.html'})")
    if interrupted:
        print(f"\n{PROG}: interrupted: {progress.completed} of {len(plan.prepared)} prompts scored; partial report "
              f"saved to {where}; rerun with --resume to continue", file=sys.stderr)
        return 130
    print(f"\n{PROG}: {progress.completed} prompts scored; report saved to {where}")
    return 0
