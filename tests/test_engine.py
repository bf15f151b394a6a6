"""The engine end to end on tiny random models: exactness against enumeration, behaviour, and bad input.

Independent truth comes from tests/helpers.py: plain forward passes (one unpadded sequence, no cache) and exact
enumeration of every completion; never from the package's rollout code."""

from __future__ import annotations

import copy
import dataclasses
import math
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    CHAT_TEMPLATE,
    ExactTree,
    RecordingBackend,
    bernstein_halfwidth,
    count_forwards,
    entropy_of,
    make_model,
    make_tokenizer,
    plain_next_logits,
    reward_from,
)

import opd_callback as oc
import opd_callback.report.alignment_report as report_mod
from opd_callback.core.nodes import nodes_per_rollout, select_nodes
from opd_callback.report import RECORD_COLUMNS, ROLLOUT_COLUMNS
from opd_callback.report.records import make_record, make_rollout_record
from opd_callback.rollout import TransformersBackend

# ====================================================================================================================
# shared tiny lab: 8-token character vocabulary, random 1-layer Qwen2 student and teacher


@lru_cache(maxsize=None)
def lab():
    tok = make_tokenizer(("a", "b", "c", "|", ":"), unk=True, chat_template=CHAT_TEMPLATE)
    student = make_model(tok, seed=0, init=0.2)
    teacher = make_model(tok, seed=3, init=0.2)
    return tok, student, teacher


def has_a(text: str) -> float:
    return float("a" in text)


EXAMPLES = [{"prompt": "ab", "answer": "c"}, {"prompt": "ba|", "answer": "a"}]
TEMPLATE = "{prompt}|{answer}"


def configs(teacher):
    return [
        oc.TeacherConfig("ext_rkl", oc.ExternalTeacher(teacher), divergence="reverse_kl"),
        oc.TeacherConfig("ctx_fkl", oc.ContextTeacher(TEMPLATE), divergence="forward_kl"),
        oc.TeacherConfig("ctx_tok", oc.ContextTeacher(TEMPLATE), divergence="sampled_token"),
    ]


def settings(**kw):
    base = dict(num_rollouts=3, max_new_tokens=6, temperature=0.8, top_k=2, teacher_top_k=1, rollouts_per_branch=4,
                batch_size=256, bootstrap_samples=50)
    base.update(kw)
    return oc.RolloutSettings(**base)


def run(examples=EXAMPLES, cfgs=None, reward=has_a, **kw):
    tok, student, teacher = lab()
    return oc.diagnose(student, tok, examples, reward_fn=reward_from(reward), configs=cfgs or configs(teacher),
                       settings=settings(**kw), progress=False)


@lru_cache(maxsize=None)
def default_report(tail: str = "impute"):
    return run(tail=tail)


def completion_of(report, prompt_index, rollout_index) -> list[int]:
    ro = report.rollouts
    row = ro[(ro.prompt_index == prompt_index) & (ro.rollout_index == rollout_index)].iloc[0]
    return [int(x) for x in row.completion_ids]


# hand directions (float64) for the three divergences used above
def _dir(name, z, zt, y, tau_c=1.0):
    p, q = torch.softmax(z / tau_c, -1), torch.softmax(zt / tau_c, -1)
    if name == "reverse_kl":
        r = q.log() - p.log()
        return p * (r - (p * r).sum()) / tau_c
    if name == "forward_kl":
        return (q - p) / tau_c
    if name == "sampled_token":
        e = torch.zeros_like(p)
        e[y] = 1.0
        return float(q[y].log() - p[y].log()) * (e - p) / tau_c
    raise AssertionError(name)


# ====================================================================================================================
# 5. exactness on an enumerable model

ETOK_CHARS = ("a", "b")
E_T, E_TAU = 4, 0.7


def e_reward(text: str) -> float:
    return 1.0 if ("ab" in text or text == "b") else 0.0


@lru_cache(maxsize=None)
def exact_lab():
    tok = make_tokenizer(ETOK_CHARS, pad_is_eos=True)  # 3 tokens: EOS(=PAD), a, b
    student = make_model(tok, seed=5, init=0.2)  # hostile generation_config: top_k=1, top_p=0.5
    teacher = make_model(tok, seed=1, init=0.2)
    return tok, student, teacher


HAS_PREFIX_CACHE = "prefix_cache" in {f.name for f in dataclasses.fields(oc.RolloutSettings)}


