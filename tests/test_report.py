"""AlignmentReport: save/load round trip, question-bootstrap CIs (coverage on synthetic clustered data), summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from opd_callback import AlignmentReport
from opd_callback.report import RECORD_COLUMNS, ROLLOUT_COLUMNS, bootstrap_mean_ci

LIST_COLUMNS = ["candidate_ids", "candidate_probs", "candidate_success", "candidate_rollouts"]
SUMMARY_KEYS = {"config", "alignment_mean", "alignment_correct", "alignment_incorrect", "ci_low", "ci_high",
                "positive_fraction", "degenerate_fraction", "n_nodes"}


def _record(prompt, rollout, position, config, alignment, correct, degenerate=False, **kw):
    r = {
        "prompt_index": prompt, "rollout_index": rollout, "position": position, "token_id": 2, "token": "a",
        "rollout_reward": 1.0 if correct else 0.0, "rollout_correct": correct, "window": int(position).bit_length(),
        "student_entropy": 0.5, "covered_mass": 0.9, "value": 0.5,
        "candidate_ids": [2, 3, 0], "candidate_probs": [0.5, 0.3, 0.1], "candidate_success": [0.75, 0.25, 0.0],
        "candidate_rollouts": [5, 4, 1], "config": config, "alignment": float("nan") if degenerate else alignment,
        "inner": 0.0 if degenerate else alignment / 10, "teacher_advantage": 0.1, "kl_reverse": 0.2, "kl_forward": 0.3,
        "js": 0.05, "teacher_entropy": 0.7, "degenerate": degenerate,
    }
    r.update(kw)
    return r


def _hand_report():
    # config "A": correct rollouts -> alignments 0.2, 0.4 (prompt 0);
    # incorrect -> -0.5, 0.1 and one degenerate (prompt 1)
    # config "B": all incorrect... and all degenerate except one
    recs = [
        _record(0, 0, 0, "A", 0.2, True, candidate_ids=[1, 4], candidate_probs=[0.6, 0.2],
                candidate_success=[1.0, 0.5], candidate_rollouts=[9, 8]),
        _record(0, 0, 1, "A", 0.4, True),
        _record(1, 0, 0, "A", -0.5, False),
        _record(1, 0, 1, "A", 0.1, False),
        _record(1, 0, 2, "A", 0.0, False, degenerate=True),
        _record(0, 0, 0, "B", -0.3, True),
        _record(0, 0, 1, "B", 0.0, True, degenerate=True),
        _record(1, 0, 0, "B", 0.0, False, degenerate=True),
        _record(1, 0, 1, "B", 0.0, False, degenerate=True),
        _record(1, 0, 2, "B", 0.0, False, degenerate=True),
    ]
    rollouts = [
        {"prompt_index": 0, "rollout_index": 0, "prompt": "ab", "completion": "aab", "completion_ids": [2, 2, 3],
         "reward": 1.0, "correct": True},
        {"prompt_index": 1, "rollout_index": 0, "prompt": "ba", "completion": "bbc", "completion_ids": [3, 3, 4, 0],
         "reward": 0.0, "correct": False},
    ]
    meta = {"settings": {"bootstrap_samples": 200, "ci_level": 0.9, "seed": 3},
            "configs": [{"name": "A"}, {"name": "B"}], "rollouts": 2}
    return AlignmentReport(recs, rollouts, meta)


def test_summary_splits_correct_and_incorrect():
    rep = _hand_report()
    summ = {s["config"]: s for s in rep.config_summary()}
    a, b = summ["A"], summ["B"]
    assert a["alignment_mean"] == pytest.approx((0.2 + 0.4 - 0.5 + 0.1) / 4)  # degenerate row excluded
    assert a["alignment_correct"] == pytest.approx(0.3)
    assert a["alignment_incorrect"] == pytest.approx(-0.2)
    assert a["positive_fraction"] == pytest.approx(3 / 4)
    assert a["degenerate_fraction"] == pytest.approx(1 / 5)
    assert a["n_nodes"] == 5 and a["n_nodes_correct"] == 2 and a["n_nodes_incorrect"] == 3
    assert a["n_questions"] == 2
    # B: one valid node (correct), incorrect subset all degenerate -> None (NaN) mean
    assert b["alignment_mean"] == pytest.approx(-0.3) and b["alignment_correct"] == pytest.approx(-0.3)
    assert b["alignment_incorrect"] is None
    assert b["degenerate_fraction"] == pytest.approx(4 / 5) and b["positive_fraction"] == 0.0
    # the summary table agrees with the dict form, subset by subset
    t = rep.summary().set_index(["config", "subset"])
    assert t.loc[("A", "incorrect"), "n_valid"] == 2
    assert t.loc[("A", "correct"), "alignment_median"] == pytest.approx(0.3)
    # the CI is the question bootstrap of the valid nodes with the report's settings
    lo, hi = bootstrap_mean_ci(np.array([0.2, 0.4, -0.5, 0.1]), np.array([0, 0, 1, 1]), samples=200, level=0.9, seed=3)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((lo, hi))
    assert a["ci_low"] <= a["alignment_mean"] <= a["ci_high"]


def test_save_load_round_trip(tmp_path):
    rep = _hand_report()
    out = rep.save(tmp_path / "diag")
    saved = json.loads((out / "summary.json").read_text())
    summary = saved["configs"]
    assert [s["config"] for s in summary] == ["A", "B"]
    for s in summary:
        assert SUMMARY_KEYS <= set(s), SUMMARY_KEYS - set(s)
        assert saved["decision_metric"] in s  # the field names its column
    assert summary == json.loads(json.dumps(rep.config_summary()))
    back = AlignmentReport.load(out)
    assert list(back.records.columns) == RECORD_COLUMNS
    assert list(back.rollouts.columns) == ROLLOUT_COLUMNS
    assert back.meta == rep.meta
    # scalar columns equal (NaN alignment of degenerate rows included)
    scalar = [c for c in RECORD_COLUMNS if c not in LIST_COLUMNS]
    pd.testing.assert_frame_equal(back.records[scalar], rep.records[scalar])
    # list columns: same values and lengths per row
    for c in LIST_COLUMNS:
        for x, y in zip(back.records[c], rep.records[c]):
            assert [v for v in x] == list(y)
    assert back.config_summary() == rep.config_summary()


def test_load_preserves_list_columns_as_lists(tmp_path):
    """Records hold Python lists; after save/load they must still be lists (code that does ``ids.index(y)`` or
    ``ids == [...]`` on a loaded record breaks on the numpy arrays that parquet returns)."""
    rep = _hand_report()
    back = AlignmentReport.load(rep.save(tmp_path / "diag"))
    for c in LIST_COLUMNS:
        assert all(isinstance(v, list) for v in back.records[c]), (c, type(back.records[c].iloc[0]))
    assert all(isinstance(v, list) for v in back.rollouts["completion_ids"])
    pd.testing.assert_frame_equal(back.records, rep.records)
    pd.testing.assert_frame_equal(back.rollouts, rep.rollouts)


def test_load_directory_of_runs_concatenates(tmp_path):
    rep = _hand_report()
    rep.save(tmp_path / "runs" / "step_1")
    rep.save(tmp_path / "runs" / "step_2")
    both = AlignmentReport.load(tmp_path / "runs")
    assert len(both.records) == 2 * len(rep.records) and len(both.rollouts) == 4
    assert both.meta["rollouts"] == 4  # cost counters are summed
    with pytest.raises(FileNotFoundError):
        AlignmentReport.load(tmp_path / "nothing_here")


def test_empty_report():
    rep = AlignmentReport([], [], {})
    assert list(rep.records.columns) == RECORD_COLUMNS and rep.n_nodes == 0
    assert rep.config_summary() == []


# ------------------------------------------------------------------------------------------------ bootstrap


def _clustered(rng, q=40, m=10, mu=0.1, tau=0.3, sigma=0.2):
    """q questions, m nodes each; node value = mu + question effect (sd tau) + noise (sd sigma). ICC = 0.69."""
    groups = np.repeat(np.arange(q), m)
    x = mu + rng.normal(0, tau, q)[groups] + rng.normal(0, sigma, q * m)
    return x, groups


def test_bootstrap_coverage_on_clustered_data():
    rng = np.random.default_rng(0)
    reps, mu = 400, 0.1
    hit_boot = hit_naive = 0
    width_ratio = []
    for i in range(reps):
        x, grp = _clustered(rng, mu=mu)
        lo, hi = bootstrap_mean_ci(x, grp, samples=1000, level=0.95, seed=i)
        hit_boot += lo <= mu <= hi
        half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)  # naive: nodes treated as independent
        hit_naive += abs(x.mean() - mu) <= half
        width_ratio.append((hi - lo) / (2 * half))
    cov = hit_boot / reps
    # nominal 95%; a percentile bootstrap over 40 clusters under-covers slightly (0.94 measured over 1000 reps).
    # Binomial sd over 400 reps is ~1.2%: [0.88, 0.99] is about -5 / +4 sd around 0.94
    assert 0.88 <= cov <= 0.99, cov
    # the naive node-level CI is too narrow by ~sqrt(design effect) = sqrt(1 + (m-1) ICC) ~ 2.7 and badly under-covers
    assert np.median(width_ratio) > 2.0
    assert hit_naive / reps < 0.75


def test_bootstrap_independent_nodes_matches_naive_width():
    # with one node per question the question bootstrap is the ordinary bootstrap: width ~ the normal CI (+-15%)
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 400)
    lo, hi = bootstrap_mean_ci(x, np.arange(400), samples=4000, level=0.95, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(400)
    assert 0.85 < (hi - lo) / (2 * half) < 1.15
    assert lo < x.mean() < hi


def test_bootstrap_edge_cases():
    assert all(math.isnan(v) for v in bootstrap_mean_ci(np.zeros(0), np.zeros(0)))
    assert all(math.isnan(v) for v in bootstrap_mean_ci(np.ones(3), np.arange(3), samples=0))
    # a single question: every resample is the same set -> a zero-width interval at the mean
    lo, hi = bootstrap_mean_ci(np.array([0.1, 0.5, 0.3]), np.array([7, 7, 7]))
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    # reproducible with the same seed
    x, g = _clustered(np.random.default_rng(2))
    assert bootstrap_mean_ci(x, g, seed=5) == bootstrap_mean_ci(x, g, seed=5)
