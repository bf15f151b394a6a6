"""Shared-prefix attention in ``TransformersBackend.sample_branches``: branch rows attend to their base row's KV cache
in place. Truth is a plain forward over the whole sequence (no padding, no cache); the per-row gather path is the
reference for seeded samples and for the fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import plain_next_logits, tiny_qwen2
from transformers import AttentionInterface, Qwen2ForCausalLM

from opd_callback.rollout import TransformersBackend
from opd_callback.rollout import shared_prefix as rollout

V = 11
EOS = 10
# bases of different lengths (left padding); prefixes from empty to the whole base; max_new and EOS make rows finish at
# different steps (compaction mid-way); more branches than one batch, batches spanning two base rows
BASES = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [3, 3, 1, 0, 2, 9], [4, 8, 8, 1, 5, 2, 7, 0, 6]]
BRANCHES = [
    (0, 11, 4, 8), (1, 2, 0, 6), (2, 5, 3, 8), (0, 3, 1, 3), (1, 6, 7, 8), (2, 0, 2, 5),
    (0, 12, 9, 1), (1, 4, 5, 8), (2, 9, 6, 7), (0, 7, 2, 8), (1, 1, 8, 2), (2, 3, 0, 8),
]  # fmt: skip
# prefix-length ranges that do not overlap across base rows: the gather path's order (decreasing prefix length) equals
# the shared path's (base row, then decreasing prefix length), so both draw the same random numbers for the same rows
ORDERED_BRANCHES = [(0, 11, 4, 9), (0, 8, 1, 9), (0, 8, 3, 4), (1, 6, 3, 9), (1, 5, 0, 6), (2, 4, 2, 9), (2, 2, 6, 9)]
ORDERED_BRANCHES *= 4


def _model(seed: int = 0) -> Qwen2ForCausalLM:
    """A random Qwen2 with grouped-query attention (4 query heads share 2 key/value heads)."""
    return tiny_qwen2(V, eos_id=EOS, pad_id=EOS, seed=seed, hidden=32, layers=2, heads=4, kv_heads=2, init=0.2)


class _Recording(TransformersBackend):
    """Records the logits of every sampling step of every batch, and whether the per-row gather path ran."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.batches: list[tuple[list[int], list[torch.Tensor]]] = []  # (rows at the first step, logits per step)
        self.gathered = 0

    def _decode(self, logits, cache, batch, call):
        self.batches.append((batch.rows.tolist(), []))
        return super()._decode(logits, cache, batch, call)

    def _draw(self, logits, generator, *a, **k):
        self.batches[-1][1].append(logits.detach().clone())
        return super()._draw(logits, generator, *a, **k)

    def _branch_batch(self, *a, **k):
        self.gathered += 1
        return super()._branch_batch(*a, **k)


def _sample(model, branches=BRANCHES, *, shared: bool = True, batch_size: int = 5, seed: int = 0):
    be = _Recording(model, eos_ids=[EOS], pad_id=EOS, batch_size=batch_size)
    be.shared_prefix = shared
    out = be.sample_branches(BASES, branches, torch.Generator().manual_seed(seed))
    return be, out


