"""Divergence directions d = -dL/dz against autograd, hand formulas, and TRL's own loss functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opd_callback import ExternalTeacher, TeacherConfig, available_divergences, divergence_direction, divergence_loss
from opd_callback.core.divergences import get_divergence

# float64 throughout: analytic and autograd forms agree to rounding (~1e-15); 1e-10 leaves a wide margin while any
# formula error (a missing term, a swapped KL, a wrong 1/T factor) is O(1e-2) or larger on these logits.
ATOL = 1e-10
V = 11


def _logits(seed: int, shape=(6, V), scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    sampled = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return z, zt, sampled


def _hand_kl(lp_a: torch.Tensor, lp_b: torch.Tensor) -> torch.Tensor:
    """KL(A||B) = sum_j A_j (log A_j - log B_j), written out (no F.kl_div: its argument order is the trap)."""
    return (lp_a.exp() * (lp_a - lp_b)).sum(-1)


CASES = [("reverse_kl", None), ("forward_kl", None), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("sampled_token", None)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name,beta", CASES)
def test_analytic_direction_equals_minus_autograd(name, beta, temperature):
    # the analytic path must really be analytic (otherwise this would compare autograd with itself)
    assert get_divergence(name).direction is not None
    z, zt, y = _logits(1)
    kw = dict(sampled=y, beta=beta, temperature=temperature)
    d = divergence_direction(name, z, zt, **kw)
    d_auto = divergence_direction(name, z, zt, analytic=False, **kw)
    # independent autograd of divergence_loss, outside the package's own helper
    zz = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(divergence_loss(name, zz, zt, **kw).sum(), zz)
    torch.testing.assert_close(d, -grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(d, d_auto, atol=ATOL, rtol=0)
    assert d.abs().max() > 1e-3  # not trivially zero
    # every direction of the form P*(f - sum P f) sums to zero (logit-shift invariance of softmax)
    torch.testing.assert_close(d.sum(-1), torch.zeros(d.shape[0], dtype=d.dtype), atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hand_formulas(temperature):
    z, zt, y = _logits(2)
    lp = torch.log_softmax(z / temperature, -1)
    lq = torch.log_softmax(zt / temperature, -1)
    p, q = lp.exp(), lq.exp()
    fwd = _hand_kl(lq, lp)  # KL(Q||P)
    rev = _hand_kl(lp, lq)  # KL(P||Q)
    assert (fwd - rev).abs().max() > 1e-2  # the two really differ here, so a swap cannot pass
    torch.testing.assert_close(divergence_loss("forward_kl", z, zt, temperature=temperature), fwd, atol=ATOL, rtol=0)
    torch.testing.assert_close(divergence_loss("reverse_kl", z, zt, temperature=temperature), rev, atol=ATOL, rtol=0)
    torch.testing.assert_close(divergence_loss("jsd", z, zt, beta=0.0, temperature=temperature), fwd, atol=ATOL, rtol=0)
    torch.testing.assert_close(divergence_loss("jsd", z, zt, beta=1.0, temperature=temperature), rev, atol=ATOL, rtol=0)
    for b in (0.25, 0.5):
        lm = torch.log((1 - b) * p + b * q)
        hand = b * _hand_kl(lq, lm) + (1 - b) * _hand_kl(lp, lm)
        torch.testing.assert_close(divergence_loss("jsd", z, zt, beta=b, temperature=temperature), hand,
                                   atol=ATOL, rtol=0)
    # directions: forward KL is (Q - P)/T; reverse KL is P (r - sum P r)/T with r = log Q - log P
    torch.testing.assert_close(divergence_direction("forward_kl", z, zt, temperature=temperature),
                               (q - p) / temperature, atol=ATOL, rtol=0)
    r = lq - lp
    rev_dir = p * (r - (p * r).sum(-1, keepdim=True)) / temperature
    torch.testing.assert_close(divergence_direction("reverse_kl", z, zt, temperature=temperature), rev_dir,
                               atol=ATOL, rtol=0)
    # sampled token: A (e_y - P)/T with A = log Q(y) - log P(y)
    a = (lq - lp).gather(-1, y[:, None])
    e = F.one_hot(y, V).double()
    torch.testing.assert_close(divergence_direction("sampled_token", z, zt, sampled=y, temperature=temperature),
                               a * (e - p) / temperature, atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_matches_trl_gkd(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    z, zt, _ = _logits(3, shape=(2, 3, V))
    zz = z.clone().requires_grad_(True)
    trl_loss = GKDTrainer.generalized_jsd_loss(zz, zt, beta=beta, temperature=temperature, reduction="sum")
    (trl_grad,) = torch.autograd.grad(trl_loss, zz)
    ours = divergence_loss("jsd", z, zt, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours.sum(), trl_loss.detach(), atol=1e-10, rtol=0)
    d = divergence_direction("jsd", z, zt, beta=beta, temperature=temperature)  # analytic
    torch.testing.assert_close(d, -trl_grad, atol=ATOL, rtol=0)
    # TRL's special cases: beta=0 is forward KL(Q||P), beta=1 reverse KL(P||Q) -- by hand, and by our named losses
    lp = torch.log_softmax(z / temperature, -1)
    lq = torch.log_softmax(zt / temperature, -1)
    if beta == 0.0:
        torch.testing.assert_close(trl_loss.detach(), _hand_kl(lq, lp).sum(), atol=1e-10, rtol=0)
        torch.testing.assert_close(divergence_direction("forward_kl", z, zt, temperature=temperature), -trl_grad,
                                   atol=ATOL, rtol=0)
    if beta == 1.0:
        torch.testing.assert_close(trl_loss.detach(), _hand_kl(lp, lq).sum(), atol=1e-10, rtol=0)
        torch.testing.assert_close(divergence_direction("reverse_kl", z, zt, temperature=temperature), -trl_grad,
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_token_matches_trl_sdft(temperature):
    from trl.experimental.sdft.loss_utils import compute_sampled_token_self_distillation_loss

    z, zt, _ = _logits(4, shape=(2, 3, V))
    y = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(4))
    zz = z.clone().requires_grad_(True)
    # TRL's trainer divides logits by the temperature before calling the loss
    trl = compute_sampled_token_self_distillation_loss(zz / temperature, zt / temperature, y, distillation_alpha=1.0)
    (grad,) = torch.autograd.grad(trl.sum(), zz)
    ours = divergence_loss("sampled_token", z, zt, sampled=y, temperature=temperature)
    torch.testing.assert_close(ours, trl.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(divergence_direction("sampled_token", z, zt, sampled=y, temperature=temperature), -grad,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("k", [1, 4, V - 1])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_matches_trl_sdft(k, alpha, temperature):
    from trl.experimental.sdft.loss_utils import compute_topk_self_distillation_loss

    z, zt, _ = _logits(5, shape=(2, 3, V))
    zz = z.clone().requires_grad_(True)
    trl = compute_topk_self_distillation_loss(
        zz / temperature, zt / temperature, distillation_topk=k, distillation_alpha=alpha, distillation_add_tail=True
    )
    (grad,) = torch.autograd.grad(trl.sum(), zz)
    ours = divergence_loss("topk", z, zt, beta=alpha, top_k=k, temperature=temperature)
    torch.testing.assert_close(ours, trl.detach(), atol=1e-10, rtol=0)
    d = divergence_direction("topk", z, zt, beta=alpha, top_k=k, temperature=temperature)
    torch.testing.assert_close(d, -grad, atol=ATOL, rtol=0)
    assert d.abs().max() > 1e-4


def test_topk_full_vocab_is_plain_divergence():
    # k >= V: no tail bucket; equals the full-vocabulary generalized JSD (TRL's tail of mass ~0 adds nothing)
    z, zt, _ = _logits(6)
    for beta in (0.0, 0.5, 1.0):
        torch.testing.assert_close(
            divergence_loss("topk", z, zt, beta=beta, top_k=V), divergence_loss("jsd", z, zt, beta=beta),
            atol=ATOL, rtol=0
        )
    # default beta of topk is 1 (reverse KL), default k is 100 (>= V here)
    torch.testing.assert_close(divergence_loss("topk", z, zt), divergence_loss("reverse_kl", z, zt), atol=ATOL, rtol=0)


def test_callable_divergence_is_autograd():
    z, zt, _ = _logits(7)
    mse = lambda s, t: ((s - t) ** 2).mean()  # noqa: E731
    d = divergence_direction(mse, z, zt)
    # hand derivative of mean squared error over V logits (per node): -2 (z - zt) / V
    torch.testing.assert_close(d, -2.0 * (z - zt) / V, atol=ATOL, rtol=0)
    torch.testing.assert_close(divergence_loss(mse, z, zt), ((z - zt) ** 2).mean(-1), atol=ATOL, rtol=0)


def test_callable_without_gradient_is_rejected():
    z, zt, _ = _logits(8)
    with pytest.raises(ValueError, match="does not depend on the student logits"):
        divergence_direction(lambda s, t: (t**2).sum(), z, zt)


def test_unknown_divergence_lists_known_ones():
    z, zt, _ = _logits(9)
    known = available_divergences()
    assert {"reverse_kl", "forward_kl", "jsd", "sampled_token", "topk"} <= set(known)
    for call in (
        lambda: divergence_direction("not_a_divergence", z, zt),
        lambda: divergence_loss("not_a_divergence", z, zt),
        lambda: TeacherConfig("c", ExternalTeacher(torch.nn.Linear(1, 1)), divergence="not_a_divergence"),
    ):
        with pytest.raises(ValueError) as exc:
            call()
        msg = str(exc.value)
        assert "not_a_divergence" in msg
        assert all(name in msg for name in known), msg


def test_sampled_token_needs_sampled():
    z, zt, _ = _logits(10)
    with pytest.raises(ValueError, match="sampled token"):
        divergence_direction("sampled_token", z, zt)
