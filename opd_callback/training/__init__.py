"""Training integration: the :class:`~opd_callback.training.callback.GradientAlignmentCallback`, early stopping,
state preservation around a diagnostic, trainer adapters (TRL, transformers) and wandb panels.

Needs ``transformers``; ``trl`` and ``wandb`` are optional and imported where used.
"""
