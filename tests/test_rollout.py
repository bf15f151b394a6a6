"""The rollout layer: exact sampling, shared-prefix KV reuse, compaction of finished rows."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_qwen2
from transformers import Qwen2ForCausalLM

from opd_callback.rollout import TransformersBackend, next_token_logits

V = 7
EOS = 6


def _model(seed: int = 0, layers: int = 2) -> Qwen2ForCausalLM:
    m = tiny_qwen2(V, eos_id=EOS, pad_id=EOS, seed=seed, hidden=32, layers=layers, heads=4, kv_heads=2,
                   max_positions=32768)  # Qwen2Config's default
    m.generation_config.top_k = 1  # must be ignored
    m.generation_config.top_p = 0.3
    return m


class _Recording(TransformersBackend):
    """Records the logits each row is sampled from at its first sampled step, by row (result index)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.first_logits: dict[int, torch.Tensor] = {}

    def _draw(self, logits, generator, *a, **k):
        if self._rows is not None:
            self.first_logits.update(zip(self._rows, logits.detach().clone()))
            self._rows = None
        return super()._draw(logits, generator, *a, **k)

    def _decode(self, logits, cache, batch, call):
        self._rows = batch.rows.tolist()
        return super()._decode(logits, cache, batch, call)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_branch_cache_equals_reencoding(shared_prefix):
    """A branch's first distribution from the base KV cache (attended in place, or sliced per row) equals a fresh
    forward over prefix + forced."""
    model = _model()
    bases = [[0, 1, 2, 3, 4, 5, 1, 2, 3], [2, 2, 1, 0, 3]]
    branches = [(0, 3, 4, 5), (0, 7, 1, 5), (1, 2, 0, 5), (1, 4, 5, 5), (0, 1, 2, 5)]
    be = _Recording(model, eos_ids=[EOS], pad_id=EOS, batch_size=16)
    be.shared_prefix = shared_prefix
    gen = torch.Generator().manual_seed(0)
    be.sample_branches(bases, branches, gen)
    got = be.first_logits
    assert sorted(got) == list(range(len(branches)))
    for row, (b, L, j, _) in enumerate(branches):
        seq = bases[b][:L] + [j]
        want = next_token_logits(model, [seq], [[len(seq)]], pad_id=EOS)[0][0]
        torch.testing.assert_close(got[row].float(), want, atol=1e-5, rtol=1e-4)


def test_branches_respect_limits_and_eos():
    model = _model(1)
    be = TransformersBackend(model, eos_ids=[EOS], pad_id=EOS, batch_size=3)
    bases = [[0, 1, 2, 3, 4, 5, 1]]
    branches = [(0, 2, 1, m) for m in (1, 2, 5, 9, 0)]
    out = be.sample_branches(bases, branches, torch.Generator().manual_seed(1))
    for (b, L, j, m), cont in zip(branches, out):
        assert len(cont) <= m
        assert EOS not in cont[:-1]
        if len(cont) < m:
            assert cont and cont[-1] == EOS
    assert out[-1] == []


def test_sampling_ignores_generation_config_and_matches_softmax():
    """First sampled token frequencies follow softmax(z / tau) although generation_config says top_k=1."""
    model = _model(2)
    tau = 0.8
    be = TransformersBackend(model, eos_ids=[EOS], pad_id=EOS, temperature=tau, batch_size=512)
    prefix = [0, 3, 1]
    n = 4000
    out = be.sample([prefix] * n, [1] * n, torch.Generator().manual_seed(3))
    counts = torch.bincount(torch.tensor([o[0] for o in out]), minlength=V).double()
    z = next_token_logits(model, [prefix], [[len(prefix)]], pad_id=EOS)[0][0].double()
    p = torch.softmax(z / tau, -1)
    # every cell within 4.5 binomial standard errors
    se = torch.sqrt(n * p * (1 - p))
    assert torch.all((counts - n * p).abs() <= 4.5 * se + 1), (counts, n * p)
    assert (counts > 0).sum() >= 3  # top_k=1 would give a single token


@pytest.mark.parametrize("path", ["shared prefix", "gathered prefix", "re-encoded prefix"])
def test_engine_paths_agree_in_distribution(path):
    """Every engine path gives continuations whose mean length agrees (same distribution) within sampling error."""
    model = _model(3, layers=1)
    be = TransformersBackend(model, eos_ids=[EOS], pad_id=EOS, batch_size=256)
    be.shared_prefix = path == "shared prefix"
    bases = [[0, 1, 2, 3, 4]]
    n = 1500
    branches = [(0, 3, 2, 6)] * n
    gen = torch.Generator().manual_seed(4)
    if path != "re-encoded prefix":
        out = be.sample_branches(bases, branches, gen)
    else:
        out = be.sample([bases[0][:3] + [2]] * n, [6] * n, gen)
    lengths = torch.tensor([len(o) for o in out], dtype=torch.float64)
    # exact expected first-token EOS probability from the model
    z = next_token_logits(model, [[0, 1, 2, 2]], [[4]], pad_id=EOS)[0][0].double()
    p_eos = float(torch.softmax(z, -1)[EOS])
    frac = float((lengths == 1).double().mean())
    assert abs(frac - p_eos) <= 4.5 * math.sqrt(p_eos * (1 - p_eos) / n) + 1e-3


@pytest.mark.parametrize("path", ["sample", "shared branches", "gathered branches"])
def test_preallocated_cache_matches_concatenating_cache(path):
    """The in-place KV buffers give the same samples as transformers' concatenating DynamicCache (same seed),
    including after finished rows are compacted away."""
    model = _model(5)
    outs = []
    for prealloc in (True, False):
        be = TransformersBackend(model, eos_ids=[EOS], pad_id=EOS, batch_size=64)
        be.preallocate = prealloc
        be.shared_prefix = path == "shared branches"
        gen = torch.Generator().manual_seed(7)
        if path == "sample":
            prefixes = [[0, 1, 2], [3, 4], [1, 1, 1, 2, 5], [2]] * 8
            outs.append(be.sample(prefixes, [12] * len(prefixes), gen))
        else:
            bases = [[0, 1, 2, 3, 4, 5, 1, 2, 3], [2, 2, 1, 0, 3]]
            branches = [(0, 3, 4, 12), (0, 7, 1, 9), (1, 2, 0, 12), (1, 4, 5, 6)] * 8
            outs.append(be.sample_branches(bases, branches, gen))
    assert outs[0] == outs[1]
    assert any(len(o) < 9 for o in outs[0]) and any(len(o) >= 9 for o in outs[0])  # rows finished at different steps
