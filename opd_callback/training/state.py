"""Everything a diagnostic could disturb in a training run, saved before it and restored after it.

:func:`preserved_training_state` composes the shared pieces (:func:`~opd_callback.rollout.base.preserved_rng` for the
RNG states, :func:`~opd_callback.rollout.base.eval_mode` for every module's ``training`` flag) with what only a
training run has: parameter gradients, the grad mode, the tokenizer's sides, gradient checkpointing and
``config.use_cache``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator, Sequence

import torch

from opd_callback.rollout.base import eval_mode, preserved_rng

__all__ = ["preserved_training_state"]

logger = logging.getLogger(__name__)

_TOKENIZER_SIDES = ("padding_side", "truncation_side")


def _is_checkpointing(model: torch.nn.Module) -> bool | None:
    """Whether gradient checkpointing is on (``None`` when the model does not say)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return bool(getattr(model, attr))
            except Exception:  # noqa: BLE001
                continue
    return None


class _Gradients:
    """Every parameter's ``.grad`` tensor object and its version counter at construction."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.saved = [(p, p.grad, None if p.grad is None else p.grad._version) for p in model.parameters()]

    def restore(self) -> None:
        """Put back each replaced ``.grad`` object; report an in-place change (which cannot be undone) as an error."""
        changed = 0
        for p, g, version in self.saved:
            if p.grad is not g:
                p.grad = g
            elif g is not None and g._version != version:
                changed += 1
        if changed:
            logger.error("GradientAlignmentCallback: %d parameter gradients were modified in place by the diagnostic",
                         changed)


def _restore_checkpointing(model: torch.nn.Module, was: bool | None, kwargs: dict | None) -> None:
    """Switch gradient checkpointing back to ``was`` (``None``: unknown, leave it) if it changed."""
    if was is None or _is_checkpointing(model) == was:
        return
    if was:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def _restore_attributes(obj: Any, saved: dict[str, Any]) -> None:
    """Set back each attribute of ``obj`` saved (not None) in ``saved`` that changed."""
    if obj is None:
        return
    for name, value in saved.items():
        if value is not None and getattr(obj, name, None) != value:
            setattr(obj, name, value)


@contextlib.contextmanager
def preserved_training_state(
    model: torch.nn.Module,
    tokenizer: Any = None,
    other_models: Sequence[torch.nn.Module] = (),
    checkpointing_kwargs: dict | None = None,
) -> Iterator[None]:
    """Run a block (``model`` and ``other_models`` in eval mode) and restore afterwards everything it could disturb:
    the CPU, CUDA, numpy and Python RNG states; every module's ``training`` flag (student and ``other_models``); the
    tokenizer's ``padding_side`` / ``truncation_side``; gradient checkpointing; ``config.use_cache``; the grad mode;
    and every parameter's ``.grad`` (the same tensor object is put back if it was replaced; an in-place change is
    reported as an error, since the engine only uses ``torch.no_grad`` sampling and ``torch.autograd.grad``)."""
    grad_mode = torch.is_grad_enabled()
    grads = _Gradients(model)
    sides = {name: getattr(tokenizer, name, None) for name in _TOKENIZER_SIDES}
    checkpointing = _is_checkpointing(model)
    cfg = getattr(model, "config", None)
    use_cache = {"use_cache": getattr(cfg, "use_cache", None)}
    try:
        with preserved_rng(), eval_mode(model, *other_models):
            yield
    finally:
        torch.set_grad_enabled(grad_mode)
        grads.restore()
        _restore_attributes(tokenizer, sides)
        _restore_checkpointing(model, checkpointing, checkpointing_kwargs)
        _restore_attributes(cfg, use_cache)
