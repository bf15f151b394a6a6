"""The ideal per-node gradient and the gradient alignment score (method.md §3–§5), on plain tensors.

At a node ``u`` the student's next-token distribution is ``P = softmax(z/tau)``. Targeted rollouts give the success
probability ``S_j`` of each candidate token ``j`` in the candidate set ``C``. The ideal logit gradient is

    g_j = P_j (S_j - V),      V = sum_k P_k S_k

and a distillation direction ``d`` is scored by ``cos(g, d)``. Tokens outside ``C`` have unknown ``S``:
``tail="impute"`` sets ``S_j = V_hat`` there (full-vocabulary vectors, ``g`` zero outside ``C``), ``tail="renormalize"``
restricts every distribution to ``C``. This module imports neither TRL nor wandb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from opd_callback.core.divergences import LossFn, divergence_direction
from opd_callback.core.nodes import window_index  # re-exported: the depth window of a record's position

__all__ = [
    "ideal_gradient",
    "cosine",
    "NodeScore",
    "ConfigScore",
    "score_node",
    "ScoringOptions",
    "window_index",
    "entropy",
]


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last axis of a distribution given by its log-probabilities."""
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
    """Per-node quantities (method.md §3-§5): ``V``, the candidates' covered mass, the student's entropy, the ideal
    gradient ``g`` and one :class:`ConfigScore` per configuration."""

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


@dataclass(frozen=True)
class ScoringOptions:
    """How :func:`score_node` scores a node: each configuration's divergence and its options, the student's sampling
    temperature, the tail rule and the degeneracy threshold. ``None`` lists mean the defaults (temperature 1, no beta,
    no top-k) for every configuration."""

    divergences: Sequence[str | LossFn]
    temperature: float = 1.0
    teacher_temperatures: Sequence[float] | None = None
    betas: Sequence[float | None] | None = None
    top_ks: Sequence[int | None] | None = None
    tail: str = "impute"
    eps: float = 1e-9

    def score(
        self,
        student_logits: torch.Tensor,
        teacher_logits: Sequence[torch.Tensor],
        candidate_ids: torch.Tensor,
        candidate_success: torch.Tensor,
        sampled_token: int,
    ) -> NodeScore:
        """Score every configuration at one node (:func:`score_node` with these options)."""
        n = len(teacher_logits)
        t_temps = list(self.teacher_temperatures) if self.teacher_temperatures is not None else [1.0] * n
        betas = list(self.betas) if self.betas is not None else [None] * n
        top_ks = list(self.top_ks) if self.top_ks is not None else [None] * n
        node = _StudentNode.build(student_logits, candidate_ids, candidate_success, sampled_token, self.temperature,
                                  self.tail)
        configs = [
            node.config_score(teacher_logits[c], self.divergences[c], float(t_temps[c]), betas[c], top_ks[c], self.eps)
            for c in range(n)
        ]
        return NodeScore(
            value=node.value,
            covered_mass=node.covered,
            student_entropy=float(entropy(node.log_probs)),
            g=node.g,
            configs=configs,
            support=node.candidates if self.tail == "renormalize" else None,
        )


@dataclass
class _StudentNode:
    """The student's side of one node: its distribution, the ideal gradient ``g`` and the space it lives in (the full
    vocabulary, or the candidates under ``tail="renormalize"``)."""

    logits: torch.Tensor  # [V] float64
    log_probs: torch.Tensor  # [V] log softmax(z / temperature)
    candidates: torch.Tensor
    covered: float
    g: torch.Tensor
    success: torch.Tensor  # S in the space of g
    value: float
    space_logits: torch.Tensor
    space_probs: torch.Tensor
    sampled: torch.Tensor  # the sampled token's index in the space
    tail: str

    @classmethod
    def build(cls, student_logits: torch.Tensor, candidate_ids: torch.Tensor, candidate_success: torch.Tensor,
              sampled_token: int, temperature: float, tail: str) -> _StudentNode:
        z = student_logits.detach().to(torch.float64).cpu()
        cand = candidate_ids.detach().cpu().long()
        s = candidate_success.detach().to(torch.float64).cpu()
        lp_full = F.log_softmax(z / temperature, dim=-1)
        p_full = lp_full.exp()
        covered = float(p_full[cand].sum())
        g, s_vec, value = ideal_gradient(p_full, cand, s, tail)
        if tail == "renormalize":
            matches = (cand == int(sampled_token)).nonzero()
            if len(matches) == 0:
                raise ValueError("the sampled token must be one of the candidates")
            z_space = z[cand]
            p_space = torch.softmax(z_space / temperature, dim=-1)
            sampled = matches[0, 0]
        else:
            z_space, p_space, sampled = z, p_full, torch.tensor(int(sampled_token))
        return cls(z, lp_full, cand, covered, g, s_vec, value, z_space, p_space, sampled, tail)

    def config_score(self, teacher_logits: torch.Tensor, divergence: str | LossFn, tau: float, beta: float | None,
                     top_k: int | None, eps: float) -> ConfigScore:
        """One configuration's direction ``d`` at this node, its cosine with ``g`` and the divergences between the
        student and the teacher (at the configuration's temperature ``tau``)."""
        zt = teacher_logits.detach().to(torch.float64).cpu()
        zt_space = zt[self.candidates] if self.tail == "renormalize" else zt
        d = divergence_direction(divergence, self.space_logits, zt_space, sampled=self.sampled.reshape(()), beta=beta,
                                 temperature=tau, top_k=top_k)
        cos, inner, degenerate = cosine(self.g, d, eps)
        lq_space = F.log_softmax(zt_space / tau, dim=-1)
        lp_space = F.log_softmax(self.space_logits / tau, dim=-1)
        return ConfigScore(
            alignment=cos,
            inner=inner,
            teacher_advantage=float(((lq_space.exp() - self.space_probs) * self.success).sum()),
            kl_reverse=_kl(lp_space, lq_space),
            kl_forward=_kl(lq_space, lp_space),
            js=_js(lp_space, lq_space),
            teacher_entropy=float(entropy(F.log_softmax(zt / tau, dim=-1))),
            degenerate=degenerate,
            g_norm=float(self.g.norm()),
            d_norm=float(d.to(torch.float64).norm()),
            d=d,
        )


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
    options = ScoringOptions(divergences, temperature, teacher_temperatures, betas, top_ks, tail, eps)
    return options.score(student_logits, teacher_logits, candidate_ids, candidate_success, sampled_token)
