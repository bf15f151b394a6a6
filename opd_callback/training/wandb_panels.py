"""wandb panels for one diagnostic: histograms, a per-token table, an HTML token heatmap.

Rules from the trainer integration (``WandbCallback`` defines ``train/global_step`` as the step metric of every key):
every row carries ``"train/global_step": step`` and ``wandb.log`` is never called with ``step=`` (wandb would drop rows
whose step is behind). wandb is imported lazily; call only on the main process.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from opd_callback.report.numeric import finite_or_none

__all__ = ["wandb_active", "WandbPanels"]

TABLE_KEY = "opd/tokens"
HEATMAP_KEY = "opd/heatmap"


def wandb_active(args: Any) -> bool:
    """``"wandb"`` is in ``args.report_to`` and a wandb run exists (it does only on the main process)."""
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    if "wandb" not in report_to and "all" not in report_to:
        return False
    try:
        import wandb
    except ImportError:
        return False
    return wandb.run is not None


class WandbPanels:
    """Logs the panels of each diagnostic into the active wandb run.

    The per-token table is one ``wandb.Table`` in ``INCREMENTAL`` mode (key ``opd/tokens``): each diagnostic appends
    its rows, so the table in the UI holds every diagnostic of the run, with a ``step`` column.
    """

    def __init__(self, configs: Sequence[str], max_heatmap_rollouts: int = 4, color_config: str | None = None) -> None:
        self.configs = list(configs)
        self.max_heatmap_rollouts = int(max_heatmap_rollouts)
        self.color_config = color_config or (self.configs[0] if self.configs else None)
        self._table = None
        self._table_run_id = None

    def columns(self) -> list[str]:
        cols = [
            "step",
            "prompt_index",
            "prompt",
            "rollout_index",
            "position",
            "token",
            "correct",
            "reward",
            "value",
            "covered_mass",
            "student_entropy",
        ]
        for c in self.configs:
            cols += [f"alignment/{c}", f"teacher_advantage/{c}", f"degenerate/{c}"]
        return cols

    def table_rows(self, report: Any, step: int) -> list[list[Any]]:
        rec = report.records
        if rec.empty:
            return []
        prompts = {}
        if not report.rollouts.empty:
            for r in report.rollouts[["prompt_index", "prompt"]].drop_duplicates("prompt_index").to_dict("records"):
                prompts[int(r["prompt_index"])] = str(r["prompt"])
        rows: dict[tuple[int, int, int], list[Any]] = {}
        slots = {c: i for i, c in enumerate(self.configs)}
        base = 11
        for r in rec.to_dict("records"):
            key = (int(r["prompt_index"]), int(r["rollout_index"]), int(r["position"]))
            row = rows.get(key)
            if row is None:
                row = [
                    int(step),
                    key[0],
                    prompts.get(key[0], ""),
                    key[1],
                    key[2],
                    str(r["token"]),
                    bool(r["rollout_correct"]),
                    finite_or_none(r["rollout_reward"]),
                    finite_or_none(r["value"]),
                    finite_or_none(r["covered_mass"]),
                    finite_or_none(r["student_entropy"]),
                ] + [None] * (3 * len(self.configs))
                rows[key] = row
            i = slots.get(r["config"])
            if i is None:
                continue
            deg = bool(r["degenerate"])
            row[base + 3 * i] = None if deg else finite_or_none(r["alignment"])
            row[base + 3 * i + 1] = finite_or_none(r["teacher_advantage"])
            row[base + 3 * i + 2] = deg
        return [rows[k] for k in sorted(rows)]

    def histograms(self, report: Any) -> dict[str, Any]:
        import wandb

        out = {}
        rec = report.records
        if rec.empty:
            return out
        valid = rec[~rec["degenerate"].astype(bool)]
        for c in self.configs:
            part = valid[valid["config"] == c]
            for name, sub in (
                ("all", part),
                ("correct", part[part["rollout_correct"].astype(bool)]),
                ("incorrect", part[~part["rollout_correct"].astype(bool)]),
            ):
                vals = [v for v in sub["alignment"].astype(float).tolist() if not math.isnan(v)]
                if vals:
                    out[f"opd/{c}/alignment_hist/{name}"] = wandb.Histogram(vals, num_bins=min(64, max(4, len(vals))))
        return out

    def log(self, report: Any, step: int, decode: Callable[[Sequence[int]], str]) -> list[str]:
        """Log one diagnostic's panels in one row; returns the keys logged."""
        import wandb

        from opd_callback.report.html import token_heatmap_html

        row: dict[str, Any] = dict(self.histograms(report))
        run_id = getattr(wandb.run, "id", None)
        if self._table is None or self._table_run_id != run_id:
            self._table = wandb.Table(columns=self.columns(), log_mode="INCREMENTAL", allow_mixed_types=True)
            self._table_run_id = run_id
        rows = self.table_rows(report, step)
        for r in rows:
            self._table.add_data(*r)
        if rows:
            row[TABLE_KEY] = self._table
        if self.max_heatmap_rollouts > 0 and not report.rollouts.empty:
            page = token_heatmap_html(
                report.records,
                report.rollouts,
                decode,
                color_config=self.color_config,
                configs=self.configs,
                max_rollouts=self.max_heatmap_rollouts,
                title=f"step {int(step)}",
            )
            row[HEATMAP_KEY] = wandb.Html(page, inject=False, data_is_not_path=True)
        if not row:
            return []
        row["train/global_step"] = int(step)
        wandb.log(row)
        return sorted(k for k in row if k != "train/global_step")