@lru_cache(maxsize=None)
def exact_run(n: int, prefix_cache: bool | None = None):
    tok, student, teacher = exact_lab()
    assert student.generation_config.top_k == 1 and student.generation_config.top_p == 0.5
    extra = {} if prefix_cache is None else {"prefix_cache": prefix_cache}
    return oc.diagnose(
        student, tok, [{"prompt": "ab"}, {"prompt": "b"}], reward_fn=reward_from(e_reward),
        configs=[oc.TeacherConfig("ext", oc.ExternalTeacher(teacher))],
        settings=oc.RolloutSettings(num_rollouts=8, max_new_tokens=E_T, temperature=E_TAU, node_selection="all",
                                    top_k=len(tok), rollouts_per_branch=n, batch_size=2048, seed=0, **extra),
        progress=False,
    )


def exact_truth(report):
    """Per record: true S over the whole vocabulary, true P, the teacher's Q, V, g and alignment (reverse KL at
    tau_c = 1)."""
    tok, student, teacher = exact_lab()
    trees = {}
    out = []
    for _, r in report.records.iterrows():
        prompt = ["ab", "b"][r.prompt_index]
        if prompt not in trees:
            ids = tok(prompt)["input_ids"]
            trees[prompt] = (ExactTree(student, tok, ids, e_reward, E_T, E_TAU),
                             ExactTree(teacher, tok, ids, e_reward, E_T, E_TAU))
        st, tt = trees[prompt]
        pre = completion_of(report, r.prompt_index, r.rollout_index)[: r.position]
        S = torch.tensor([st.S(pre + [j]) for j in range(len(tok))], dtype=torch.float64)
        P = st.probs(pre)
        v = float(P @ S)
        g = P * (S - v)
        d = _dir("reverse_kl", st.logits(pre), tt.logits(pre), None)
        al = float(g @ d / (g.norm() * d.norm())) if g.norm() > 1e-9 else float("nan")
        Q = torch.softmax(tt.logits(pre).double(), -1)  # the teacher at the configuration's temperature (1)
        out.append(dict(S=S, P=P, Q=Q, V=v, g=g, alignment=al))
    return out


@pytest.mark.parametrize(
    "prefix_cache",
    [None, pytest.param(False, marks=pytest.mark.skipif(not HAS_PREFIX_CACHE, reason="no prefix_cache setting"))],
)
def test_exact_candidate_success_z_test(prefix_cache):
    rep = exact_run(400, prefix_cache)
    truth = exact_truth(rep)
    assert len(rep.records) >= 20
    n_checked = 0
    chi2, dof = 0.0, 0
    for (_, r), t in zip(rep.records.iterrows(), truth):
        assert sorted(r.candidate_ids) == [0, 1, 2]  # top_k = vocab: every token is a candidate
        assert r.covered_mass == pytest.approx(1.0, abs=1e-6)
        for j, s_hat, n in zip(r.candidate_ids, r.candidate_success, r.candidate_rollouts):
            s = float(t["S"][j])
            # Bernstein bound at delta=1e-6 per comparison (~5.4 sigma plus a range term valid near S=0/1);
            # ~50 comparisons -> family-wise false alarm < 1e-4. Terminal candidates are exact (n=1).
            tol = 1e-9 if n == 1 else bernstein_halfwidth(s, n) + 1e-9
            assert abs(s_hat - s) <= tol, (r.prompt_index, r.rollout_index, r.position, j, s_hat, s, n)
            n_checked += n > 1
            if n > 1 and 1e-12 < s < 1 - 1e-12:
                chi2 += (s_hat - s) ** 2 / (s * (1 - s) / n)
                dof += 1
    assert n_checked >= 20
    # aggregate: sum of squared z-scores ~ chi-square(dof) (mean dof, sd sqrt(2 dof)); 6 sd above the mean has a
    # tail probability ~1e-6 at dof ~ 60. Catches a small bias shared by many cells that no single cell shows.
    assert chi2 <= dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def _errors(rep):
    truth = exact_truth(rep)
    ev, ea = [], []
    for (_, r), t in zip(rep.records.iterrows(), truth):
        ev.append(abs(r.value - t["V"]))
        if not math.isnan(t["alignment"]):
            ea.append(abs(r.alignment - t["alignment"]))
    return np.array(ev), np.array(ea), truth


