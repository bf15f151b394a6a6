"""Training integration: the :class:`~opd_callback.training.callback.GradientAlignmentCallback`
(:mod:`~opd_callback.training.callback`), its schedule (:mod:`~opd_callback.training.schedule`), early stopping
(:mod:`~opd_callback.training.early_stopping`), state preservation around a diagnostic
(:mod:`~opd_callback.training.state`), the probe set (:mod:`~opd_callback.training.probe`), one diagnostic over
several processes (:mod:`~opd_callback.training.ranks`), trainer adapters (TRL, transformers;
:mod:`~opd_callback.training.trainers`) and wandb panels (:mod:`~opd_callback.training.wandb_panels`).

Needs ``transformers``; ``trl`` and ``wandb`` are optional and imported where used. The two public classes are
imported lazily, on first access.
"""

from __future__ import annotations

__all__ = ["AlignmentEarlyStopping", "GradientAlignmentCallback"]

_LAZY = {
    "GradientAlignmentCallback": "opd_callback.training.callback",
    "AlignmentEarlyStopping": "opd_callback.training.early_stopping",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'opd_callback.training' has no attribute {name!r}")
