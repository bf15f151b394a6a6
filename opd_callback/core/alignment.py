"""The ideal per-node gradient and the gradient alignment score (method.md §3–§5), on plain tensors.

At a node ``u`` the student's next-token distribution is ``P = softmax(z/tau)``. Targeted rollouts give the success
probability ``S_j`` of each candidate token ``j`` in the candidate set ``C``. The ideal logit gradient is

    g_j = P_j (S_j - V),      V = sum_k P_k S_k

and a distillation direction ``d`` is scored by ``cos(g, d)``. Tokens outside ``C`` have unknown ``S``: ``tail="impute"``
sets ``S_j = V_hat`` there (full-vocabulary vectors, ``g`` zero outside ``C``), ``tail="renormalize"`` restricts every
distribution to ``C``. This module imports neither TRL nor wandb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from opd_callback.core.divergences import LossFn, divergence_direction

__all__ = [
    "ideal_gradient",
    "cosine",
    "NodeScore",
    "ConfigScore",
    "score_node",
    "window_index",
    "entropy",
]


def window_index(position: int) -> int:
    """Exponential depth window of a completion position: 0 -> 0, 1 -> 1, [2,4) -> 2, [4,8) -> 3, ..."""
    return int(position).bit_length()


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).nan_to_num(0.0).sum(-1)


def ideal_gradient(
    probs: torch.Tensor, candidate_ids: torch.Tensor, candidate_success: torch.Tensor, tail: str = "impute"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ideal logit gradient of ``L = sum_k P_k S_k`` at one node.

    Args:
        probs: ``[V]`` the student's sampling distribution ``P``.
        candidate_ids: ``[K]`` distinct token ids of the candidate set ``C``.
        candidate_success: ``[K]`` estimated success probabilities ``S_j``.
        tail: ``"impute"`` (full-vocabulary ``g``, ``S = V_hat`` outside ``C``) or ``"renormalize"`` (``g`` on ``C``
            with ``P`` renormalised to ``C``; entries follow ``candidate_ids``).

    Returns:
        ``(g, S_full, value)``: the gradient, the success vector in the same space, and ``V``.
    """
    p = probs.to(torch.float64)
    s = candidate_success.to(torch.float64)
    pc = p[candidate_ids]
    covered = pc.sum()
    if tail == "impute":
        v_hat = (pc * s).sum() / covered.clamp_min(1e-300)
        s_full = torch.full_like(p, float(v_hat))
        s_full[candidate_ids] = s
        value = float((p * s_full).sum())
        g = p * (s_full - value)
        return g, s_full, value
    if tail == "renormalize":
        pr = pc / covered.clamp_min(1e-300)
        value = float((pr * s).sum())
        return pr * (s - value), s, value
    raise ValueError(f"tail must be 'impute' or 'renormalize', got {tail!r}")


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> tuple[float, float, bool]:
    """``(cos, inner, degenerate)``: cosine of two vectors, their inner product, and whether either norm < eps."""
    a = a.to(torch.float64).reshape(-1)
    b = b.to(torch.float64).reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    inner = float(a @ b)
    if na < eps or nb < eps:
        return float("nan"), inner, True
    return inner / (na * nb), inner, False


@dataclass
class ConfigScore:
    """Per (node, configuration) quantities (method.md §5)."""

    alignment: float
    inner: float
    teacher_advantage: float
    kl_reverse: float
    kl_forward: float
    js: float
    teacher_entropy: float
    degenerate: bool
    # norms of g and d in the scored space (with ``inner`` they give rollout-level cosines: the oracle mask gain)
    g_norm: float = float("nan")
    d_norm: float = float("nan")
    # the direction d itself (same space as ``NodeScore.g``), for parameter-space scoring; not recorded
    d: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # set only when ``alignment`` was replaced by a parameter-space cosine: the logit-space one
    alignment_logits: float | None = None