def test_exact_value_and_alignment_converge():
    small, large = exact_run(25), exact_run(400)
    # same seed -> same base rollouts and nodes; only the continuation counts differ
    assert small.records[["prompt_index", "rollout_index", "position"]].equals(
        large.records[["prompt_index", "rollout_index", "position"]])
    ev_s, ea_s, _ = _errors(small)
    ev_l, ea_l, truth = _errors(large)
    # statistical error shrinks like 1/sqrt(n): a factor 4 expected; require the mean error to drop at all
    assert ev_l.mean() < ev_s.mean() and ea_l.mean() < ea_s.mean(), (ev_s.mean(), ev_l.mean(), ea_s.mean(), ea_l.mean())
    # per-node bound at n=400 from the per-candidate Bernstein bounds e_j (see the z-test):
    # |dg_j| <= P_j (e_j + sum_k P_k e_k), and |cos(g+dg, d) - cos(g, d)| <= 2 |dg| / |g|
    for (_, r), t in zip(large.records.iterrows(), truth):
        e = torch.zeros(len(t["S"]), dtype=torch.float64)
        for j, n in zip(r.candidate_ids, r.candidate_rollouts):
            e[j] = 0.0 if n == 1 else bernstein_halfwidth(float(t["S"][j]), n)
        dv = float(t["P"] @ e)
        assert abs(r.value - t["V"]) <= dv + 1e-6
        if math.isnan(t["alignment"]):
            continue
        dg = (t["P"] * (e + dv)).norm()
        bound = min(2.0, 2.0 * float(dg) / float(t["g"].norm()))
        assert abs(r.alignment - t["alignment"]) <= bound + 1e-6, (r.alignment, t["alignment"], bound)
    # and in aggregate the alignment is accurate at n=400 (observed ~0.02; 0.1 leaves a wide margin)
    assert ea_l.mean() < 0.1


def test_exact_degenerate_where_truth_is_flat():
    rep = exact_run(400)
    truth = exact_truth(rep)
    for (_, r), t in zip(rep.records.iterrows(), truth):
        if math.isnan(t["alignment"]):  # every continuation has the same reward: estimated exactly, so flagged
            assert r.degenerate and math.isnan(r.alignment)
        assert r.degenerate == math.isnan(r.alignment)


def test_first_token_distribution_matches_softmax_at_temperature():
    tok, student, _ = exact_lab()
    n = 8000
    # the engine's own base-rollout path (prepared prompt, per-prompt generator, backend), without any node
    eng = oc.AlignmentEngine(
        student, tok, [oc.TeacherConfig("self", oc.ContextTeacher("{prompt}"))], reward_from(e_reward),
        oc.RolloutSettings(num_rollouts=n, max_new_tokens=1, temperature=E_TAU, batch_size=4096),
    )
    prep = eng.prepare([{"prompt": "ab"}])[0]
    gen, _ = eng._generator(prep.index)
    base = eng.backend.sample([prep.prompt_ids] * n, [1] * n, gen)
    assert len(base) == n and all(len(c) == 1 for c in base)
    first = np.array([int(c[0]) for c in base])
    counts = np.bincount(first, minlength=len(tok))
    z = plain_next_logits(student, tok("ab")["input_ids"])

    def chi2(tau):
        p = torch.softmax(z / tau, -1).numpy()
        return float(((counts - n * p) ** 2 / (n * p)).sum())

    # Pearson chi-square with 2 dof: P(chi2 > 30) = exp(-15) ~ 3e-7
    assert chi2(E_TAU) < 30, counts
    # power: the same counts are far from tau = 1 (temperature ignored) and from top_k=1 (generation_config obeyed)
    assert chi2(1.0) > 60
    assert (counts > 0).sum() == len(tok)


# ====================================================================================================================
# 6. engine behaviour


def test_record_and_rollout_columns():
    rep = default_report()
    cols = list(rep.records.columns)
    assert cols[: len(RECORD_COLUMNS)] == RECORD_COLUMNS  # the contract, in order
    # newer engines may append optional columns, but only documented ones
    assert set(cols[len(RECORD_COLUMNS):]) <= set(getattr(report_mod, "EXTRA_RECORD_COLUMNS", []))
    assert list(rep.rollouts.columns) == ROLLOUT_COLUMNS
    assert len(rep.rollouts) == 2 * 3
    assert set(rep.records.config) == {"ext_rkl", "ctx_fkl", "ctx_tok"}
    # one row per node and configuration
    per_node = rep.records.groupby(["prompt_index", "rollout_index", "position"]).config.apply(sorted)
    assert all(v == ["ctx_fkl", "ctx_tok", "ext_rkl"] for v in per_node)


