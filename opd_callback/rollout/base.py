"""The rollout interface: exact ancestral sampling and next-token logits, behind a small interface.

The estimator needs two things from a model: (1) *sample continuations of these prefixes* from exactly
``softmax(z/tau)`` (no top-k/top-p/min-p, no repetition penalty, whatever ``generation_config`` says), and (2) *the
next-token logits at these positions of these sequences*. :class:`RolloutBackend` is that interface;
:class:`~opd_callback.rollout.transformers_backend.TransformersBackend` and
:class:`~opd_callback.rollout.vllm_backend.VLLMBackend` implement it.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the CPU/CUDA torch, numpy and Python RNG states afterwards (the callback around a diagnostic; the vLLM
    backend around engine start-up and its CPU sampler, which draw from the global generators)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Put ``models`` in eval mode for the block, then restore **every** submodule's own ``training`` flag (a model in
    ``train()`` with one submodule deliberately in ``eval()`` comes back exactly so)."""
    saved: list[tuple[torch.nn.Module, bool]] = []
    seen: set[int] = set()
    for m in models:
        if m is None:
            continue
        for sub in m.modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                saved.append((sub, sub.training))
    try:
        for m in models:
            if m is not None:
                m.eval()
        yield
    finally:
        for sub, was in saved:
            sub.training = was


def eos_token_ids(model: torch.nn.Module | None, tokenizer=None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's ``generation_config.eos_token_id``."""
    ids: list[int] = []

    def add(x) -> None:
        if x is None:
            return
        if isinstance(x, Iterable) and not isinstance(x, (str, bytes)):
            for y in x:
                add(y)
        else:
            if int(x) not in ids:
                ids.append(int(x))

    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    if model is not None:
        gc = getattr(model, "generation_config", None)
        add(getattr(gc, "eos_token_id", None))
        if not ids:
            add(getattr(getattr(model, "config", None), "eos_token_id", None))
    return ids


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def next_token_logits(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Logits predicting token ``seq[i]`` for each ``i`` in ``positions[k]`` (i.e. the model output at ``i - 1``).

    Returns one float32 CPU tensor ``[len(positions[k]), V]`` per sequence. Only the requested rows are projected to
    the vocabulary when the model supports ``logits_to_keep`` (all transformers causal LMs do); otherwise all rows are.
    """
    device = _device_of(model)
    out: list[torch.Tensor | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda k: len(sequences[k]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seqs = [sequences[k] for k in chunk]
        for k in chunk:
            for i in positions[k]:
                if not 1 <= i <= len(sequences[k]):
                    raise IndexError(f"position {i} out of range for a sequence of length {len(sequences[k])}")
        ids, mask = _left_pad(seqs, pad_id, device)
        pos_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        width = ids.shape[1]
        # rows needed: output index (i - 1) in the unpadded sequence -> padded index width - len + i - 1
        rows = [[width - len(s) + i - 1 for i in positions[k]] for s, k in zip(seqs, chunk)]
        first = min((r for rr in rows for r in rr), default=width - 1)
        keep = width - first
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, logits_to_keep=keep,
                           use_cache=False).logits
            offset = width - logits.shape[1]
        except TypeError:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, use_cache=False).logits
            offset = 0
        for b, k in enumerate(chunk):
            idx = torch.as_tensor([r - offset for r in rows[b]], dtype=torch.long, device=logits.device)
            out[k] = logits[b].index_select(0, idx).float().cpu()
    return out  # type: ignore[return-value]


class RolloutBackend(ABC):
    """Generate continuations for prefixes, and report next-token logits. Implement both to plug in an engine."""

    @abstractmethod
    def sample(
        self,
        prefixes: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        generator: torch.Generator,
    ) -> list[list[int]]:
        """For each prefix (token ids), sample up to ``max_new_tokens[i]`` new tokens from the student at its
        temperature with no truncation. A row stops after an EOS token (included in the result)."""

    @abstractmethod
    def logits(self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Student logits predicting ``seq[i]`` for each ``i`` in ``positions[k]``: ``[len(positions[k]), V]``."""

    def sample_branches(
        self,
        bases: Sequence[Sequence[int]],
        branches: Sequence[tuple[int, int, int, int]],
        generator: torch.Generator,
    ) -> list[list[int]]:
        """Continuations of ``bases[b][:prefix_len] + [forced]`` for ``(b, prefix_len, forced, max_new)`` branches.

        The default re-encodes each prefix through :meth:`sample`; engines with prefix caching override it.
        """
        prefixes = [list(bases[b][:L]) + [int(j)] for b, L, j, _ in branches]
        return self.sample(prefixes, [int(m) for _, _, _, m in branches], generator)


