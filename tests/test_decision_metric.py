"""The decision metrics (stats.METRICS): formulas by hand, the paired question bootstrap (identities and coverage),
exactness of teacher_gain against enumeration, and the early-stopping rules built on them."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import reward_from
from test_engine import E_T, E_TAU, e_reward, exact_lab, exact_run, exact_truth

import opd_callback as oc
from opd_callback.report import metrics, stats
from opd_callback.report.bootstrap import group_weights


def _rec(q, r, pos, config, *, alignment, g, d, inner, adv, succ, value, degenerate=False, correct=False):
    return {
        "prompt_index": q, "rollout_index": r, "position": pos, "token_id": 1, "token": "a",
        "rollout_reward": float(correct), "rollout_correct": correct, "window": 0, "student_entropy": 0.5,
        "covered_mass": 1.0, "value": value, "candidate_ids": list(range(len(succ))),
        "candidate_probs": [1 / len(succ)] * len(succ), "candidate_success": list(succ),
        "candidate_rollouts": [4] * len(succ), "config": config,
        "alignment": float("nan") if degenerate else alignment, "inner": inner, "teacher_advantage": adv,
        "kl_reverse": 0.1, "kl_forward": 0.1, "js": 0.01, "teacher_entropy": 0.3, "degenerate": degenerate,
        "g_norm": g, "d_norm": d,
    }


def _report(records, samples=500, seed=1):
    configs = list(dict.fromkeys(r["config"] for r in records))
    meta = {"settings": {"bootstrap_samples": samples, "ci_level": 0.95, "seed": seed},
            "configs": [{"name": c} for c in configs]}
    return oc.AlignmentReport(records, [], meta)


def _hand():
    recs = []
    # question 0: a decisive node (|g| large) where A pushes right and B wrong, plus a node where nothing is at stake
    recs += [_rec(0, 0, 0, "A", alignment=0.9, g=0.5, d=1.0, inner=0.45, adv=0.3, succ=[0.9, 0.1], value=0.5),
             _rec(0, 0, 0, "B", alignment=-0.9, g=0.5, d=2.0, inner=-0.9, adv=-0.4, succ=[0.9, 0.1], value=0.5),
             _rec(0, 0, 1, "A", alignment=0.2, g=0.01, d=1.0, inner=0.002, adv=0.0, succ=[0.5, 0.5], value=0.5),
             _rec(0, 0, 1, "B", alignment=0.95, g=0.01, d=1.0, inner=0.0095, adv=0.0, succ=[0.5, 0.5], value=0.5)]
    # question 1: B agrees, A is degenerate at one node
    recs += [_rec(1, 0, 0, "A", alignment=0.5, g=0.2, d=0.5, inner=0.05, adv=0.1, succ=[0.6, 0.2, 0.0], value=0.3),
             _rec(1, 0, 0, "B", alignment=0.7, g=0.2, d=0.5, inner=0.07, adv=0.15, succ=[0.6, 0.2, 0.0], value=0.3),
             _rec(1, 0, 1, "A", alignment=0.0, g=0.0, d=0.3, inner=0.0, adv=0.0, succ=[1.0, 1.0], value=1.0,
                  degenerate=True),
             _rec(1, 0, 1, "B", alignment=0.0, g=0.0, d=0.3, inner=0.0, adv=0.0, succ=[1.0, 1.0], value=1.0,
                  degenerate=True)]
    return _report(recs)


def test_metrics_by_hand():
    rep = _hand()
    pm = stats.pooled_metrics(rep)
    best = (0.9 - 0.5) + 0.0 + (0.6 - 0.3) + 0.0  # max_j S_j - V per node, summed
    a, b = pm.point["A"], pm.point["B"]
    assert a["alignment_mean"] == pytest.approx((0.9 + 0.2 + 0.5) / 3)
    assert b["alignment_mean"] == pytest.approx((-0.9 + 0.95 + 0.7) / 3)
    assert a["alignment_weighted"] == pytest.approx((0.5 * 0.9 + 0.01 * 0.2 + 0.2 * 0.5) / 0.71)
    assert b["alignment_weighted"] == pytest.approx((0.5 * -0.9 + 0.01 * 0.95 + 0.2 * 0.7) / 0.71)
    g2 = 0.25 + 0.0001 + 0.04
    assert a["step_alignment"] == pytest.approx((0.45 + 0.002 + 0.05) / math.sqrt(g2 * (1 + 1 + 0.25 + 0.09)))
    assert b["step_alignment"] == pytest.approx((-0.9 + 0.0095 + 0.07) / math.sqrt(g2 * (4 + 1 + 0.25 + 0.09)))
    assert a["teacher_gain"] == pytest.approx((0.3 + 0.1) / best)
    assert b["teacher_gain"] == pytest.approx((-0.4 + 0.15) / best)
    assert a["teacher_advantage"] == pytest.approx(0.4 / 4) and b["teacher_advantage"] == pytest.approx(-0.25 / 4)
    # mean alignment ranks B's teacher (wrong at the decisive node) near A's; every stake-weighted metric does not
    assert b["alignment_mean"] > 0.2
    for m in ("alignment_weighted", "step_alignment", "teacher_gain"):
        assert a[m] > 0 > b[m], m
    assert pm.n_questions == {"A": 2, "B": 2}
    # the summary, the ranking and summary.json carry them, and name the decision metric
    row = {r["config"]: r for r in rep.config_summary()}
    assert row["B"]["teacher_gain"] == pytest.approx(b["teacher_gain"])
    assert len(row["A"]["teacher_gain_ci"]) == 2 and row["A"]["n_questions_valid"] == 2
    rk = rep.ranking()
    assert list(rk["config"]) == ["A", "B"] and set(rk["metric"]) == {stats.DECISION_METRIC}
    assert rk.set_index("config").loc["B", "diff"] == pytest.approx(b["teacher_gain"] - a["teacher_gain"])


def test_summary_json_names_the_decision_metric(tmp_path):
    rep = _hand()
    out = rep.save(tmp_path / "r")
    js = json.loads((out / "summary.json").read_text())
    assert js["decision_metric"] == stats.DECISION_METRIC
    assert set(js["metrics"]) == set(stats.METRICS)
    assert all(js["decision_metric"] in c for c in js["configs"])
    assert "decision metric: " + stats.DECISION_METRIC in rep.format_table()


def test_paired_bootstrap_identities():
    rep = _hand()
    pm = stats.pooled_metrics(rep, samples=300, seed=5)
    # the same resampling weights for every configuration: a configuration against itself differs by exactly 0
    p = pm.paired("A", "A", "teacher_gain")
    assert p["diff"] == 0 and p["diff_ci_low"] == 0 and p["diff_ci_high"] == 0
    # each bootstrap replicate is the metric of the questions drawn: recompute one replicate by hand
    w = group_weights(2, 300, 5)[7]
    num = w[0] * (0.3 + 0.0) + w[1] * (0.1 + 0.0)
    den = w[0] * 0.4 + w[1] * 0.3
    assert pm.boot["A"]["teacher_gain"][7] == pytest.approx(num / den)
    # the difference's distribution is the difference of the two distributions replicate by replicate
    d = stats.metric_differences(rep, "teacher_gain", reference="A", samples=300, seed=5).set_index("config")
    lo, hi = stats.percentile_ci(pm.boot["B"]["teacher_gain"] - pm.boot["A"]["teacher_gain"])
    assert (d.loc["B", "diff_ci_low"], d.loc["B", "diff_ci_high"]) == pytest.approx((lo, hi))
    with pytest.raises(ValueError, match="metric must be one of"):
        stats.metric_differences(rep, "loss")
    with pytest.raises(ValueError, match="reference 'Z'"):
        stats.metric_differences(rep, reference="Z")


def test_ratio_ci_coverage_on_clustered_data():
    """Synthetic questions with a known population ratio: the question-bootstrap CI of teacher_gain covers it at
    about its nominal level (the nodes of one question share a random effect, so a node bootstrap would not)."""
    rng = np.random.default_rng(0)
    truth_num, truth_den = 0.1, 0.4  # E[adv], E[best] per node
    hits, reps = 0, 300
    for rep_i in range(reps):
        q = 30
        rows = []
        for i in range(q):
            u = rng.normal(0, 0.15)  # question effect
            for k in range(rng.integers(2, 8)):
                best = rng.uniform(0.2, 0.6)
                adv = best * (truth_num / truth_den) + u + rng.normal(0, 0.1)
                rows.append({"prompt_index": i, "config": "c", "a": 0.0, "n_valid": 1.0, "g": 0.0, "gcos": 0.0,
                             "inner": 0.0, "g2": 0.0, "d2": 0.0, "adv": adv, "best": best, "n": 1.0})
        terms = pd.DataFrame(rows)
        # the per-question sums and the resampled ratio, as PooledMetrics computes them
        table = terms.groupby("prompt_index")[list(metrics.SUM_COLUMNS)].sum().to_numpy()
        w = group_weights(q, 400, rep_i)
        boot = metrics.metric_values(w @ table)["teacher_gain"]
        lo, hi = stats.percentile_ci(boot, 0.9)
        hits += lo <= truth_num / truth_den <= hi
    cover = hits / reps
    # nominal 0.90; percentile bootstrap with 30 clusters under-covers a little. 300 replications: sd ~0.017
    assert 0.82 <= cover <= 0.96, cover


def test_teacher_gain_is_exact_against_enumeration():
    """teacher_gain = sum A_T / sum (max_j S_j - V) from the engine's records (n=400 continuations per candidate)
    against its enumerated value. The numerator is linear in the success estimates: a 5-sigma z-test. The
    denominator's error is bounded by 5 sd of the sum plus the upward bias of a max of estimates (<= sqrt(sum var))."""
    rep = exact_run(400)
    tok, _, _ = exact_lab()
    num = den = var_num = var_den = bias_den = 0.0
    for (_, r), t in zip(rep.records.iterrows(), exact_truth(rep)):
        S, P, Q = t["S"], t["P"], t["Q"]
        num += float((Q - P) @ S)
        den += float(S.max()) - t["V"]
        var = torch.zeros(len(tok), dtype=torch.float64)
        for j, n in zip(r.candidate_ids, r.candidate_rollouts):
            var[j] = 0.0 if n == 1 else float(S[j] * (1 - S[j])) / n
        var_num += float(((Q - P) ** 2) @ var)
        var_den += 4 * float(var.sum())
        bias_den += math.sqrt(float(var.sum()))
    assert len(rep.records) >= 20
    est_num = float(rep.records["teacher_advantage"].sum())
    assert abs(est_num - num) <= 5 * math.sqrt(var_num), (est_num, num, math.sqrt(var_num))
    den_err = 5 * math.sqrt(var_den) + bias_den
    exact = num / den
    got = stats.pooled_metrics(rep).point["ext"]["teacher_gain"]
    bound = (5 * math.sqrt(var_num) + abs(exact) * den_err) / (den - den_err)
    assert bound < 0.3 * abs(exact)  # informative: a wrong formula is caught (bound ~0.1, observed error ~0.01)
    assert abs(got - exact) <= bound, (got, exact, bound)


