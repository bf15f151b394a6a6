"""Distillation divergences and the logit-space direction each one pushes the student.

Every divergence is a loss ``L(z, z_T)`` on one node's student logits ``z`` and teacher logits ``z_T`` (both of shape
``[..., V]``, already restricted to the same support). Its *direction* is ``d = -dL/dz``: the change of the student's
logits that one gradient-descent step on the distillation loss makes. Analytic forms are used where they exist and are
tested against autograd (``tests/test_divergences.py``); any other loss is differentiated with autograd.

Conventions match TRL exactly:

* ``temperature`` divides both sides' logits before the softmax (``DistillationTrainer`` / ``GKDTrainer``).
* ``jsd`` uses TRL's generalized JSD with ``M = (1-beta) P + beta Q`` and loss ``beta KL(Q||M) + (1-beta) KL(P||M)``;
  ``beta = 0`` is *forward* KL ``KL(Q||P)``, ``beta = 1`` is *reverse* KL ``KL(P||Q)`` (TRL's special cases).
* ``topk`` follows TRL SDFT's ``topk_logits`` mode: the support is the student's top-k tokens, plus a tail bucket.

This module imports neither TRL nor wandb.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "Divergence",
    "register_divergence",
    "get_divergence",
    "available_divergences",
    "divergence_loss",
    "divergence_direction",
    "generalized_jsd",
]


class LossFn(Protocol):
    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Divergence:
    """A registered divergence.

    ``loss(z, z_T, sampled, beta, temperature, top_k)`` returns the per-node loss ``[...]`` (no reduction).
    ``direction`` (optional) returns ``-dL/dz`` analytically; when absent, autograd is used.
    """

    name: str
    loss: Callable[..., torch.Tensor]
    direction: Callable[..., torch.Tensor] | None = None
    needs_sampled_token: bool = False
    description: str = ""


_REGISTRY: dict[str, Divergence] = {}


def register_divergence(div: Divergence, *, overwrite: bool = False) -> Divergence:
    """Register a divergence under ``div.name`` so ``TeacherConfig(divergence=name)`` can use it."""
    if div.name in _REGISTRY and not overwrite:
        raise ValueError(f"divergence {div.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[div.name] = div
    return div


def available_divergences() -> list[str]:
    return sorted(_REGISTRY)


def get_divergence(name: str) -> Divergence:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r}: use one of {available_divergences()} or pass a callable "
            "loss(student_logits, teacher_logits) -> scalar"
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# losses


def _log_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(z / temperature, dim=-1)


def generalized_jsd(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float
) -> torch.Tensor:
    """TRL's generalized JSD between log-distributions, summed over the last axis (no reduction over nodes)."""
    lp, lq = student_log_probs, teacher_log_probs
    if beta == 0:
        return (lq.exp() * (lq - lp)).sum(-1)  # KL(Q||P)
    if beta == 1:
        return (lp.exp() * (lp - lq)).sum(-1)  # KL(P||Q)
    b = torch.as_tensor(beta, dtype=lp.dtype, device=lp.device)
    lm = torch.logsumexp(torch.stack([lp + torch.log1p(-b), lq + torch.log(b)]), dim=0)
    kl_q = (lq.exp() * (lq - lm)).sum(-1)
    kl_p = (lp.exp() * (lp - lm)).sum(-1)
    return b * kl_q + (1 - b) * kl_p