@dataclass
class NodeScore:
    value: float
    covered_mass: float
    student_entropy: float
    g: torch.Tensor
    configs: list[ConfigScore]
    # token ids of the entries of ``g`` / ``d`` under ``tail="renormalize"`` (None: the full vocabulary)
    support: torch.Tensor | None = field(default=None, repr=False, compare=False)


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> float:
    return float((lp.exp() * (lp - lq)).nan_to_num(0.0).sum())


def _js(lp: torch.Tensor, lq: torch.Tensor) -> float:
    lm = torch.logsumexp(torch.stack([lp, lq]), dim=0) - torch.log(torch.tensor(2.0, dtype=lp.dtype))
    return 0.5 * _kl(lp, lm) + 0.5 * _kl(lq, lm)


def score_node(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    divergences: Sequence[str | LossFn],
    candidate_ids: torch.Tensor,
    candidate_success: torch.Tensor,
    sampled_token: int,
    *,
    temperature: float = 1.0,
    teacher_temperatures: Sequence[float] | None = None,
    betas: Sequence[float | None] | None = None,
    top_ks: Sequence[int | None] | None = None,
    tail: str = "impute",
    eps: float = 1e-9,
) -> NodeScore:
    """Score every teacher configuration at one node.

    ``student_logits`` ``[V]``; ``teacher_logits[c]`` ``[V]``; ``divergences[c]`` a registered name or a callable loss.
    The student's sampling distribution uses ``temperature``; each configuration's loss uses its own temperature (TRL:
    it divides both sides' logits). Everything is computed in float64.
    """
    n = len(teacher_logits)
    t_temps = list(teacher_temperatures) if teacher_temperatures is not None else [1.0] * n
    betas = list(betas) if betas is not None else [None] * n
    top_ks = list(top_ks) if top_ks is not None else [None] * n
    z = student_logits.detach().to(torch.float64).cpu()
    cand = candidate_ids.detach().cpu().long()
    s = candidate_success.detach().to(torch.float64).cpu()
    lp_full = F.log_softmax(z / temperature, dim=-1)
    p_full = lp_full.exp()
    covered = float(p_full[cand].sum())
    g, s_vec, value = ideal_gradient(p_full, cand, s, tail)
    if tail == "renormalize":
        z_space = z[cand]
        p_space = torch.softmax(z_space / temperature, dim=-1)
        matches = (cand == int(sampled_token)).nonzero()
        if len(matches) == 0:
            raise ValueError("the sampled token must be one of the candidates")
        sampled_space = matches[0, 0]
    else:
        z_space = z
        p_space = p_full
        sampled_space = torch.tensor(int(sampled_token))
    out: list[ConfigScore] = []
    g_norm = float(g.norm())
    for c in range(n):
        zt = teacher_logits[c].detach().to(torch.float64).cpu()
        zt_space = zt[cand] if tail == "renormalize" else zt
        tau_c = float(t_temps[c])
        d = divergence_direction(
            divergences[c],
            z_space,
            zt_space,
            sampled=sampled_space.reshape(()),
            beta=betas[c],
            temperature=tau_c,
            top_k=top_ks[c],
        )
        cos, inner, degenerate = cosine(g, d, eps)
        lq_space = F.log_softmax(zt_space / tau_c, dim=-1)
        lp_space_c = F.log_softmax(z_space / tau_c, dim=-1)
        q_space = lq_space.exp()
        adv = float(((q_space - p_space) * s_vec).sum())
        out.append(
            ConfigScore(
                alignment=cos,
                inner=inner,
                teacher_advantage=adv,
                kl_reverse=_kl(lp_space_c, lq_space),
                kl_forward=_kl(lq_space, lp_space_c),
                js=_js(lp_space_c, lq_space),
                teacher_entropy=float(entropy(F.log_softmax(zt / tau_c, dim=-1))),
                degenerate=degenerate,
                g_norm=g_norm,
                d_norm=float(d.to(torch.float64).norm()),
                d=d,
            )
        )
    return NodeScore(
        value=value,
        covered_mass=covered,
        student_entropy=float(entropy(lp_full)),
        g=g,
        configs=out,
        support=cand if tail == "renormalize" else None,
    )
