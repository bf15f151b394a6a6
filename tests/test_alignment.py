"""The ideal gradient (autograd, finite differences, Monte Carlo Dr. GRPO identity) and score_node (hand formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd_callback import cosine, ideal_gradient, score_node

V = 9
ATOL = 1e-12  # float64 closed form vs autograd: rounding only


def _setup(seed: int, tau: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    S = torch.rand(V, generator=g, dtype=torch.float64)
    return z, torch.softmax(z / tau, -1), S


def _autograd_of_value(z: torch.Tensor, S: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    zz = z.clone().requires_grad_(True)
    L = (torch.softmax(zz / tau, -1) * S).sum()
    (grad,) = torch.autograd.grad(L, zz)
    return grad


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_ideal_gradient_all_candidates_is_autograd(tau):
    z, P, S = _setup(0, tau)
    g, s_full, value = ideal_gradient(P, torch.arange(V), S)
    # autograd includes the chain-rule factor 1/tau, which ideal_gradient drops by design (method.md §3)
    torch.testing.assert_close(g, tau * _autograd_of_value(z, S, tau), atol=ATOL, rtol=0)
    torch.testing.assert_close(s_full, S)
    assert value == pytest.approx(float((P * S).sum()), abs=1e-14)
    assert abs(float(g.sum())) < 1e-14


def test_ideal_gradient_impute():
    z, P, S_all = _setup(1)
    cand = torch.tensor([5, 0, 3, 7])
    S = S_all[cand]
    g, s_full, value = ideal_gradient(P, cand, S, tail="impute")
    v_hat = float((P[cand] * S).sum() / P[cand].sum())
    S_imp = torch.full((V,), v_hat, dtype=torch.float64)
    S_imp[cand] = S
    torch.testing.assert_close(g, _autograd_of_value(z, S_imp), atol=ATOL, rtol=0)
    torch.testing.assert_close(s_full, S_imp, atol=ATOL, rtol=0)
    assert value == pytest.approx(v_hat, abs=1e-14)  # imputing V_hat leaves V = V_hat
    outside = torch.ones(V, dtype=torch.bool)
    outside[cand] = False
    assert g[outside].abs().max() < 1e-15
    assert abs(float(g.sum())) < 1e-14
    assert g[cand].abs().min() > 1e-6  # non-trivial inside C


def test_ideal_gradient_renormalize():
    z, P, S_all = _setup(2)
    cand = torch.tensor([4, 1, 8])
    S = S_all[cand]
    g, s_vec, value = ideal_gradient(P, cand, S, tail="renormalize")
    # the restricted problem: L(z_C) = sum_{j in C} softmax(z_C)_j S_j, gradient w.r.t. z_C in candidate order
    torch.testing.assert_close(g, _autograd_of_value(z[cand], S), atol=ATOL, rtol=0)
    torch.testing.assert_close(s_vec, S)
    assert value == pytest.approx(float((torch.softmax(z[cand], -1) * S).sum()), abs=1e-14)
    with pytest.raises(ValueError, match="tail"):
        ideal_gradient(P, cand, S, tail="bogus")


def test_first_order_finite_differences():
    z, P, S = _setup(3)
    g, _, _ = ideal_gradient(P, torch.arange(V), S)
    dz = torch.randn(V, generator=torch.Generator().manual_seed(33), dtype=torch.float64)

    def value(zz):
        return float((torch.softmax(zz, -1) * S).sum())

    def err(grad, h):
        return abs(value(z + h * dz) - value(z) - h * float(grad @ dz))

    h = 1e-2
    e1, e2 = err(g, h), err(g, h / 2)
    # second-order remainder: halving h divides the error by 4 (the O(h^3) term shifts it by ~h, so [3.5, 4.5]);
    # float64 rounding (~1e-16) is far below e2 (~1e-6)
    assert e1 > 1e-9
    assert 3.5 < e1 / e2 < 4.5, (e1, e2)
    # power check: a wrong gradient (the advantage without the P factor) leaves a first-order error (ratio ~2)
    wrong = S - float((P * S).sum())
    w1, w2 = err(wrong, h), err(wrong, h / 2)
    assert 1.7 < w1 / w2 < 2.3 and w1 > 100 * e1


def test_dr_grpo_identity_monte_carlo():
    z, P, S = _setup(4)
    g, _, value = ideal_gradient(P, torch.arange(V), S)
    rng = np.random.default_rng(0)
    n = 400_000
    p = P.numpy()
    y = rng.choice(V, size=n, p=p)
    R = (rng.random(n) < S.numpy()[y]).astype(np.float64)
    X = -(R - value)[:, None] * p[None, :]
    X[np.arange(n), y] += R - value  # X_i = (R_i - V)(e_{y_i} - P)
    mean = X.mean(0)
    se = X.std(0, ddof=1) / math.sqrt(n)
    # z-test per component at 4.5 sigma (two-sided p ~ 7e-6 each, 9 components): CLT is excellent at n=4e5
    dev = np.abs(mean - g.numpy())
    assert np.all(dev <= 4.5 * se), (dev / se)
    # power: the advantage without the P factor is far outside the same tolerance
    wrong = (S - value).numpy()
    assert np.any(np.abs(mean - wrong) > 20 * se)


# ------------------------------------------------------------------------------------------------------ score_node


def _hand_kl(a, b):
    return float((a * (a.log() - b.log())).sum())


def _rev_kl_dir(z, zt, tau):
    p, q = torch.softmax(z / tau, -1), torch.softmax(zt / tau, -1)
    r = q.log() - p.log()
    return p * (r - (p * r).sum()) / tau


def _fwd_kl_dir(z, zt, tau):
    return (torch.softmax(zt / tau, -1) - torch.softmax(z / tau, -1)) / tau


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_score_node_impute_by_hand(tau):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(V, generator=gen, dtype=torch.float64) * 1.5
    zt1 = torch.randn(V, generator=gen, dtype=torch.float64) * 1.5
    zt2 = torch.randn(V, generator=gen, dtype=torch.float64) * 1.5
    cand = torch.tensor([2, 6, 0, 5])
    S = torch.tensor([0.9, 0.1, 0.4, 0.7], dtype=torch.float64)
    tau_c = [tau, 1.0]
    ns = score_node(z, [zt1, zt2], ["reverse_kl", "forward_kl"], cand, S, sampled_token=6, temperature=tau,
                    teacher_temperatures=tau_c)
    P = torch.softmax(z / tau, -1)
    v_hat = float((P[cand] * S).sum() / P[cand].sum())
    S_full = torch.full((V,), v_hat, dtype=torch.float64)
    S_full[cand] = S
    g = P * (S_full - v_hat)
    assert ns.value == pytest.approx(v_hat, abs=1e-12)
    assert ns.covered_mass == pytest.approx(float(P[cand].sum()), abs=1e-12)
    assert ns.student_entropy == pytest.approx(float(-(P * P.log()).sum()), abs=1e-12)
    torch.testing.assert_close(ns.g, g, atol=1e-12, rtol=0)
    dirs = [_rev_kl_dir(z, zt1, tau_c[0]), _fwd_kl_dir(z, zt2, tau_c[1])]
    for cs, zt, d, tc in zip(ns.configs, [zt1, zt2], dirs, tau_c):
        assert not cs.degenerate
        assert cs.alignment == pytest.approx(_cos(g, d), abs=1e-10)
        assert cs.inner == pytest.approx(float(g @ d), abs=1e-12)
        Pc, Q = torch.softmax(z / tc, -1), torch.softmax(zt / tc, -1)
        # teacher advantage: student's sampling P against the teacher's Q, on the imputed success vector
        assert cs.teacher_advantage == pytest.approx(float(((Q - P) * S_full).sum()), abs=1e-12)
        assert cs.kl_reverse == pytest.approx(_hand_kl(Pc, Q), abs=1e-12)
        assert cs.kl_forward == pytest.approx(_hand_kl(Q, Pc), abs=1e-12)
        M = 0.5 * (Pc + Q)
        assert cs.js == pytest.approx(0.5 * _hand_kl(Pc, M) + 0.5 * _hand_kl(Q, M), abs=1e-12)
        assert cs.teacher_entropy == pytest.approx(float(-(Q * Q.log()).sum()), abs=1e-12)
    assert ns.configs[0].kl_reverse != pytest.approx(ns.configs[0].kl_forward, abs=1e-3)


def test_score_node_renormalize_by_hand():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(V, generator=gen, dtype=torch.float64) * 1.5
    zt = torch.randn(V, generator=gen, dtype=torch.float64) * 1.5
    cand = torch.tensor([3, 1, 7])
    S = torch.tensor([0.2, 0.8, 0.5], dtype=torch.float64)
    ns = score_node(z, [zt, zt], ["reverse_kl", "sampled_token"], cand, S, sampled_token=7, tail="renormalize")
    Pc = torch.softmax(z[cand], -1)
    Qc = torch.softmax(zt[cand], -1)
    v = float((Pc * S).sum())
    g = Pc * (S - v)
    torch.testing.assert_close(ns.g, g, atol=1e-12, rtol=0)
    assert ns.value == pytest.approx(v, abs=1e-12)
    d_rev = _rev_kl_dir(z[cand], zt[cand], 1.0)
    a = float(Qc[2].log() - Pc[2].log())  # sampled token 7 is candidate slot 2
    d_st = a * (torch.eye(3, dtype=torch.float64)[2] - Pc)
    for cs, d in zip(ns.configs, [d_rev, d_st]):
        assert cs.alignment == pytest.approx(_cos(g, d), abs=1e-10)
        assert cs.teacher_advantage == pytest.approx(float(((Qc - Pc) * S).sum()), abs=1e-12)
        assert cs.kl_reverse == pytest.approx(_hand_kl(Pc, Qc), abs=1e-12)
    with pytest.raises(ValueError, match="sampled token must be one of the candidates"):
        score_node(z, [zt], ["reverse_kl"], cand, S, sampled_token=0, tail="renormalize")


def test_score_node_degenerate():
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(V, generator=gen, dtype=torch.float64)
    zt = torch.randn(V, generator=gen, dtype=torch.float64)
    cand = torch.arange(V)
    # all candidates equally successful: g = 0 -> every configuration degenerate, alignment NaN
    for s in (0.0, 1.0, 0.37):
        ns = score_node(z, [zt, zt], ["reverse_kl", "forward_kl"], cand, torch.full((V,), s, dtype=torch.float64), 0)
        assert ns.g.abs().max() < 1e-12
        assert all(cs.degenerate and math.isnan(cs.alignment) for cs in ns.configs)
    # teacher == student: d = 0 for that configuration only
    S = torch.rand(V, generator=gen, dtype=torch.float64)
    ns = score_node(z, [z.clone(), zt], ["reverse_kl", "reverse_kl"], cand, S, 0)
    same, other = ns.configs
    assert same.degenerate and math.isnan(same.alignment)
    assert same.kl_reverse == pytest.approx(0.0, abs=1e-14) and same.teacher_advantage == pytest.approx(0.0, abs=1e-14)
    assert not other.degenerate and -1.0 <= other.alignment <= 1.0


def test_cosine_helper():
    a = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    c, inner, deg = cosine(a, b)
    assert inner == pytest.approx(0.5 - 2.0 - 3.0)
    assert c == pytest.approx(inner / math.sqrt(6.0) / math.sqrt(10.25))
    assert not deg
    c, inner, deg = cosine(a, torch.zeros(3))
    assert deg and math.isnan(c) and inner == 0.0