def _loss_reverse_kl(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    return generalized_jsd(_log_probs(z, temperature), _log_probs(zt, temperature), 1.0)


def _loss_forward_kl(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    return generalized_jsd(_log_probs(z, temperature), _log_probs(zt, temperature), 0.0)


def _loss_jsd(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    b = 0.5 if beta is None else float(beta)
    return generalized_jsd(_log_probs(z, temperature), _log_probs(zt, temperature), b)


def _loss_sampled_token(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    if sampled is None:
        raise ValueError("divergence 'sampled_token' needs the sampled token of each node")
    lp = _log_probs(z, temperature)
    lq = _log_probs(zt, temperature)
    lp_y = lp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    lq_y = lq.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    advantage = (lq_y - lp_y).detach()
    # REINFORCE surrogate: minimising -A log P(y) moves z along A (e_y - P).
    return -advantage * lp_y


def _topk_bucket_log_probs(lp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    sel = lp.gather(-1, idx)
    log_s = torch.logsumexp(sel, dim=-1, keepdim=True).clamp(max=-1e-7)
    tail = torch.log(-torch.expm1(log_s))
    return torch.cat([sel, tail], dim=-1)


def _loss_topk(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    k = 100 if top_k is None else int(top_k)
    k = min(k, z.shape[-1])
    lp = _log_probs(z, temperature)
    lq = _log_probs(zt, temperature)
    idx = torch.topk(z.detach(), k=k, dim=-1).indices  # TRL SDFT: the student's top-k define the support
    if k == z.shape[-1]:
        # the full vocabulary: no tail bucket
        return generalized_jsd(lp, lq, 1.0 if beta is None else float(beta))
    b = 1.0 if beta is None else float(beta)
    return generalized_jsd(_topk_bucket_log_probs(lp, idx), _topk_bucket_log_probs(lq, idx), b)


# --------------------------------------------------------------------------------------------------------------------
# analytic directions (-dL/dz). All carry the 1/temperature factor of the chain rule.


def _dir_reverse_kl(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    lp = _log_probs(z, temperature)
    lq = _log_probs(zt, temperature)
    p = lp.exp()
    r = lq - lp
    return p * (r - (p * r).sum(-1, keepdim=True)) / temperature


def _dir_forward_kl(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    p = _log_probs(z, temperature).exp()
    q = _log_probs(zt, temperature).exp()
    return (q - p) / temperature


def _dir_jsd(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    b = 0.5 if beta is None else float(beta)
    if b == 0:
        return _dir_forward_kl(z, zt, temperature=temperature)
    if b == 1:
        return _dir_reverse_kl(z, zt, temperature=temperature)
    lp = _log_probs(z, temperature)
    lq = _log_probs(zt, temperature)
    p = lp.exp()
    bt = torch.as_tensor(b, dtype=lp.dtype, device=lp.device)
    lm = torch.logsumexp(torch.stack([lp + torch.log1p(-bt), lq + torch.log(bt)]), dim=0)
    # L = b KL(Q||M) + (1-b) KL(P||M). dL/dP_j = (1-b)(log P_j - log M_j) (the M-terms cancel since sum M' = ...)
    # Derivation: d/dP_j [b sum Q log(Q/M) + (1-b) sum P log(P/M)]
    #   = -b Q_j (1-b)/M_j + (1-b)(log P_j - log M_j + 1) - (1-b) P_j (1-b)/M_j
    #   = (1-b)(log P_j - log M_j + 1) - (1-b)[b Q_j + (1-b) P_j]/M_j = (1-b)(log P_j - log M_j)
    f = (1 - bt) * (lp - lm)
    # softmax Jacobian: dL/dz = P * (f - sum P f) / T
    return -p * (f - (p * f).sum(-1, keepdim=True)) / temperature


def _dir_sampled_token(z, zt, sampled=None, beta=None, temperature=1.0, top_k=None):
    lp = _log_probs(z, temperature)
    lq = _log_probs(zt, temperature)
    p = lp.exp()
    lp_y = lp.gather(-1, sampled.unsqueeze(-1))
    lq_y = lq.gather(-1, sampled.unsqueeze(-1))
    a = lq_y - lp_y
    e = torch.zeros_like(p).scatter_(-1, sampled.unsqueeze(-1), 1.0)
    return a * (e - p) / temperature


for _d in (
    Divergence("reverse_kl", _loss_reverse_kl, _dir_reverse_kl, description="KL(P||Q): TRL beta=1 (default)"),
    Divergence("forward_kl", _loss_forward_kl, _dir_forward_kl, description="KL(Q||P): TRL beta=0"),
    Divergence("jsd", _loss_jsd, _dir_jsd, description="TRL generalized JSD with M=(1-beta)P+beta Q"),
    Divergence(
        "sampled_token",
        _loss_sampled_token,
        _dir_sampled_token,
        needs_sampled_token=True,
        description="REINFORCE on A = log Q(y_t) - log P(y_t) (stop-grad)",
    ),
    Divergence("topk", _loss_topk, None, description="divergence on the student's top-k plus a tail bucket (TRL SDFT)"),
):
    register_divergence(_d)


# --------------------------------------------------------------------------------------------------------------------
# public helpers


def divergence_loss(
    divergence: str | LossFn,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    sampled: torch.Tensor | None = None,
    beta: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-node loss ``[...]`` of a named divergence or a callable (a callable is called once per node)."""
    if callable(divergence):
        flat_z = student_logits.reshape(-1, student_logits.shape[-1])
        flat_t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        vals = [divergence(flat_z[i : i + 1], flat_t[i : i + 1]) for i in range(flat_z.shape[0])]
        return torch.stack([v.reshape(()) for v in vals]).reshape(student_logits.shape[:-1])
    div = get_divergence(divergence)
    return div.loss(student_logits, teacher_logits, sampled=sampled, beta=beta, temperature=temperature, top_k=top_k)


def divergence_direction(
    divergence: str | LossFn,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    sampled: torch.Tensor | None = None,
    beta: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    analytic: bool = True,
) -> torch.Tensor:
    """``d = -dL/dz`` for each node (shape of ``student_logits``), computed in float64.

    ``analytic=False`` forces autograd (used by the tests to check the analytic forms).
    """
    z = student_logits.detach().to(torch.float64)
    zt = teacher_logits.detach().to(torch.float64)
    if not callable(divergence):
        div = get_divergence(divergence)
        if div.needs_sampled_token and sampled is None:
            raise ValueError(f"divergence {divergence!r} needs the sampled token of each node")
        if analytic and div.direction is not None:
            return div.direction(z, zt, sampled=sampled, beta=beta, temperature=temperature, top_k=top_k)
    with torch.enable_grad():
        zz = z.clone().requires_grad_(True)
        loss = divergence_loss(
            divergence, zz, zt, sampled=sampled, beta=beta, temperature=temperature, top_k=top_k
        )
        if not torch.is_tensor(loss) or not loss.requires_grad:
            raise ValueError("the divergence's loss does not depend on the student logits (no gradient)")
        (grad,) = torch.autograd.grad(loss.sum(), zz)
    return -grad
