"""opd-callback: is your on-policy-distillation teacher helping, token by token?

Estimates the ideal per-token gradient from targeted rollouts and scores distillation directions by their cosine
with it (arXiv 2605.10889). Training-free via :func:`diagnose`; during training via
:class:`GradientAlignmentCallback` (imported lazily: it needs ``transformers``' Trainer).
"""

from __future__ import annotations

from opd_callback.core.alignment import cosine, ideal_gradient, score_node
from opd_callback.core.divergences import (
    Divergence,
    available_divergences,
    divergence_direction,
    divergence_loss,
    get_divergence,
    register_divergence,
)
from opd_callback.core.engine import AlignmentEngine, RewardFunctionError, diagnose
from opd_callback.core.settings import ContextTeacher, ExternalTeacher, RolloutSettings, TeacherConfig
from opd_callback.report import AlignmentReport
from opd_callback.rollout import RolloutBackend, TransformersBackend, VLLMBackend, VLLMOptions

__version__ = "0.1.0"

__all__ = [
    "AlignmentEngine",
    "AlignmentReport",
    "ContextTeacher",
    "Divergence",
    "ExternalTeacher",
    "RewardFunctionError",
    "RolloutBackend",
    "RolloutSettings",
    "TeacherConfig",
    "TransformersBackend",
    "VLLMBackend",
    "VLLMOptions",
    "available_divergences",
    "cosine",
    "diagnose",
    "divergence_direction",
    "divergence_loss",
    "get_divergence",
    "ideal_gradient",
    "register_divergence",
    "score_node",
    "__version__",
]

_LAZY = {
    "GradientAlignmentCallback": "opd_callback.training.callback",
    "AlignmentEarlyStopping": "opd_callback.training.early_stopping",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(_LAZY[name], __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'opd_callback' has no attribute {name!r}")
