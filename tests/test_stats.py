"""Statistics of AlignmentReport (method.md §6) on synthetic records: no model needed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from opd_callback.report import EXTRA_RECORD_COLUMNS, RECORD_COLUMNS, AlignmentReport, bootstrap_mean_ci, stats


def synthetic_report(
    n_questions: int = 12,
    rollouts: int = 3,
    nodes: int = 4,
    configs: dict | None = None,
    seed: int = 0,
    bootstrap_samples: int = 400,
) -> AlignmentReport:
    """Records whose alignment is ``question effect + config shift + noise``; norms consistent with alignment."""
    configs = configs if configs is not None else {"a": 0.0, "b": 0.1}
    rng = np.random.default_rng(seed)
    rec, rol = [], []
    for q in range(n_questions):
        q_eff = rng.normal(0, 0.3)
        for r in range(rollouts):
            correct = bool(rng.random() < 0.5)
            rol.append({"prompt_index": q, "rollout_index": r, "prompt": f"q{q}", "completion": "x",
                        "completion_ids": [1, 2], "reward": float(correct), "correct": correct})
            for t in range(nodes):
                noise = rng.normal(0, 0.05)
                g_norm = float(rng.uniform(0.5, 2))
                kl = float(rng.uniform(0, 1))
                for name, shift in configs.items():
                    a = float(np.clip(q_eff + shift + noise, -0.99, 0.99))
                    d_norm = float(rng.uniform(0.5, 2))
                    rec.append({
                        "prompt_index": q, "rollout_index": r, "position": t, "token_id": 1, "token": "x",
                        "rollout_reward": float(correct), "rollout_correct": correct, "window": int(t).bit_length(),
                        "student_entropy": kl * 2, "covered_mass": 0.9, "value": 0.5, "candidate_ids": [1, 2],
                        "candidate_probs": [0.5, 0.4], "candidate_success": [1.0, 0.0],
                        "candidate_rollouts": [4, 4], "config": name, "alignment": a,
                        "inner": a * g_norm * d_norm, "teacher_advantage": 0.0, "kl_reverse": kl,
                        "kl_forward": kl, "js": kl / 2, "teacher_entropy": 1.0, "degenerate": False,
                        "g_norm": g_norm, "d_norm": d_norm,
                    })
    meta = {"settings": {"bootstrap_samples": bootstrap_samples, "ci_level": 0.95, "seed": 0},
            "configs": [{"name": n} for n in configs]}
    return AlignmentReport(pd.DataFrame(rec), pd.DataFrame(rol), meta)


def test_columns_contract():
    rep = synthetic_report()
    assert set(RECORD_COLUMNS) <= set(rep.records.columns)
    assert {"g_norm", "d_norm"} <= set(EXTRA_RECORD_COLUMNS)
    assert not set(RECORD_COLUMNS) & set(EXTRA_RECORD_COLUMNS)


def test_bootstrap_means_agree_with_report_ci():
    rng = np.random.default_rng(1)
    v = rng.normal(size=200)
    g = rng.integers(0, 17, size=200)
    boot = stats.bootstrap_means(v, g, samples=300, seed=3)
    assert stats.percentile_ci(boot, 0.9) == pytest.approx(bootstrap_mean_ci(v, g, samples=300, level=0.9, seed=3))


def test_paired_difference_is_tight_when_unpaired_cis_overlap():
    rep = synthetic_report(configs={"a": 0.0, "b": 0.1})
    summ = {r["config"]: r for r in rep.config_summary()}
    # question effects (sd 0.3) dominate: the per-configuration intervals overlap ...
    assert summ["a"]["ci_high"] > summ["b"]["ci_low"]
    pairs = rep.paired_differences(reference="a").set_index("config")
    # ... but on the same nodes the difference is exactly the shift, with a narrow interval that excludes 0
    assert pairs.loc["b", "diff"] == pytest.approx(0.1, abs=0.01)
    assert 0.05 < pairs.loc["b", "diff_ci_low"] <= pairs.loc["b", "diff"] <= pairs.loc["b", "diff_ci_high"] < 0.15
    assert bool(pairs.loc["b", "significant"]) and pairs.loc["b", "p_value"] < 0.01
    assert pairs.loc["b", "win_fraction"] > 0.9
    assert pairs.loc["b", "n_paired"] == 12 * 3 * 4


def test_ranking_reference_and_existing_columns():
    rep = synthetic_report(configs={"a": 0.0, "current": 0.05, "b": 0.1})
    assert set(rep.ranking()["metric"]) == {stats.DECISION_METRIC}  # the default ranks by the decision metric
    rk = rep.ranking("alignment_mean")
    # by mean alignment: config_summary columns, sorted best first
    assert list(rk["config"]) == ["b", "current", "a"]
    for col in pd.DataFrame(rep.config_summary()).columns:
        assert col in rk.columns
    assert list(rk["rank"]) == [1, 2, 3]
    # "current" is the reference when present
    assert set(rk["reference"]) == {"current"}
    row = rk.set_index("config")
    assert row.loc["b", "diff"] == pytest.approx(0.05, abs=0.01) and bool(row.loc["b", "significant"])
    assert row.loc["a", "diff"] == pytest.approx(-0.05, abs=0.01) and row.loc["a", "diff_ci_high"] < 0
    # without "current": the best is the reference
    rep2 = synthetic_report(configs={"a": 0.0, "b": 0.1})
    assert set(rep2.ranking("alignment_mean")["reference"]) == {"b"}
    assert rep2.ranking(metric="positive_fraction")["config"].iloc[0] == "b"
    with pytest.raises(ValueError, match="reference 'zzz'"):
        rep2.paired_differences(reference="zzz")


def test_paired_uses_only_nodes_valid_for_both():
    rep = synthetic_report(n_questions=4, configs={"a": 0.0, "b": 0.2})
    rec = rep.records
    m = (rec["config"] == "b") & (rec["position"] == 0)
    rec.loc[m, "degenerate"] = True
    rec.loc[m, "alignment"] = np.nan
    pairs = rep.paired_differences(reference="a").set_index("config")
    assert pairs.loc["b", "n_paired"] == 4 * 3 * 3


def test_oracle_mask_gain_by_hand():
    # one rollout, three nodes: inner = (+2, -1, +1), |g|^2 = (4, 1, 1), |d|^2 = (1, 4, 1)
    rows = []
    for t, (inner, g, d) in enumerate([(2.0, 2.0, 1.0), (-1.0, 1.0, 2.0), (1.0, 1.0, 1.0)]):
        rows.append({"prompt_index": 0, "rollout_index": 0, "position": t, "config": "c", "rollout_correct": False,
                     "inner": inner, "g_norm": g, "d_norm": d, "alignment": inner / (g * d), "degenerate": False,
                     "window": t.bit_length()})
    rep = AlignmentReport(pd.DataFrame(rows), [{"prompt_index": 0, "rollout_index": 0, "correct": False}],
                          {"settings": {"bootstrap_samples": 50}, "configs": [{"name": "c"}]})
    per = rep.oracle_mask_gain(per_rollout=True).iloc[0]
    full = 2.0 / math.sqrt(6 * 6)  # (2 - 1 + 1) / sqrt((4+1+1) (1+4+1))
    masked = 3.0 / math.sqrt(6 * 2)  # (2 + 1) / sqrt((4+1+1) (1+1))
    assert per["cos_full"] == pytest.approx(full)
    assert per["cos_masked"] == pytest.approx(masked)
    assert per["gain"] == pytest.approx(masked / full)
    assert per["n_positive"] == 2
    s = rep.oracle_mask_gain().set_index("subset")
    assert s.loc["all", "gain"] == pytest.approx(masked / full)
    assert s.loc["incorrect", "gain"] == pytest.approx(masked / full)
    assert s.loc["all", "masked_fraction"] == pytest.approx(1 / 3)
    assert s.loc["correct", "n_rollouts"] == 0 and math.isnan(s.loc["correct", "gain"])


def test_oracle_mask_gain_needs_norms():
    rep = synthetic_report(n_questions=2)
    rep.records = rep.records.drop(columns=["g_norm", "d_norm"])
    with pytest.raises(ValueError, match="rerun the diagnostic"):
        rep.oracle_mask_gain()


def test_oracle_gain_is_one_when_every_node_is_positive():
    rep = synthetic_report(n_questions=3, configs={"a": 5.0})  # alignment clipped to 0.99 everywhere
    s = rep.oracle_mask_gain().set_index("subset")
    assert s.loc["all", "gain"] == pytest.approx(1.0)
    assert s.loc["all", "masked_fraction"] == 0.0


def test_correlations():
    rep = synthetic_report(configs={"a": 0.0})
    rec = rep.records
    rec["alignment"] = np.tanh(rec["kl_reverse"])  # monotone in KL
    rec["student_entropy"] = -rec["kl_reverse"] ** 3
    cor = rep.correlations()
    row = cor[(cor["subset"] == "all") & (cor["window"] == "all")].set_index("proxy")
    assert row.loc["kl_reverse", "spearman"] == pytest.approx(1.0)
    assert row.loc["student_entropy", "spearman"] == pytest.approx(-1.0)
    expect = np.corrcoef(rec["kl_reverse"], rec["alignment"])[0, 1]
    assert row.loc["kl_reverse", "pearson"] == pytest.approx(expect)
    assert math.isnan(row.loc["teacher_entropy", "pearson"])  # constant column
    assert set(cor["subset"]) == {"all", "correct", "incorrect"}
    assert {"[0,1)", "[1,2)", "[2,4)"} <= set(cor["window"])
    assert set(cor["proxy"]) == set(stats.PROXIES)


def test_by_window_and_per_question():
    rep = synthetic_report(n_questions=5, configs={"a": 0.0, "b": 0.1})
    bw = rep.by_window()
    part = bw[(bw["config"] == "a") & (bw["subset"] == "all")]
    assert list(part["window"]) == [0, 1, 2]  # positions 0, 1, 2-3
    assert list(part["window_label"]) == ["[0,1)", "[1,2)", "[2,4)"]
    assert list(part["n_nodes"]) == [5 * 3, 5 * 3, 5 * 3 * 2]
    pq = rep.per_question()
    assert len(pq) == 5 * 2
    assert pq[pq["config"] == "b"]["best"].all()  # b = a + 0.1 on every node
    sr = rep.rollouts.groupby("prompt_index")["correct"].mean()
    for q, v in sr.items():
        assert pq[pq["prompt_index"] == q]["success_rate"].iloc[0] == pytest.approx(v)
    w = rep.question_winners().set_index("config")
    assert w.loc["b", "wins"] == 5 and w.loc["a", "wins"] == 0


def test_kendall_and_ranking_agreement():
    assert stats.kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert stats.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert math.isnan(stats.kendall_tau([1, 1], [1, 2]))
    rep = synthetic_report(n_questions=3, configs={"a": 0.0, "b": 0.1, "c": -0.1})
    rec = rep.records
    rec["alignment_logits"] = rec["alignment"] * 2 + 0.1
    agr = stats.ranking_agreement(rec)
    assert agr["top1_agreement"] == 1.0 and agr["kendall_tau_mean"] == pytest.approx(1.0)
    rec["alignment_logits"] = -rec["alignment"]
    agr = stats.ranking_agreement(rec, level="question")
    assert agr["top1_agreement"] == 0.0 and agr["kendall_tau_mean"] == pytest.approx(-1.0) and agr["n"] == 3


def test_compare_reports():
    a = synthetic_report(configs={"x": 0.0, "y": 0.0}, seed=0)
    b = synthetic_report(configs={"x": 0.0, "y": 0.0}, seed=0)
    b.records.loc[b.records["config"] == "y", "alignment"] += 0.2
    cmp_ = a.compare(b, ("old", "new")).set_index("config")
    assert cmp_.loc["x", "diff"] == pytest.approx(0.0)
    assert cmp_.loc["y", "diff"] == pytest.approx(0.2)
    # same prompts: questions are resampled jointly, so the shift is detected despite the question effects
    assert bool(cmp_.loc["y", "significant"]) and not bool(cmp_.loc["x", "significant"])
    assert cmp_.loc["y", "diff_ci_low"] > 0.15
    assert {"mean_old", "mean_new", "ci_low_new", "n_old"} <= set(cmp_.columns)


def test_empty_report_is_harmless():
    rep = AlignmentReport([], [], {})
    assert rep.paired_differences().empty
    assert rep.oracle_mask_gain(per_rollout=True).empty
    assert rep.per_question().empty
    assert rep.by_window().empty