@pytest.mark.parametrize("tail", ["impute", "renormalize"])
def test_records_match_plain_forward_recomputation(tail):
    """Every record is recomputed from its own candidate_success plus plain forward passes and hand formulas."""
    tok, student, teacher = lab()
    rep = default_report(tail)
    tau = 0.8
    T = 6
    cfg_div = {"ext_rkl": "reverse_kl", "ctx_fkl": "forward_kl", "ctx_tok": "sampled_token"}
    n_checked = 0
    for _, r in rep.records.iterrows():
        ex = EXAMPLES[r.prompt_index]
        comp = completion_of(rep, r.prompt_index, r.rollout_index)
        pre = comp[: r.position]
        y = comp[r.position]
        assert r.token_id == y
        assert r.window == int(r.position).bit_length()
        same = (rep.rollouts.prompt_index == r.prompt_index) & (rep.rollouts.rollout_index == r.rollout_index)
        ro = rep.rollouts[same].iloc[0]
        assert r.rollout_reward == ro.reward == has_a(tok.decode(comp, skip_special_tokens=True))
        assert r.rollout_correct == (ro.reward >= 0.5) == ro.correct
        z = plain_next_logits(student, tok(ex["prompt"])["input_ids"] + pre)
        teacher_ids = {
            "ext_rkl": (teacher, tok(ex["prompt"])["input_ids"]),
            "ctx_fkl": (student, tok(TEMPLATE.format(**ex))["input_ids"]),
            "ctx_tok": (student, tok(TEMPLATE.format(**ex))["input_ids"]),
        }
        tmodel, tprompt = teacher_ids[r.config]
        zt = plain_next_logits(tmodel, tprompt + pre)
        # candidates: student top-2, teacher top-1 of EVERY configuration's teacher, the sampled token
        expect = set(torch.topk(z, 2).indices.tolist()) | {y}
        for m, p in {(id(v[0]), tuple(v[1])): v for v in teacher_ids.values()}.values():
            expect |= set(torch.topk(plain_next_logits(m, p + pre), 1).indices.tolist())
        ids = list(r.candidate_ids)
        assert len(ids) == len(set(ids)) and set(ids) == expect
        k = len(ids)
        assert len(r.candidate_probs) == len(r.candidate_success) == len(r.candidate_rollouts) == k
        P = torch.softmax(z / tau, -1)
        np.testing.assert_allclose(r.candidate_probs, P[ids].numpy(), atol=1e-5)
        assert r.covered_mass == pytest.approx(float(P[ids].sum()), abs=1e-5)
        assert r.student_entropy == pytest.approx(entropy_of(z, tau), abs=1e-5)
        assert r.teacher_entropy == pytest.approx(entropy_of(zt, 1.0), abs=1e-5)
        # continuation counts: terminal candidates are scored once; others rollouts_per_branch (+1 base for y_t)
        for j, n in zip(ids, r.candidate_rollouts):
            terminal = j == tok.eos_token_id or r.position + 1 >= T
            assert n == (1 if terminal else 4 + (j == y))
        S = torch.tensor(list(r.candidate_success), dtype=torch.float64)
        assert all(0.0 <= s <= 1.0 for s in S)
        idx = torch.tensor(ids)
        v = float((P[idx] * S).sum() / P[idx].sum())
        assert r.value == pytest.approx(v, abs=1e-5)
        if tail == "impute":
            S_full = torch.full_like(P, v)
            S_full[idx] = S
            g = P * (S_full - v)
            d = _dir(cfg_div[r.config], z, zt, y)
            adv = float(((torch.softmax(zt, -1) - P) * S_full).sum())
        else:
            Pc = P[idx] / P[idx].sum()
            g = Pc * (S - v)
            d = _dir(cfg_div[r.config], z[idx], zt[idx], ids.index(y))
            adv = float(((torch.softmax(zt[idx], -1) - Pc) * S).sum())
        assert r.teacher_advantage == pytest.approx(adv, abs=1e-5)
        assert r.inner == pytest.approx(float(g @ d), abs=1e-5)
        if "g_norm" in r.index:  # optional columns of newer engines
            assert r.g_norm == pytest.approx(float(g.norm()), abs=1e-5)
            assert r.d_norm == pytest.approx(float(d.norm()), abs=1e-5)
        degenerate = g.norm() < 1e-9 or d.norm() < 1e-9
        assert r.degenerate == degenerate
        assert math.isnan(r.alignment) == r.degenerate  # NaN iff degenerate
        if not degenerate:
            assert r.alignment == pytest.approx(float(g @ d / (g.norm() * d.norm())), abs=1e-4)
            n_checked += 1
    assert n_checked >= 10