def _assert_logits_equal_reencoding(model, be: _Recording, out, branches=BRANCHES) -> None:
    """Every step's logits of every row equal a plain forward over prefix + forced + the tokens sampled so far."""
    checked = 0
    for rows, steps in be.batches:
        for t, logits in enumerate(steps):
            alive = [r for r in rows if len(out[r]) > t]  # compaction keeps the order of the remaining rows
            assert logits.shape[0] == len(alive)
            for row, r in zip(logits, alive):
                b, L, j, _ = branches[r]
                want = plain_next_logits(model, BASES[b][:L] + [j] + out[r][:t])
                torch.testing.assert_close(row.double(), want, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked == sum(len(o) for o in out)


def test_shared_prefix_logits_equal_reencoding():
    model = _model()
    be, out = _sample(model)
    assert be.gathered == 0  # the shared-prefix path ran for every batch
    assert len(be.batches) == 3 and any(len({BRANCHES[r][0] for r in rows}) == 2 for rows, _ in be.batches)
    lengths = [len(o) for o in out]
    assert any(0 < n < m for n, (*_, m) in zip(lengths, BRANCHES))  # EOS before the limit
    assert len(set(lengths)) > 2  # rows left their batch at different steps
    _assert_logits_equal_reencoding(model, be, out)


@pytest.mark.parametrize("preallocate", [True, False])
def test_shared_prefix_samples_equal_gather_path(preallocate):
    model = _model(1)
    outs, logits = [], []
    for shared in (True, False):
        be = _Recording(model, eos_ids=[EOS], pad_id=EOS, batch_size=16)
        be.preallocate, be.shared_prefix = preallocate, shared
        outs.append(be.sample_branches(BASES, ORDERED_BRANCHES, torch.Generator().manual_seed(3)))
        logits.append(be.batches)
        assert be.gathered == (0 if shared else 2)
    assert outs[0] == outs[1]
    assert len({len(o) for o in outs[0]}) > 2
    for (rows_s, steps_s), (rows_g, steps_g) in zip(*logits):
        assert rows_s == rows_g
        for a, b in zip(steps_s, steps_g, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_implementation_restored_also_after_an_error():
    model = _model()
    model.config._attn_implementation = "eager"
    seen = []

    class Failing(TransformersBackend):
        def _draw(self, logits, generator, *a, **k):
            seen.append(model.config._attn_implementation)
            if len(seen) == 2:
                raise RuntimeError("boom")
            return super()._draw(logits, generator, *a, **k)

    be = Failing(model, eos_ids=[EOS], pad_id=EOS)
    with pytest.raises(RuntimeError, match="boom"):
        be.sample_branches(BASES, BRANCHES, torch.Generator().manual_seed(0))
    assert seen == ["opd_shared_prefix"] * 2  # switched while decoding
    assert model.config._attn_implementation == "eager"
    assert all(m.config._attn_implementation == "eager" for m in model.modules() if hasattr(m, "config"))
    out = TransformersBackend(model, eos_ids=[EOS], pad_id=EOS).sample_branches(BASES, BRANCHES[:3], torch.Generator())
    assert len(out) == 3 and model.config._attn_implementation == "eager"


def _sdpa_ignoring_the_state(module, query, key, value, attention_mask, **kwargs):
    """A model that does not route the state to its attention: plain SDPA over the suffix only."""
    kwargs.pop(rollout._SHARED_PREFIX)
    return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)


class _NoExtraKwargs(torch.nn.Module):
    """A causal LM whose forward takes no extra keyword arguments."""

    def __init__(self, inner: Qwen2ForCausalLM) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, cache=None, logits_to_keep=0):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, cache=cache, logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("model_kind", ["state not routed", "no extra kwargs", "attention dropout"])
def test_fallback_to_gather_path(model_kind, monkeypatch):
    """Models that shared-prefix attention cannot serve are sampled by the gather path, with the same samples."""
    model = _model(2)
    _, want = _sample(model, ORDERED_BRANCHES, shared=False, batch_size=16)
    sampled = model
    if model_kind == "state not routed":
        rollout._register_shared_prefix_attention()
        monkeypatch.setitem(AttentionInterface._global_mapping, rollout._SHARED_PREFIX, _sdpa_ignoring_the_state)
    elif model_kind == "no extra kwargs":
        sampled = _NoExtraKwargs(model)
    else:  # dropout in training mode: only the gather path applies it (a dropout of ~1e-9 leaves the samples equal)
        model.train()
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 1e-9
    be, out = _sample(sampled, ORDERED_BRANCHES, batch_size=16)
    assert be.gathered == 2
    assert out == want
    assert model.config._attn_implementation == "sdpa"


def test_peft_lora_model_uses_shared_prefix():
    from peft import LoraConfig, get_peft_model

    model = _model(4)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    impl = model.config._attn_implementation
    be, out = _sample(peft_model)
    assert be.gathered == 0
    assert model.config._attn_implementation == impl
    _assert_logits_equal_reencoding(peft_model, be, out)
    with peft_model.disable_adapter():  # the adapter matters: the base model's logits differ
        base = plain_next_logits(peft_model, BASES[0][:11] + [4])
    assert not torch.allclose(base, plain_next_logits(peft_model, BASES[0][:11] + [4]), atol=1e-3)


def test_bfloat16():
    """In bf16 (scores in bf16, softmax in float32) the first step's logits are those of the float32 model up to bf16
    rounding."""
    model = _model(5)
    be, out = _sample(copy.deepcopy(model).to(torch.bfloat16), ORDERED_BRANCHES, batch_size=16)
    assert be.gathered == 0 and all(out)
    for rows, steps in be.batches:
        assert steps[0].dtype == torch.bfloat16
        for row, r in zip(steps[0], rows):
            b, L, j, _ = ORDERED_BRANCHES[r]
            want = plain_next_logits(model, BASES[b][:L] + [j])
            torch.testing.assert_close(row.double(), want, atol=0.1, rtol=0.02)