def test_teacher_equal_to_student_gains_nothing():
    """Q = P at every node: A_T = 0 exactly, so teacher_gain = 0 whatever the sampling noise in S."""
    tok, student, _ = exact_lab()
    rep = oc.diagnose(student, tok, [{"prompt": "ab"}], reward_fn=reward_from(e_reward),
                      configs=[oc.TeacherConfig("self", oc.ExternalTeacher(student), temperature=E_TAU)],
                      settings=oc.RolloutSettings(num_rollouts=4, max_new_tokens=E_T, temperature=E_TAU,
                                                  node_selection="all", rollouts_per_branch=8, seed=0),
                      progress=False)
    pm = stats.pooled_metrics(rep)
    assert pm.point["self"]["teacher_gain"] == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# early stopping on the decision metric


def _es_report(gain_current: float, gain_alt: float, questions: int = 6, spread: float = 0.02):
    recs = []
    for q in range(questions):
        for cfg, gain in (("current", gain_current), ("alt", gain_alt)):
            jitter = spread * ((q % 3) - 1)
            recs.append(_rec(q, 0, 0, cfg, alignment=0.5, g=0.3, d=1.0, inner=0.1, adv=(gain + jitter) * 0.4,
                             succ=[0.8, 0.2], value=0.4))
    return _report(recs, samples=300)


