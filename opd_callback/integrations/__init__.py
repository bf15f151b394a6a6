"""Adapters between the framework-free core and training frameworks (TRL / transformers trainers, wandb).

Nothing here is imported by ``opd_callback`` at import time; TRL and wandb are imported lazily inside functions.
"""

from .trainers import TrainerSpec, describe_trainer

__all__ = ["TrainerSpec", "describe_trainer"]
