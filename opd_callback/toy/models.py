"""Tiny Qwen2 models for the toy lab."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

__all__ = ["make_config", "tiny_random_model", "set_generation_config"]


def make_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    **overrides,
) -> Qwen2Config:
    """A tiny Qwen2 config whose vocab/eos/pad match ``tokenizer``."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def set_generation_config(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 48) -> None:
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
    """An untrained tiny Qwen2 (deterministic from ``seed``) for unit tests; in eval mode."""
    config = make_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    set_generation_config(model, tokenizer)
    return model.eval()