def test_depth_windows_unit():
    s = oc.RolloutSettings(nodes_per_window=2, max_nodes_per_rollout=5)
    rng = np.random.default_rng(0)
    for length in range(1, 40):
        for _ in range(5):
            pos = select_nodes(length, s, rng)
            assert len(pos) == len(set(pos)) <= 5 and all(0 <= p < length for p in pos)
            wins = [int(p).bit_length() for p in pos]
            for w in set(wins):
                assert wins.count(w) <= 2
            # windows are filled in order: each window holds min(2, its size) picks until the cap binds
            need, w = [], 0
            while sum(need) < 5:
                lo, hi = (0, 1) if w == 0 else (2 ** (w - 1), min(2**w, length))
                if lo >= length:
                    break
                need.append(min(2, hi - lo, 5 - sum(need)))
                w += 1
            assert [wins.count(i) for i in range(len(need))] == need
    # uniform inside a window: window [4, 8) of a long rollout, 4000 draws, chi-square with 3 dof
    s1 = oc.RolloutSettings(nodes_per_window=1, max_nodes_per_rollout=4)
    picks = [select_nodes(100, s1, rng)[3] for _ in range(4000)]
    counts = np.bincount(picks, minlength=8)[4:8]
    assert counts.sum() == 4000
    assert float(((counts - 1000) ** 2 / 1000).sum()) < 30  # P(chi2_3 > 30) ~ 1e-6


def test_nodes_per_rollout_counts_what_select_nodes_picks():
    rng = np.random.default_rng(1)
    for kw in [{}, dict(nodes_per_window=2, max_nodes_per_rollout=5),
               dict(nodes_per_window=3, max_nodes_per_rollout=20), dict(node_selection="all"),
               dict(node_selection="entropy", max_nodes_per_rollout=3),
               dict(node_selection="positions", positions=[0, 3, 3, 9])]:
        s = oc.RolloutSettings(max_new_tokens=40, **kw)
        for length in range(0, 41):
            picked = select_nodes(length, s, rng, rng.random(length))
            assert len(picked) == nodes_per_rollout(s, length), (kw, length)


def test_make_record_holds_the_schema():
    fields = {c: i for i, c in enumerate(RECORD_COLUMNS)}
    rec = make_record(**dict(reversed(list(fields.items()))), d_norm=1.0, g_norm=2.0)
    assert list(rec) == RECORD_COLUMNS + ["g_norm", "d_norm"]
    with pytest.raises(ValueError, match=r"unknown \['bogus'\]"):
        make_record(**fields, bogus=1)
    with pytest.raises(ValueError, match=r"missing \['config'\]"):
        make_record(**{k: v for k, v in fields.items() if k != "config"})
    assert list(make_rollout_record(**{c: 0 for c in reversed(ROLLOUT_COLUMNS)})) == ROLLOUT_COLUMNS


def test_depth_windows_in_engine():
    rep = run(nodes_per_window=1, max_nodes_per_rollout=3, num_rollouts=6, rollouts_per_branch=1)
    rec = rep.records[rep.records.config == "ext_rkl"]
    lengths = {len(c) for c in rep.rollouts.completion_ids}
    assert len(lengths) >= 3, lengths  # several lengths exercised
    for (pi, ri), grp in rec.groupby(["prompt_index", "rollout_index"]):
        length = len(completion_of(rep, pi, ri))
        # windows [0,1),[1,2),[2,4),[4,8),... that a rollout of this length reaches: (length-1).bit_length() + 1
        assert len(grp) == min(3, (length - 1).bit_length() + 1)
        assert sorted(grp.window) == list(range(len(grp)))


