"""``AlignmentReport``: per-token records, rollouts, and the statistics users look at (method.md §6).

Confidence intervals come from a bootstrap that resamples **questions** (prompts): nodes of one question are not
independent. Degenerate nodes (``|g|`` or ``|d|`` below eps) are counted but excluded from alignment statistics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from opd_callback.report import stats
from opd_callback.report.bootstrap import bootstrap_mean_ci, bootstrap_settings
from opd_callback.report.numeric import finite_or_none
from opd_callback.report.records import (
    EXTRA_RECORD_COLUMNS,
    RECORD_COLUMNS,
    REQUIRED_RECORD_COLUMNS,
    ROLLOUT_COLUMNS,
    SUBSETS,
)
from opd_callback.report.selection import subset_rows

__all__ = ["AlignmentReport", "bootstrap_mean_ci", "RECORD_COLUMNS", "EXTRA_RECORD_COLUMNS", "ROLLOUT_COLUMNS"]


def _lists(df: pd.DataFrame) -> pd.DataFrame:
    """Parquet returns list columns as numpy arrays: turn them back into Python lists."""
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
    return df


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The non-empty frames, concatenated (the first frame when every one is empty)."""
    return pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)


# config_summary fields from the summary table: (field, subset, column), in the order of summary.json; a pair of
# columns gives a [low, high] list, an ``n_*`` column an int, any other a float (None where not finite)
_CONFIG_FIELDS: tuple[tuple[str, str, str | tuple[str, str]], ...] = (
    ("alignment_mean", "all", "alignment_mean"), ("alignment_median", "all", "alignment_median"),
    ("alignment_correct", "correct", "alignment_mean"), ("alignment_incorrect", "incorrect", "alignment_mean"),
    ("ci_low", "all", "ci_low"), ("ci_high", "all", "ci_high"),
    ("ci_correct", "correct", ("ci_low", "ci_high")), ("ci_incorrect", "incorrect", ("ci_low", "ci_high")),
    ("positive_fraction", "all", "positive_fraction"), ("degenerate_fraction", "all", "degenerate_fraction"),
    ("degenerate_fraction_correct", "correct", "degenerate_fraction"),
    ("degenerate_fraction_incorrect", "incorrect", "degenerate_fraction"),
    ("teacher_advantage", "all", "teacher_advantage"),
    ("n_nodes", "all", "n_nodes"), ("n_nodes_correct", "correct", "n_nodes"),
    ("n_nodes_incorrect", "incorrect", "n_nodes"), ("n_questions", "all", "n_questions"),
)


def _summary_field(part: pd.DataFrame, subset: str, column: str | tuple[str, str]) -> Any:
    """One :data:`_CONFIG_FIELDS` value from a configuration's summary rows (indexed by subset)."""
    if isinstance(column, tuple):
        return [finite_or_none(part.loc[subset, c]) for c in column]
    if column.startswith("n_"):
        return int(part.loc[subset, column])
    return finite_or_none(part.loc[subset, column])


