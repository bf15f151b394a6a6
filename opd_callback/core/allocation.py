"""Adaptive allocation of targeted-rollout continuations (``RolloutSettings(adaptive=True)``).

What we estimate at a node is ``cos(g(S), d_c)`` for each configuration ``c``, where ``S`` holds the candidates'
success probabilities and ``g_j = q_j (S_j - q.S / sum q)`` on the candidate set (``q``: the candidates' student
probabilities, renormalised under ``tail="renormalize"``). Its error is not well described by the error of ``g``:
when the student's mass sits on two tokens, ``g`` and ``d`` are nearly one-dimensional and the cosine is +-1, decided
by the *sign* of ``S_a - S_b``; a small error in ``S`` flips it by 2, and a delta-method (linearised) error model
sees nothing there. So the error model here is the one the score actually has:

    err(n) = E | cos(g(S_hat + sigma / sqrt(n) * eps), d_c) - cos(g(S_hat), d_c) |,    eps ~ N(0, I)

averaged over configurations and a fixed set of ``M`` normal draws (common random numbers, so that comparisons
between allocations are smooth). ``sigma_k^2 = m (1 - m)`` with ``m`` a smoothed mean: the largest variance a reward
in [0, 1] with that mean can have. :func:`greedy_allocation` spends a budget in units, each to the (node, candidate)
whose continuations most reduce the sum of the nodes' predicted errors (a lazy heap: only the chosen node is
re-evaluated).

This module is plain numpy and imports neither TRL nor wandb.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["NodeErrorModel", "SaturatedNodeModel", "greedy_allocation", "SATURATION_MIN_SAMPLES"]

# a node whose outcomes are all equal stops once each of its sampled candidates has at least this many continuations
# (the engine also requires half the uniform share)
SATURATION_MIN_SAMPLES = 8


@dataclass
class NodeErrorModel:
    """Predicted alignment error of one node as a function of its continuation counts.

    Attributes:
        q: ``[K]`` candidate weights of ``g`` (student probabilities on ``C``; renormalised under ``"renormalize"``).
        d: ``[n_configs, K]`` each configuration's direction restricted to the candidates.
        d_norm: ``[n_configs]`` the full norms of the directions (entries outside ``C`` count in ``|d|``).
        s_hat: ``[K]`` current success estimates.
        sigma: ``[K]`` per-sample standard deviation of each candidate's outcome (0 for exactly known ones).
        n: ``[K]`` continuations so far (>= 1 where ``sigma > 0``).
        eps: ``[M, K]`` fixed standard-normal draws.
    """

    q: np.ndarray
    d: np.ndarray
    d_norm: np.ndarray
    s_hat: np.ndarray
    sigma: np.ndarray
    n: np.ndarray
    eps: np.ndarray

    def _cos(self, s: np.ndarray) -> np.ndarray:
        """``cos(g(s), d_c)`` for ``s`` of shape ``[..., K]``; returns ``[..., n_configs]`` (0 where ``g = 0``)."""
        q = self.q
        g = q * (s - (s @ q)[..., None] / q.sum())
        gn = np.linalg.norm(g, axis=-1, keepdims=True)
        inner = g @ self.d.T
        with np.errstate(invalid="ignore", divide="ignore"):
            out = inner / (gn * self.d_norm)
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)

    def errors(self, extra: np.ndarray, bumps: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        """Predicted error with ``extra`` more continuations per candidate (first entry), and with ``amount`` more on
        candidate ``j`` for each ``(j, amount)`` of ``bumps`` (one entry each). Shape ``[1 + len(bumps)]``."""
        k = len(self.q)
        counts = np.repeat((self.n + extra)[None, :].astype(np.float64), 1 + len(bumps), axis=0)
        for row, (j, amount) in enumerate(bumps, start=1):
            counts[row, j] += amount
        sd = np.where(self.sigma > 0, self.sigma / np.sqrt(np.maximum(counts, 1.0)), 0.0)  # [B, K]
        draws = self.s_hat[None, None, :] + sd[:, None, :] * self.eps[None, :, :k]  # [B, M, K]
        ref = self._cos(self.s_hat)  # [C]
        return np.abs(self._cos(draws) - ref).mean(axis=(1, 2))


@dataclass
class SaturatedNodeModel:
    """A node whose outcomes so far are all equal (``g`` estimates to 0), before it has enough samples to stop.

    Its estimate is degenerate; it stops being so once some continuation differs. Under a Jeffreys prior the chance
    that the next continuation of candidate ``k`` differs is ``r_k = 0.5 / (n_k + 1)``, so the predicted error with
    ``x`` more continuations is ``prod_k (1 - r_k)^x_k`` (an unresolved alignment has error ~1). The same interface
    as :class:`NodeErrorModel`, so both kinds compete for the budget in :func:`greedy_allocation`.
    """

    sigma: np.ndarray  # > 0 for candidates that can be sampled
    n: np.ndarray

    def errors(self, extra: np.ndarray, bumps: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        r = np.where(self.sigma > 0, 0.5 / (self.n + 1.0), 0.0)
        log_keep = np.log1p(-r)
        base = float(np.sum(extra * log_keep))
        return np.exp([base] + [base + amount * log_keep[j] for j, amount in bumps])


def greedy_allocation(
    total: int, models: Sequence[NodeErrorModel | SaturatedNodeModel], rooms: Sequence[int], *, max_units: int = 512
) -> list[np.ndarray]:
    """Spend ``total`` continuations over nodes to minimise the sum of their predicted errors.

    ``rooms[i]`` caps how many more node ``i`` may get. Continuations go in units of ``ceil(total / max_units)``;
    candidates with ``sigma = 0`` (known exactly) never get any. Returns the extra continuations per candidate of
    each node (what is left over when every node is full or nothing helps stays unspent).
    """
    unit = max(1, math.ceil(total / max_units))
    extra = [np.zeros(len(m.n), dtype=np.int64) for m in models]
    room = [int(r) for r in rooms]
    version = [0] * len(models)
    heap: list[tuple[float, float, int, int, int]] = []

    def push(i: int) -> None:
        if room[i] < unit:
            return
        m = models[i]
        live = [j for j in range(len(m.n)) if m.sigma[j] > 0]
        if not live:
            return
        # a unit changes the error by a hair (and, with fixed draws, often by exactly 0): measure the slope over a
        # doubling of the candidate's count instead (a secant), and rank candidates by gain per continuation
        steps = [max(unit, int(m.n[j] + extra[i][j])) for j in live]
        err = m.errors(extra[i], list(zip(live, steps)))
        for j, step, e in zip(live, steps, err[1:]):  # ties (nothing helps) go to the candidate with the fewest samples
            gain = float(err[0] - e) / step if err[0] - e > 1e-9 else 0.0  # below 1e-9: rounding, not a gain
            heapq.heappush(heap, (-gain, float(m.n[j] + extra[i][j]), i, j, version[i]))

    for i in range(len(models)):
        push(i)
    left = int(total)
    while left >= unit and heap:
        _, _, i, j, ver = heapq.heappop(heap)
        if ver != version[i] or room[i] < unit:
            continue
        extra[i][j] += unit
        room[i] -= unit
        left -= unit
        version[i] += 1
        push(i)
    return extra