def test_entropy_selection_picks_highest_entropy():
    tok, student, _ = lab()
    rep = run(node_selection="entropy", max_nodes_per_rollout=2, rollouts_per_branch=1)
    rec = rep.records[rep.records.config == "ext_rkl"]
    n = 0
    for _, ro in rep.rollouts.iterrows():
        comp = [int(x) for x in ro.completion_ids]
        pids = tok(EXAMPLES[ro.prompt_index]["prompt"])["input_ids"]
        ent = [entropy_of(plain_next_logits(student, pids + comp[:t]), 0.8) for t in range(len(comp))]
        expect = sorted(np.argsort(-np.array(ent))[:2].tolist())
        got = sorted(rec[(rec.prompt_index == ro.prompt_index) & (rec.rollout_index == ro.rollout_index)].position)
        assert got == expect, (ent, got)
        n += len(comp) > 2
    assert n >= 2  # the choice was not forced (rollouts longer than m)


def test_all_and_positions_selection():
    rep = run(node_selection="all", rollouts_per_branch=1)
    rec = rep.records[rep.records.config == "ext_rkl"]
    for _, ro in rep.rollouts.iterrows():
        got = sorted(rec[(rec.prompt_index == ro.prompt_index) & (rec.rollout_index == ro.rollout_index)].position)
        assert got == list(range(len(ro.completion_ids)))
    rep = run(node_selection="positions", positions=[0, 2, 50], rollouts_per_branch=1)
    rec = rep.records[rep.records.config == "ext_rkl"]
    for _, ro in rep.rollouts.iterrows():
        got = sorted(rec[(rec.prompt_index == ro.prompt_index) & (rec.rollout_index == ro.rollout_index)].position)
        assert got == [p for p in (0, 2) if p < len(ro.completion_ids)]


def test_candidates_without_teacher_top_k_and_full_vocab():
    tok, student, _ = lab()
    rep = run(teacher_top_k=0, top_k=1, rollouts_per_branch=1)
    for _, r in rep.records.iterrows():
        comp = completion_of(rep, r.prompt_index, r.rollout_index)
        z = plain_next_logits(student, tok(EXAMPLES[r.prompt_index]["prompt"])["input_ids"] + comp[: r.position])
        assert set(r.candidate_ids) == {int(z.argmax()), comp[r.position]}
    rep = run(top_k=100, teacher_top_k=0, rollouts_per_branch=1)
    for _, r in rep.records.iterrows():
        assert sorted(r.candidate_ids) == list(range(len(tok)))
        assert r.covered_mass == pytest.approx(1.0, abs=1e-6)


