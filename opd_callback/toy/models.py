"""Tiny random Qwen2 models: the one builder of the toy lab, the tests and the benchmarks."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

__all__ = ["qwen2_config", "make_config", "random_model", "tiny_random_model", "set_generation_config"]


def qwen2_config(
    vocab_size: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    **overrides: Any,
) -> Qwen2Config:
    """A tiny Qwen2 config: untied output head, no BOS, ``intermediate_size`` 4x ``hidden_size`` and ``num_kv_heads``
    = ``num_heads`` unless given; ``overrides`` are further ``Qwen2Config`` fields (e.g. ``initializer_range``)."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def make_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    **overrides,
) -> Qwen2Config:
    """A tiny Qwen2 config whose vocab/eos/pad match ``tokenizer`` (see :func:`qwen2_config`)."""
    return qwen2_config(
        len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, **overrides,
    )


def random_model(config: Qwen2Config, seed: int, *, fork_rng: bool = True) -> Qwen2ForCausalLM:
    """A randomly initialised ``Qwen2ForCausalLM`` of ``config``, deterministic from ``seed``; in eval mode.

    With ``fork_rng`` (the default) the global torch RNG is left as it was; without, it is seeded with ``seed`` and
    left where the initialisation ends (``torch.manual_seed(seed)`` then the constructor)."""
    if not fork_rng:
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.eval()


def set_generation_config(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 48
) -> None:
    """Plain ancestral sampling at temperature 1 (diagnostic engines override this anyway)."""
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def tiny_random_model(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 1,
    **overrides,
) -> Qwen2ForCausalLM:
    """An untrained tiny Qwen2 (deterministic from ``seed``, the global RNG untouched) whose vocab/eos/pad match
    ``tokenizer``, with the toy lab's generation config; in eval mode."""
    model = random_model(make_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, **overrides), seed)
    set_generation_config(model, tokenizer)
    return model