class AlignmentReport:
    """The result of a diagnostic.

    Attributes:
        records: ``pandas.DataFrame``, one row per (node, configuration); columns :data:`RECORD_COLUMNS` (plus
            ``step`` when read from a training run). ``alignment`` is NaN where ``degenerate``.
        rollouts: ``pandas.DataFrame``, one row per base rollout; columns :data:`ROLLOUT_COLUMNS`.
        meta: settings, configurations, cost counters (``rollouts``, ``nodes``, ``continuations``, ``tokens``,
            ``seconds``).
    """

    def __init__(self, records: Any, rollouts: Any, meta: dict | None = None) -> None:
        self.records = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records), columns=None)
        if self.records.empty:
            self.records = pd.DataFrame(columns=RECORD_COLUMNS)
        self.rollouts = rollouts if isinstance(rollouts, pd.DataFrame) else pd.DataFrame(list(rollouts))
        if self.rollouts.empty:
            self.rollouts = pd.DataFrame(columns=ROLLOUT_COLUMNS)
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------------------------------------ basics
    @property
    def configs(self) -> list[str]:
        """Configuration names: those of ``meta["configs"]`` in order, then any other found in the records."""
        names = [c["name"] for c in self.meta.get("configs", [])]
        for n in self.records.get("config", pd.Series(dtype=object)).unique().tolist():
            if n not in names:
                names.append(n)
        return names

    @property
    def success_rate(self) -> float:
        """Share of correct base rollouts (NaN without rollouts)."""
        if self.rollouts.empty:
            return float("nan")
        return float(self.rollouts["correct"].astype(float).mean())

    def __repr__(self) -> str:
        return (
            f"AlignmentReport(configs={self.configs}, nodes={self.n_nodes}, rollouts={len(self.rollouts)}, "
            f"success_rate={self.success_rate:.3f})"
        )

    @property
    def n_nodes(self) -> int:
        """Number of scored nodes (distinct ``prompt_index, rollout_index, position``)."""
        if self.records.empty:
            return 0
        return int(self.records.drop_duplicates(["prompt_index", "rollout_index", "position"]).shape[0])

    # ------------------------------------------------------------------------------------------------ statistics
    def stats(self, df: pd.DataFrame) -> dict:
        """Alignment statistics of a set of (node, config) rows of one configuration."""
        boot = bootstrap_settings(self)
        n = len(df)
        deg = df["degenerate"].astype(bool).to_numpy() if n else np.zeros(0, bool)
        valid = df[~deg] if n else df
        a = valid["alignment"].to_numpy(dtype=np.float64) if len(valid) else np.zeros(0)
        lo, hi = bootstrap_mean_ci(
            a,
            valid["prompt_index"].to_numpy() if len(valid) else np.zeros(0),
            samples=boot.samples,
            level=boot.level,
            seed=boot.seed,
        )
        return {
            "n_nodes": int(n),
            "n_valid": int(len(valid)),
            "n_questions": int(df["prompt_index"].nunique()) if n else 0,
            "alignment_mean": float(a.mean()) if a.size else float("nan"),
            "alignment_median": float(np.median(a)) if a.size else float("nan"),
            "ci_low": lo,
            "ci_high": hi,
            "positive_fraction": float((a > 0).mean()) if a.size else float("nan"),
            "degenerate_fraction": float(deg.mean()) if n else float("nan"),
            "teacher_advantage": float(df["teacher_advantage"].astype(float).mean()) if n else float("nan"),
            "inner_mean": float(valid["inner"].astype(float).mean()) if len(valid) else float("nan"),
        }

    def summary(self) -> pd.DataFrame:
        """Per configuration x {all, correct, incorrect}: mean/median alignment with a question-bootstrap CI,
        positive fraction, degenerate fraction, mean teacher advantage, node and question counts, and the decision
        metric ``teacher_gain`` with its CI (``teacher_gain_ci_low`` / ``teacher_gain_ci_high``) beside the other
        pooled metrics ``step_alignment`` and ``alignment_weighted``."""
        return self._summary(self._pooled())

    def _pooled(self) -> dict:
        """:func:`stats.pooled_metrics` of every subset (computed once per summary)."""
        return {subset: stats.pooled_metrics(self, subset=subset) for subset in SUBSETS}

    def _summary(self, pooled: dict) -> pd.DataFrame:
        """The :meth:`summary` table, given the pooled metrics of every subset."""
        level = bootstrap_settings(self).level
        rows = []
        for name in self.configs:
            df = self.records[self.records["config"] == name]
            for subset in SUBSETS:
                pm = pooled[subset]
                lo, hi = pm.ci(name, stats.DECISION_METRIC, level)
                rows.append({"config": name, "subset": subset, **self.stats(subset_rows(df, subset)),
                             "teacher_gain": pm.point[name]["teacher_gain"], "teacher_gain_ci_low": lo,
                             "teacher_gain_ci_high": hi, "step_alignment": pm.point[name]["step_alignment"],
                             "alignment_weighted": pm.point[name]["alignment_weighted"]})
        return pd.DataFrame(rows)

    def config_summary(self) -> list[dict]:
        """One object per configuration (the ``configs`` of ``summary.json``).

        Mean-alignment fields (``alignment_*``, ``ci_*``, ``positive_fraction``, ``degenerate_fraction*``) and the
        pooled, stake-weighted metrics of :data:`opd_callback.report.stats.METRICS` -- ``teacher_gain``,
        ``step_alignment``, ``alignment_weighted``, ``teacher_advantage`` -- each with ``<metric>_ci`` (question
        bootstrap) and, for the decision metric, ``<metric>_correct`` / ``<metric>_incorrect``.
        ``n_questions_valid`` counts questions with at least one non-degenerate node (the evidence behind a CI).
        """
        pooled = self._pooled()
        summ = self._summary(pooled)
        level = bootstrap_settings(self).level
        dm = stats.DECISION_METRIC
        out = []
        for name in self.configs:
            part = summ[summ["config"] == name].set_index("subset")
            row = {"config": name, **{field: _summary_field(part, subset, column)
                                      for field, subset, column in _CONFIG_FIELDS}}
            row["n_questions_valid"] = pooled["all"].n_questions.get(name, 0)
            for metric in stats.METRICS:
                if metric != "alignment_mean":
                    row[metric] = finite_or_none(pooled["all"].point[name][metric])
                    row[f"{metric}_ci"] = [finite_or_none(v) for v in pooled["all"].ci(name, metric, level)]
            row[f"{dm}_correct"] = finite_or_none(pooled["correct"].point[name][dm])
            row[f"{dm}_incorrect"] = finite_or_none(pooled["incorrect"].point[name][dm])
            out.append(row)
        return out

    def summary_json(self) -> dict:
        """The content of ``summary.json``: ``decision_metric`` (the column of ``configs`` that decides rankings,
        warnings and early stopping), ``metrics`` (what each column means), ``configs`` (:meth:`config_summary`)."""
        return {"decision_metric": stats.DECISION_METRIC, "metrics": dict(stats.METRICS),
                "configs": self.config_summary()}

    def ranking(
        self, metric: str | None = None, *, reference: str | None = None, subset: str = "all"
    ) -> pd.DataFrame:
        """Configurations sorted by a metric (best first; default the decision metric
        :data:`opd_callback.report.stats.DECISION_METRIC`), with paired differences against a reference.

        Besides the :meth:`config_summary` columns: ``rank``, ``metric``, ``value`` (the metric), ``reference``,
        ``diff`` (metric minus the reference's, on the same questions), ``diff_ci_low`` / ``diff_ci_high`` (paired
        question bootstrap), ``p_value``, ``significant`` (CI excludes 0) and ``n_questions_valid``. With
        ``metric="alignment_mean"`` the differences are node-paired alignments (:func:`stats.paired_differences`,
        with ``win_fraction`` and ``n_paired``). The reference is ``reference``, else a configuration named
        ``"current"``, else the best one.
        """
        metric = metric or stats.DECISION_METRIC
        df = pd.DataFrame(self.config_summary())
        if df.empty:
            return df
        if metric not in df.columns:
            raise ValueError(f"ranking: unknown metric {metric!r}; use one of {sorted(stats.METRICS)}")
        df["metric"] = metric
        df["value"] = df[metric]
        df = df.sort_values("value", ascending=False, na_position="last").reset_index(drop=True)
        if metric == "alignment_mean":
            pairs = stats.paired_differences(self, reference=reference, subset=subset)
            keep = ["config", "reference", "diff", "diff_ci_low", "diff_ci_high", "p_value", "significant",
                    "win_fraction", "n_paired"]
        elif metric in stats.METRICS:
            pairs = stats.metric_differences(self, metric, reference=reference, subset=subset)
            keep = ["config", "reference", "diff", "diff_ci_low", "diff_ci_high", "p_value", "significant"]
        else:
            pairs = pd.DataFrame()
        if len(pairs):
            df = df.merge(pairs[keep], on="config", how="left")
        df.insert(0, "rank", np.arange(1, len(df) + 1))
        return df

    # ------------------------------------------------------------------------------------------------ analyses
    # (method.md §6; implemented in opd_callback.report.stats)
    def paired_differences(self, reference: str | None = None, subset: str = "all") -> pd.DataFrame:
        """Paired differences of every configuration against a reference: see :func:`stats.paired_differences`."""
        return stats.paired_differences(self, reference=reference, subset=subset)

    def oracle_mask_gain(self, per_rollout: bool = False) -> pd.DataFrame:
        """Oracle mask gain ``cos(G, D+) / cos(G, D)`` per configuration x subset (``per_rollout=True``: one row per
        rollout and configuration). See :func:`opd_callback.report.stats.oracle_mask_gain`."""
        return stats.oracle_mask_gain_per_rollout(self) if per_rollout else stats.oracle_mask_gain(self)

    def correlations(self, proxies: Sequence[str] | None = None, by_window: bool = True) -> pd.DataFrame:
        """Pearson / Spearman correlation of per-node alignment with KL, JS, entropies and position, per
        configuration x subset x depth window. See :func:`opd_callback.report.stats.correlations`."""
        return stats.correlations(self, stats.PROXIES if proxies is None else proxies, by_window=by_window)

    def by_window(self) -> pd.DataFrame:
        """:meth:`stats` per configuration x subset x exponential depth window."""
        return stats.by_window(self)

    def per_question(self) -> pd.DataFrame:
        """One row per question x configuration (mean alignment, success rate, rank of the configuration on that
        question). See :func:`opd_callback.report.stats.per_question`."""
        return stats.per_question(self)

    def question_winners(self) -> pd.DataFrame:
        """Number of questions on which each configuration has the highest mean alignment."""
        return stats.question_winners(self)

    def compare(self, other: "AlignmentReport", names: tuple[str, str] = ("A", "B")) -> pd.DataFrame:
        """This run (``names[0]``) and ``other`` (``names[1]``) side by side: ``other - self`` per configuration with
        a question-bootstrap CI. See :func:`opd_callback.report.stats.compare_reports`."""
        return stats.compare_reports(self, other, names)

    def to_html(self, path: str | Path | None = None, **kwargs: Any) -> str:
        """The self-contained HTML report (:func:`opd_callback.report.html.build_html`); written to ``path`` if
        given."""
        from opd_callback.report.html import build_html

        return build_html(self, path, **kwargs)

    def format_table(self) -> str:
        """A plain-text table of :meth:`config_summary`, for terminals: the decision metric first, then mean
        alignment (all / correct / incorrect rollouts), positive and degenerate shares, mean A_T, nodes."""
        dm = stats.DECISION_METRIC
        rows = self.config_summary()
        head = (f"{'config':<22} {dm:>12} {'95% CI':>17} {'align':>7} {'95% CI':>17} {'correct':>8} {'incorr.':>8} "
                f"{'pos%':>6} {'degen%':>7} {'A_T':>8} {'nodes':>6}")
        lines = [head, "-" * len(head)]

        def f(x, w=7, p=3):
            return f"{'nan':>{w}}" if x is None else f"{x:>{w}.{p}f}"

        def ci(lo, hi):
            return "[nan, nan]" if lo is None or hi is None else f"[{lo:+.3f}, {hi:+.3f}]"

        for r in rows:
            pos = None if r["positive_fraction"] is None else 100 * r["positive_fraction"]
            deg = None if r["degenerate_fraction"] is None else 100 * r["degenerate_fraction"]
            lines.append(
                f"{r['config']:<22} {f(r[dm], 12)} {ci(*r[f'{dm}_ci']):>17} {f(r['alignment_mean'])} "
                f"{ci(r['ci_low'], r['ci_high']):>17} {f(r['alignment_correct'], 8)} {f(r['alignment_incorrect'], 8)} "
                f"{f(pos, 6, 1)} {f(deg, 7, 1)} {f(r['teacher_advantage'], 8)} {r['n_nodes']:>6}"
            )
        if rows and all(r["alignment_mean"] is None for r in rows):
            lines.append("no usable node: every scored node is degenerate (all candidates succeed or all fail, or the "
                         "teacher equals the student); raise num_rollouts / max_new_tokens or probe harder prompts")
        else:
            lines.append(f"decision metric: {dm} = {stats.METRICS[dm]}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------ io
    def save(self, path: str | Path) -> Path:
        """Write ``records.parquet``, ``rollouts.parquet``, ``summary.json`` and ``meta.json`` into directory ``path``.

        Atomic: everything is written into a temporary sibling directory first; a new ``path`` is that directory
        renamed into place, an existing one gets the four files renamed into it (other files there are kept). A save
        that fails leaves ``path`` exactly as it was."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"AlignmentReport.save: {path} exists and is not a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
        try:
            self.records.to_parquet(tmp / "records.parquet", index=False)
            self.rollouts.to_parquet(tmp / "rollouts.parquet", index=False)
            (tmp / "summary.json").write_text(json.dumps(self.summary_json(), indent=2))
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str))
            if not path.exists():
                try:
                    os.rename(tmp, path)
                    return path
                except OSError:  # created meanwhile: fall through to the per-file renames
                    path.mkdir(parents=True, exist_ok=True)
            for name in ("records.parquet", "rollouts.parquet", "summary.json", "meta.json"):
                os.replace(tmp / name, path / name)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AlignmentReport":
        """Read a directory written by :meth:`save`, or a directory of such directories (e.g. the callback's
        ``<output_dir>/opd_alignment/``: one sub-directory per diagnostic, concatenated with a ``step`` column)."""
        path = Path(path)
        if (path / "records.parquet").exists():
            rec = _lists(pd.read_parquet(path / "records.parquet"))
            rol = _lists(pd.read_parquet(path / "rollouts.parquet")) if (path / "rollouts.parquet").exists() else None
            meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
            missing = [c for c in REQUIRED_RECORD_COLUMNS if c not in rec.columns]
            if missing:
                raise ValueError(
                    f"{path / 'records.parquet'} is not an opd-callback records file: it lacks the columns {missing} "
                    f"(it has {sorted(map(str, rec.columns))[:12]}); give a directory written by AlignmentReport.save "
                    "or opd-diagnose run"
                )
            if rol is not None and len(rol) and not {"prompt_index", "rollout_index"} <= set(rol.columns):
                raise ValueError(f"{path / 'rollouts.parquet'} is not an opd-callback rollouts file (no prompt_index / "
                                 "rollout_index columns)")
            if not isinstance(meta, dict):
                raise ValueError(f"{path / 'meta.json'} must hold a JSON object")
            return cls(rec, rol if rol is not None else [], meta)
        subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")  # not a save in progress
                      and (p / "records.parquet").exists()) if path.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"no records.parquet in {path} or its sub-directories")
        return cls.concat([cls.load(p) for p in subs])

    @classmethod
    def concat(cls, reports: Sequence["AlignmentReport"]) -> "AlignmentReport":
        """Concatenate reports (e.g. several diagnostics of one run, or one per process). Meta of the first is kept;
        cost counters are summed."""
        reports = list(reports)
        if not reports:
            return cls([], [], {})
        rec = _concat([r.records for r in reports])
        rol = _concat([r.rollouts for r in reports])
        meta = dict(reports[0].meta)
        for k in ("rollouts", "nodes", "continuations", "tokens", "seconds"):
            vals = [r.meta.get(k) for r in reports if isinstance(r.meta.get(k), (int, float))]
            if vals:
                meta[k] = sum(vals)
        return cls(rec, rol, meta)

    def filter(self, **equals: Any) -> "AlignmentReport":
        """Rows whose columns equal the given values (``report.filter(step=100)``); rollouts filtered likewise where
        the column exists."""
        rec, rol = self.records, self.rollouts
        for k, v in equals.items():
            rec = rec[rec[k] == v]
            if k in rol.columns:
                rol = rol[rol[k] == v]
        return AlignmentReport(rec.reset_index(drop=True), rol.reset_index(drop=True), self.meta)
