"""The adaptive allocation's error model and greedy allocator (opd_callback/core/allocation.py), against independent
truth: a Monte-Carlo simulation of the real estimator (binomial S_hat through score_node), and brute-force search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from opd_callback.core.alignment import score_node
from opd_callback.core.allocation import NodeErrorModel, greedy_allocation


def _node(p, d, s, sigma, n, m=256, seed=0):
    p = np.asarray(p, dtype=np.float64)
    return NodeErrorModel(
        q=p,
        d=np.asarray(d, dtype=np.float64),
        d_norm=np.linalg.norm(np.asarray(d, dtype=np.float64), axis=1),
        s_hat=np.asarray(s, dtype=np.float64),
        sigma=np.asarray(sigma, dtype=np.float64),
        n=np.asarray(n, dtype=np.float64),
        eps=np.random.default_rng(seed).standard_normal((m, len(p))),
    )


@pytest.mark.parametrize("n", [16, 64, 256])
def test_error_model_matches_simulated_estimator(n):
    """Predicted E|cos_hat - cos| equals the error of the real estimator: S_hat ~ Binomial(n, S)/n scored by
    score_node (full vocabulary, tail='impute', two configurations), within Monte-Carlo error."""
    torch.manual_seed(0)
    V = 8
    z = torch.tensor([2.0, 1.6, 0.3, -0.5, -1.0, -2.0, -3.0, -3.0], dtype=torch.float64)
    zts = [torch.randn(V, dtype=torch.float64), torch.randn(V, dtype=torch.float64)]
    cand = torch.tensor([0, 1, 2, 3])
    S = np.array([0.55, 0.45, 0.3, 0.8])
    truth = score_node(z, zts, ["reverse_kl", "forward_kl"], cand, torch.tensor(S), 0)
    ref = np.array([c.alignment for c in truth.configs])
    rng = np.random.default_rng(1)
    errs = []
    for _ in range(1500):
        s_hat = rng.binomial(n, S) / n
        ns = score_node(z, zts, ["reverse_kl", "forward_kl"], cand, torch.tensor(s_hat), 0)
        est = np.array([0.0 if c.degenerate else c.alignment for c in ns.configs])
        errs.append(np.abs(est - ref).mean())
    sim, se = float(np.mean(errs)), float(np.std(errs) / np.sqrt(len(errs)))
    p = torch.softmax(z, -1)[cand].numpy()
    d = np.stack([c.d.numpy() for c in truth.configs])
    model = NodeErrorModel(q=p, d=d[:, cand.numpy()], d_norm=np.linalg.norm(d, axis=1), s_hat=S,
                           sigma=np.sqrt(S * (1 - S)), n=np.full(4, float(n)),
                           eps=np.random.default_rng(2).standard_normal((4000, 4)))
    pred = float(model.errors(np.zeros(4, dtype=np.int64))[0])
    print(f"n={n}: simulated {sim:.4f} +- {se:.4f}, predicted {pred:.4f}")
    # the normal approximation of a binomial mean: agreement within 4 se + 10% of the value
    assert abs(pred - sim) <= 4 * se + 0.1 * sim


def test_errors_shrink_with_samples_and_bumps_are_rows():
    m = _node([0.6, 0.4], [[1.0, -1.0]], [0.5, 0.45], [0.5, 0.5], [8, 8])
    e = m.errors(np.zeros(2, dtype=np.int64), bumps=[(0, 8), (1, 8)])
    assert e.shape == (3,)
    assert e[1] < e[0] and e[2] < e[0]
    big = m.errors(np.array([100_000, 100_000]))[0]
    assert big < 0.05 * e[0]


def test_greedy_respects_total_rooms_and_exact_candidates():
    a = _node([0.5, 0.3, 0.2], [[1.0, 0.0, -1.0]], [0.5, 0.6, 1.0], [0.5, 0.49, 0.0], [4, 4, 1])
    b = _node([0.7, 0.3], [[1.0, -1.0]], [0.4, 0.5], [0.49, 0.5], [4, 4], seed=1)
    extra = greedy_allocation(100, [a, b], [30, 1000])
    assert extra[0][2] == 0  # sigma = 0: known exactly, never sampled
    assert extra[0].sum() <= 30
    assert extra[0].sum() + extra[1].sum() == 100
    assert all((e >= 0).all() for e in extra)


def test_greedy_prefers_the_unresolved_node():
    """Node A is decided (S differ by 0.8 with 16 samples each), node B is a near tie that more samples resolve: B gets
    the budget until the model predicts it resolved (~100 more each); what is left after that (nothing helps) evens
    out the counts."""
    a = _node([0.6, 0.4], [[1.0, -1.0]], [0.9, 0.1], [0.3, 0.3], [16, 16])
    b = _node([0.6, 0.4], [[1.0, -1.0]], [0.6, 0.45], [0.49, 0.5], [16, 16], seed=1)
    extra = greedy_allocation(160, [a, b], [10_000, 10_000])
    assert extra[0].sum() == 0 and extra[1].sum() == 160
    extra = greedy_allocation(2000, [a, b], [10_000, 10_000])
    assert extra[0].sum() + extra[1].sum() == 2000
    assert extra[1].sum() >= extra[0].sum() > 0


def test_greedy_is_close_to_brute_force_optimum():
    nodes = [
        _node([0.6, 0.4], [[1.0, -1.0]], [0.6, 0.45], [0.49, 0.5], [4, 4], seed=0),
        _node([0.5, 0.3, 0.2], [[0.2, 1.0, -1.2]], [0.7, 0.5, 0.2], [0.46, 0.5, 0.4], [4, 4, 4], seed=1),
    ]
    total, unit = 24, 4

    def objective(alloc):
        return sum(float(m.errors(np.asarray(x, dtype=np.int64))[0]) for m, x in zip(nodes, alloc))

    best = np.inf
    slots = total // unit
    for counts in itertools.product(range(slots + 1), repeat=5):
        if sum(counts) != slots:
            continue
        alloc = [np.array(counts[:2]) * unit, np.array(counts[2:]) * unit]
        best = min(best, objective(alloc))
    got = objective(greedy_allocation(total, nodes, [1000, 1000], max_units=slots))
    base = objective([np.zeros(2, dtype=np.int64), np.zeros(3, dtype=np.int64)])
    print(f"no extra {base:.4f}, greedy {got:.4f}, optimum {best:.4f}")
    assert got <= best + 0.1 * (base - best)  # within 10% of the achievable reduction
