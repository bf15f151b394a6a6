"""Rollout backends: the :class:`RolloutBackend` interface, the transformers engine and the vLLM engine."""

from .base import RolloutBackend, eos_token_ids, eval_mode, next_token_logits, preserved_rng
from .streams import row_keys, row_uniforms
from .transformers_backend import TransformersBackend
from .vllm_backend import VLLMBackend, VLLMOptions  # vllm itself is imported only when an engine starts

__all__ = ["RolloutBackend", "TransformersBackend", "VLLMBackend", "VLLMOptions", "eos_token_ids", "eval_mode",
           "next_token_logits", "preserved_rng", "row_keys", "row_uniforms"]