def test_early_stopping_defaults_absolute_and_relative():
    es = oc.AlignmentEarlyStopping()
    assert (es.metric, es.threshold, es.patience, es.relative) == ("teacher_gain", 0.0, 2, True)
    # absolute: below 0 is bad
    rep = _es_report(-0.5, -0.4)
    d = es.update(0, rep.config_summary(), rep)
    assert d["status"] == "bad" and "< 0" in d["message"]
    # relative: above 0, but an alternative beats it by more than the margin with a paired CI above it
    rep = _es_report(0.1, 0.9)
    d = es.update(5, rep.config_summary(), rep)
    assert d["status"] == "bad" and d["beaten_by"] == ["alt"] and d["stop"]
    assert "significantly worse than 'alt'" in es.reason
    # a small (if significant) lead of the alternative is not bad: margin 0.25
    es2 = oc.AlignmentEarlyStopping()
    rep = _es_report(0.6, 0.75)
    d = es2.update(0, rep.config_summary(), rep)
    assert d["status"] == "good"
    # ... but it is reported as a "beats" warning, saying how much it rests on
    msgs = es2.beaten_by(rep.config_summary(), rep)
    assert len(msgs) == 1 and "'alt' beats 'current'" in msgs[0] and "over 6 questions" in msgs[0]


def test_early_stopping_needs_minimum_evidence():
    es = oc.AlignmentEarlyStopping(min_questions=4)
    rep = _es_report(-0.5, 0.9, questions=3)
    d = es.update(0, rep.config_summary(), rep)
    assert d["status"] == "neutral" and "min_questions=4" in d["message"] and es.bad_count == 0
    assert es.beaten_by(rep.config_summary(), rep) == []  # no "beats" warning on 3 questions either
    with pytest.raises(ValueError, match="relative rule must be on"):
        oc.AlignmentEarlyStopping(threshold=None, relative=False)
    with pytest.raises(ValueError, match="margin"):
        oc.AlignmentEarlyStopping(margin=-1)
    with pytest.raises(ValueError, match="min_questions"):
        oc.AlignmentEarlyStopping(min_questions=0)