def test_pad_equals_eos():
    tok = make_tokenizer(("a", "b", "c"), pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    student = make_model(tok, seed=2, init=0.2)
    rep = oc.diagnose(student, tok, [{"prompt": "ab"}, {"prompt": "cab"}], reward_fn=reward_from(has_a),
                      configs=[oc.TeacherConfig("self", oc.ContextTeacher("{prompt}c"))],
                      settings=settings(num_rollouts=4, node_selection="all", rollouts_per_branch=2), progress=False)
    eos = tok.eos_token_id
    for _, ro in rep.rollouts.iterrows():
        c = list(ro.completion_ids)
        assert eos not in c[:-1] and (c[-1] == eos or len(c) == 6)  # stops at EOS, never treats it as padding
    # left padding with the EOS id must not change the logits: entropies equal plain unpadded forwards
    assert len(rep.records) > 5
    for _, r in rep.records.iterrows():
        comp = completion_of(rep, r.prompt_index, r.rollout_index)
        z = plain_next_logits(student, tok(["ab", "cab"][r.prompt_index])["input_ids"] + comp[: r.position])
        assert r.student_entropy == pytest.approx(entropy_of(z, 0.8), abs=1e-5)


def test_chat_prompts_and_context_teacher_rewrite():
    tok, student, teacher = lab()
    msgs = [{"role": "system", "content": "c"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "ba"}]
    ex = {"prompt": msgs, "answer": "b"}
    frozen = copy.deepcopy(ex)
    cfg = [oc.TeacherConfig("ctx", oc.ContextTeacher("{prompt}:{answer}")),
           oc.TeacherConfig("ext", oc.ExternalTeacher(teacher))]
    seen = []

    def reward(prompts, completions, **cols):
        seen.append((prompts, completions, cols))
        return [float("a" in c[0]["content"]) for c in completions]

    eng = oc.AlignmentEngine(student, tok, cfg, reward, settings(num_rollouts=2, rollouts_per_branch=2))
    tp = eng.teacher_prompt(cfg[0], ex)
    # only the LAST user message is rewritten; {prompt} is its content
    assert tp == msgs[:3] + [{"role": "user", "content": "ba:b"}]
    assert eng.teacher_prompt(cfg[1], ex) == msgs
    assert ex == frozen  # the example is not mutated
    prep = eng.prepare([ex])[0]
    chat_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prep.prompt_ids == tok(chat_text)["input_ids"]
    assert tok.decode(prep.teacher_prompt_ids[0]) == "c|b|a|ba:b|:"
    rep = eng.run([ex])
    assert len(rep.records) > 0
    prompts, completions, cols = seen[0]
    assert prompts[0] == msgs and isinstance(completions[0], list) and completions[0][0]["role"] == "assistant"
    assert cols["answer"][0] == "b"
    # the context teacher's logits really come from the rewritten prompt
    for _, r in rep.records[rep.records.config == "ctx"].iterrows():
        comp = completion_of(rep, 0, r.rollout_index)
        zt = plain_next_logits(student, tok("c|b|a|ba:b|:")["input_ids"] + comp[: r.position])
        assert r.teacher_entropy == pytest.approx(entropy_of(zt, 1.0), abs=1e-5)


def test_chat_prompt_errors():
    tok, student, teacher = lab()
    cfg = [oc.TeacherConfig("ctx", oc.ContextTeacher("{prompt}:"))]
    eng = oc.AlignmentEngine(student, tok, cfg, reward_from(has_a), settings())
    with pytest.raises(ValueError, match="needs a 'user' message"):
        eng.run([{"prompt": [{"role": "system", "content": "ab"}]}])
    plain = make_tokenizer(("a", "b", "c", "|", ":"), unk=True)  # same vocabulary, no chat template
    eng = oc.AlignmentEngine(student, plain, cfg, reward_from(has_a), settings())
    with pytest.raises(ValueError, match="chat_template"):
        eng.run([{"prompt": [{"role": "user", "content": "ab"}]}])


def test_seed_determinism():
    a = run(seed=7, rollouts_per_branch=2)
    b = run(seed=7, rollouts_per_branch=2)
    pd.testing.assert_frame_equal(a.records, b.records)
    pd.testing.assert_frame_equal(a.rollouts, b.rollouts)
    c = run(seed=8, rollouts_per_branch=2)
    assert not a.rollouts.completion.equals(c.rollouts.completion)


def test_results_do_not_depend_on_batch():
    tok, student, teacher = lab()
    both = default_report()
    eng = oc.AlignmentEngine(student, tok, configs(teacher), reward_from(has_a), settings())
    alone = eng.run([EXAMPLES[1]], indices=[1])
    want = both.records[both.records.prompt_index == 1].reset_index(drop=True)
    assert len(want) > 0
    pd.testing.assert_frame_equal(alone.records, want)
    pd.testing.assert_frame_equal(alone.rollouts, both.rollouts[both.rollouts.prompt_index == 1].reset_index(drop=True))


def test_modes_restored_and_no_grad_left():
    tok, student, teacher = lab()
    student.train()
    try:
        run(rollouts_per_branch=1, num_rollouts=1)
        assert student.training and not teacher.training
        assert all(p.grad is None for p in student.parameters())
    finally:
        student.eval()


# ====================================================================================================================
# 7. bad input, raised before any expensive work


def _engine_with_recorder(reward, **kw):
    tok, student, teacher = lab()
    st = settings(**kw)
    inner = TransformersBackend(student, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                                temperature=st.temperature, batch_size=st.batch_size)
    rec = RecordingBackend(inner)
    eng = oc.AlignmentEngine(student, tok, configs(teacher), reward, st, backend=rec)
    return eng, rec


@pytest.mark.parametrize(
    "examples,match",
    [
        ([], "examples is empty.*'prompt'"),
        (None, "examples is None"),
        ([{"question": "ab"}], "example 0 has no 'prompt' field.*add one"),
        ([{"prompt": "ab", "answer": "c"}, {"prompt": "b"}], "names field 'answer', which example 1 does not have"),
    ],
)
def test_bad_examples_raise_before_any_forward(examples, match):
    eng, rec = _engine_with_recorder(reward_from(has_a))
    counter, remove = count_forwards(eng.student)
    try:
        with pytest.raises(ValueError, match=match):
            eng.run(examples)
    finally:
        remove()
    assert counter[0] == 0 and rec.sample_calls == rec.branch_calls == rec.logits_calls == []


def test_bad_prompt_type():
    eng, rec = _engine_with_recorder(reward_from(has_a))
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        eng.run([{"prompt": 3}])
    assert rec.sample_calls == []


def test_external_teacher_vocab_mismatch():
    tok, student, _ = lab()
    other = make_model(make_tokenizer(("a", "b", "c", "|", ":", "q"), unk=True), seed=0)  # 9 tokens vs 8
    counter, remove = count_forwards(student)
    try:
        with pytest.raises(ValueError) as exc:
            oc.diagnose(student, tok, EXAMPLES, reward_fn=reward_from(has_a),
                        configs=[oc.TeacherConfig("big", oc.ExternalTeacher(other))], settings=settings(),
                        progress=False)
    finally:
        remove()
    msg = str(exc.value)
    assert "'big'" in msg and "has 9 entries" in msg and "student's has 8" in msg
    assert "student's tokenizer" in msg  # names the fix
    assert counter[0] == 0


def test_teacher_tokenizer_mismatch():
    tok, student, _ = lab()
    other_tok = make_tokenizer(("b", "a", "c", "|", ":"), unk=True)  # same size, different token->id map
    twin = make_model(other_tok, seed=1)
    with pytest.raises(ValueError, match="tokenizer differs"):
        oc.AlignmentEngine(student, tok, [oc.TeacherConfig("t", oc.ExternalTeacher(twin, tokenizer=other_tok))],
                           reward_from(has_a), settings())


def wrong_length(prompts, completions, **kw):
    return [0.0] * (len(completions) + 1)


def nan_reward(prompts, completions, **kw):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def none_reward(prompts, completions, **kw):
    return [None] * len(completions)


def raising_reward(prompts, completions, **kw):
    raise KeyError("boom")


def scalar_reward(prompts, completions, **kw):
    return 1.0


def string_reward(prompts, completions, **kw):
    return ["correct"] * len(completions)  # float("correct") raises ValueError, not TypeError


@pytest.mark.parametrize(
    "fn,match",
    [
        (wrong_length, r"wrong_length returned 4 rewards for 3 completions"),
        (nan_reward, r"nan_reward returned a non-finite reward"),
        (none_reward, r"none_reward returned a non-finite reward \(NaN/inf/None\)"),
        (raising_reward, r"raising_reward raised KeyError: 'boom'"),
        (scalar_reward, r"scalar_reward returned float; it must return a list of 3 floats"),
        (string_reward, r"string_reward returned list; it must return a list of 3 floats"),
    ],
)
def test_reward_errors_raised_before_targeted_rollouts(fn, match):
    eng, rec = _engine_with_recorder(fn)
    with pytest.raises(oc.RewardFunctionError, match=match) as exc:
        eng.run(EXAMPLES)
    # exactly one sampling call happened: the 3 base rollouts of the first prompt; no continuation, no node logits
    assert rec.sample_calls == [3]
    assert rec.branch_calls == [] and rec.logits_calls == []
    if fn is raising_reward:
        assert isinstance(exc.value.__cause__, KeyError)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(teacher_top_k=-1), "teacher_top_k must be >= 0"),
        (dict(num_rollouts=0), "num_rollouts must be >= 1"),
        (dict(tail="drop"), "tail must be 'impute' or 'renormalize'"),
        (dict(node_selection="positions"), "needs a non-empty positions list"),
        (dict(temperature=0.0), "temperature must be > 0"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        settings(**kw)


def test_bad_configs():
    tok, student, teacher = lab()
    ext = oc.ExternalTeacher(teacher)
    with pytest.raises(ValueError, match=r"unknown divergence 'kl'.*reverse_kl"):
        oc.TeacherConfig("a", ext, divergence="kl")
    with pytest.raises(ValueError, match=r"contains '/'.*rename"):
        oc.TeacherConfig("a/b", ext)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        oc.TeacherConfig("a", ext, divergence="topk", top_k=0)
    with pytest.raises(ValueError, match="beta must be in"):
        oc.TeacherConfig("a", ext, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"names must be unique; repeated: \['x'\]"):
        oc.AlignmentEngine(student, tok, [oc.TeacherConfig("x", ext), oc.TeacherConfig("x", ext, divergence="jsd")],
                           reward_from(has_a), settings())
    with pytest.raises(ValueError, match="configs is empty"):
        oc.AlignmentEngine(student, tok, [], reward_from(has_a), settings())
    with pytest.raises(ValueError, match=r"positional field"):
        oc.ContextTeacher("{}|{answer}")
