"""The rollout layer: exact ancestral sampling and next-token logits, behind a small interface.

The estimator needs two things from a model: (1) *sample continuations of these prefixes* from exactly
``softmax(z/tau)`` (no top-k/top-p/min-p, no repetition penalty, whatever ``generation_config`` says), and (2) *the
next-token logits at these positions of these sequences*. :class:`RolloutBackend` is that interface;
:class:`TransformersBackend` implements it with a plain KV-cached sampling loop over any ``transformers`` causal LM on any
device. A faster engine (vLLM, a prefix-sharing engine) can replace it by implementing the same two methods.
"""

from __future__ import annotations

import functools
import itertools
import random
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["RolloutBackend", "TransformersBackend", "eos_token_ids", "next_token_logits", "preserved_rng", "row_keys",
           "row_uniforms"]


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


# --------------------------------------------------------------------------------------------------------------------
# per-row random streams: one splitmix64 stream per row of a sampling call, so a row's tokens do not depend on which
# other rows share its batch (batch_size), on the order rows are processed, or on the path (prefix cache or not)

_U64 = 1 << 64


def _i64(c: int) -> int:
    c %= _U64
    return c - _U64 if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (wrapping multiplication)."""
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    return x ^ _lsr(x, 31)


def row_keys(seed: int, n: int, device=None) -> torch.Tensor:
    """Keys of rows ``0..n-1`` of one sampling call seeded ``seed``: int64 ``[n]``."""
    idx = torch.arange(n, dtype=torch.long, device=device)
    return _mix64(idx * _GOLDEN + _i64(seed))


def row_uniforms(keys: torch.Tensor, steps: int) -> torch.Tensor:
    """Uniform draws ``0..steps-1`` of each row's stream: float64 ``[len(keys), steps]`` in ``(0, 1]`` (53 random
    bits each; draw ``s`` of a row is splitmix64's output ``s`` from seed ``key``)."""
    offsets = torch.arange(1, steps + 1, dtype=torch.long, device=keys.device) * _GOLDEN
    bits = _mix64(keys[:, None] + offsets[None, :])
    return (_lsr(bits, 11) + 1).double() * (2.0**-53)


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
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, logits_to_keep=keep, use_cache=False).logits
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


class TransformersBackend(RolloutBackend):
    """Exact ancestral sampling with a KV cache over any ``transformers`` causal LM.

    Ignores ``generation_config`` entirely (its ``top_k``/``top_p``/penalties would change the distribution the
    formulas assume). Rows that finished are dropped from the batch (their cache rows are compacted away).

    Randomness: each call (:meth:`sample`, :meth:`sample_branches`) draws one seed from ``generator``; row ``i`` of the
    call then samples its ``s``-th token by inverse CDF from uniform number ``s`` of its own stream
    (:func:`row_uniforms`, splitmix64 keyed by the seed and ``i``). A row's tokens therefore do not depend on
    ``batch_size``, on which rows share its batch, or on the prefix-cache path, only on the call's seed, its index and
    its logits (``row_streams=False`` restores one shared ``torch.multinomial`` stream per call, which does depend on
    them).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        temperature: float = 1.0,
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.eos_ids = list(eos_ids)
        self.pad_id = int(pad_id)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.preallocate = True  # branch caches in preallocated buffers (no per-step concatenation)
        self.shared_prefix = True  # branches attend to their base row's KV directly (no per-row prefix copy)
        self.row_streams = True  # one random stream per row (batch-independent sampling)

    @property
    def device(self) -> torch.device:
        return _device_of(self.model)

    def logits(self, sequences, positions):
        return next_token_logits(self.model, sequences, positions, pad_id=self.pad_id, batch_size=self.batch_size)

    def _draw(self, logits: torch.Tensor, generator: torch.Generator, u: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row from ``softmax(logits / temperature)``: by inverse CDF at each row's uniform ``u``
        (float64 ``[B, 1]`` in ``(0, 1]``), or with ``torch.multinomial`` on ``generator`` when ``u`` is None."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if u is None:
            if probs.device != generator.device:
                probs = probs.to(generator.device)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        cdf = probs.double().cumsum(-1)
        # the first token whose CDF reaches u * total: u in (0, 1], so zero-probability tokens are never drawn
        return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_max(cdf.shape[-1] - 1)

    def _call_keys(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Row keys of one sampling call of ``n`` rows (one seed drawn from ``generator``), or None without
        per-row streams."""
        if not self.row_streams:
            return None
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return row_keys(seed, n, self.device)

    @torch.no_grad()
    def sample(self, prefixes, max_new_tokens, generator):
        n = len(prefixes)
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * n
        if n == 0:
            return []
        return self._sample_keyed(prefixes, max_new_tokens, generator, self._call_keys(n, generator))

    def _sample_keyed(self, prefixes, max_new_tokens, generator, keys) -> list[list[int]]:
        n = len(prefixes)
        results: list[list[int]] = [[] for _ in range(n)]
        order = sorted(range(n), key=lambda k: len(prefixes[k]))
        for start in range(0, n, self.batch_size):
            chunk = [k for k in order[start : start + self.batch_size] if max_new_tokens[k] > 0]
            if chunk:
                self._sample_batch(chunk, prefixes, max_new_tokens, generator, results, keys)
        return results

    def _sample_batch(self, chunk, prefixes, max_new_tokens, generator, results, keys=None) -> None:
        device = self.device
        ids, mask = _left_pad([prefixes[k] for k in chunk], self.pad_id, device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        rows = torch.as_tensor(chunk, device=device)
        limits = torch.as_tensor([max_new_tokens[k] for k in chunk], device=device)
        cache = _out_cache(out)
        layers = _kv_layers(cache) if self.preallocate else None
        if layers is not None:
            capacity = ids.shape[1] + max(max_new_tokens[k] for k in chunk)
            cache.layers = [_BufferedLayer(k, v, capacity) for k, v in layers]
        self._decode(out.logits[:, -1], cache, mask, pos[:, -1] + 1, rows, limits, generator, results, keys=keys)

    def _decode(
        self, logits, cache, mask, next_pos, rows, limits, generator, results, shared: _SharedPrefix | None = None,
        keys: torch.Tensor | None = None,
    ) -> None:
        """Sample until every row has hit EOS or its limit. ``logits`` predict each row's next token.

        ``mask`` is the 2D attention mask of the cached tokens, or None with ``shared`` (a :class:`_SharedPrefix`,
        passed to the model and compacted along with the cache). ``keys``: the call's row keys (indexed by ``rows``)."""
        device = self.device
        eos = torch.as_tensor(self.eos_ids or [-1], device=device)
        cache_kw = _cache_kwarg(self.model)
        shared_kw = {} if shared is None else {_SHARED_PREFIX: shared}
        step = 0
        # every row's uniforms for the whole call at once (compacted with the rows); None: shared multinomial
        uni = None if keys is None else row_uniforms(keys[rows], int(limits.max())).to(logits.device)
        while True:
            tok = self._draw(logits, generator, None if uni is None else uni[:, step : step + 1]).to(device)
            step += 1
            tok_list = tok.tolist()
            for r, t in zip(rows.tolist(), tok_list):
                results[r].append(t)
            done = torch.isin(tok, eos) | (limits <= step)
            if bool(done.all()):
                break
            if bool(done.any()):  # compact: finished rows stop costing compute
                keep = (~done).nonzero().squeeze(-1)
                rows, limits, tok, next_pos = rows[keep], limits[keep], tok[keep], next_pos[keep]
                if uni is not None:
                    uni = uni[keep.to(uni.device)]
                _select_cache_rows(cache, keep)
                if shared is not None:
                    shared.select(keep)
                if mask is not None:
                    mask = mask[keep]
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_kw: cache},
                **shared_kw,
            )
            cache = _out_cache(out)
            logits = out.logits[:, -1]
            next_pos = next_pos + 1

    # ------------------------------------------------------------------------------------------ shared-prefix path
    @torch.no_grad()
    def sample_branches(self, bases, branches, generator):
        """Continuations of ``base[:prefix_len] + [forced]`` for many branches of a few base sequences.

        One forward pass over each base sequence provides the KV cache of every prefix on it (no prefix is
        re-encoded). Branches attend to their base row's cache directly (:class:`_SharedPrefix`), or, when the model
        does not route attention the way that needs (or ``shared_prefix`` is off), to a per-branch copy of their
        prefix's slice of it. Branches of different nodes and rollouts are batched together. Falls back to
        :meth:`sample` when the model's cache is not a plain per-layer key/value cache.
        """
        if not branches:
            return []
        keys = self._call_keys(len(branches), generator)
        device = self.device
        ids, mask = _left_pad(bases, self.pad_id, device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        layers = _kv_layers(_out_cache(out))
        if layers is None:
            prefixes = [list(bases[b][:L]) + [int(j)] for b, L, j, _ in branches]
            return self._sample_keyed(prefixes, [int(m) for _, _, _, m in branches], generator, keys)
        width = ids.shape[1]
        lens = [len(b) for b in bases]
        results: list[list[int]] = [[] for _ in branches]
        if self.shared_prefix:  # rows of one base row contiguous: few segments per batch
            order = sorted(range(len(branches)), key=lambda k: (branches[k][0], -branches[k][1]))
        else:  # similar prefix lengths together: little padding in the gathered caches
            order = sorted(range(len(branches)), key=lambda k: -branches[k][1])
        todo = [k for k in order if branches[k][3] > 0]
        for start in range(0, len(todo), self.batch_size):
            args = (todo[start : start + self.batch_size], branches, layers, width, lens, generator, results, keys)
            if not (self.shared_prefix and self._shared_branch_batch(*args)):
                self._branch_batch(*args)
        return results

    def _shared_branch_batch(self, chunk, branches, layers, width, lens, generator, results, keys=None) -> bool:
        """Sample a batch of branches with shared-prefix attention (:class:`_SharedPrefix`). Returns False, having
        sampled nothing, when the model cannot serve it: its first forward refused the state's keyword, made an
        attention call it does not cover, or did not call the attention function once per cache layer with it."""
        from transformers import DynamicCache

        B = len(chunk)
        Ls = [int(branches[k][1]) for k in chunk]
        shared = _SharedPrefix(layers, [int(branches[k][0]) for k in chunk], Ls, [width - n for n in lens])
        cache = DynamicCache()  # suffix keys/values only: the forced token and the sampled ones
        if self.preallocate:
            capacity = 1 + max(int(branches[k][3]) for k in chunk)
            for k, v in layers:
                empty_k, empty_v = k.new_empty(B, k.shape[1], 0, k.shape[3]), v.new_empty(B, v.shape[1], 0, v.shape[3])
                cache.layers.append(_BufferedLayer(empty_k, empty_v, capacity))
        forced, positions, rows, limits = self._branch_inputs(chunk, branches)
        with _shared_prefix_attention_on(self.model):
            try:
                out = self.model(
                    input_ids=forced[:, None],
                    attention_mask=None,
                    position_ids=positions[:, None],
                    use_cache=True,
                    **{_cache_kwarg(self.model): cache, _SHARED_PREFIX: shared},
                )
            except _NotShareable:
                return False
            except TypeError as exc:  # a forward without **kwargs
                if _SHARED_PREFIX not in str(exc):
                    raise
                return False
            if shared.calls != len(layers):
                return False
            logits, cache = out.logits[:, -1], _out_cache(out)
            self._decode(logits, cache, None, positions + 1, rows, limits, generator, results, shared, keys=keys)
        return True

    def _branch_batch(self, chunk, branches, layers, width, lens, generator, results, keys=None) -> None:
        """Sample a batch of branches, each with its own copy of its prefix's keys/values (right-aligned, masked)."""
        from transformers import DynamicCache

        device = self.device
        B = len(chunk)
        Ls = [int(branches[k][1]) for k in chunk]
        lmax = max(Ls)
        mask = torch.zeros((B, lmax + 1), dtype=torch.long, device=device)
        # gather index: row b takes base row i_b, columns [start_b, start_b + L_b) right-aligned into [lmax-L_b, lmax)
        base_rows = torch.as_tensor([int(branches[k][0]) for k in chunk], device=device)
        cols = torch.arange(lmax, device=device)
        shift = torch.as_tensor([lmax - L for L in Ls], device=device)
        start = torch.as_tensor([width - lens[int(branches[k][0])] for k in chunk], device=device)
        src = (start[:, None] + cols[None, :] - shift[:, None]).clamp(0, width - 1)  # [B, lmax]
        valid = cols[None, :] >= shift[:, None]
        mask[:, :lmax] = valid.long()
        mask[:, lmax] = 1
        cache = DynamicCache()
        capacity = lmax + 1 + max(int(branches[k][3]) for k in chunk)
        for li, (k, v) in enumerate(layers):
            kk = k[base_rows]  # [B, H, W, D]
            vv = v[base_rows]
            idx = src[:, None, :, None].expand(B, kk.shape[1], lmax, kk.shape[3])
            kk = torch.gather(kk, 2, idx) * valid[:, None, :, None]
            vv = torch.gather(vv, 2, idx) * valid[:, None, :, None]
            if self.preallocate and len(cache.layers) == li:
                cache.layers.append(_BufferedLayer(kk, vv, capacity))
            else:
                cache.update(kk, vv, li)
        forced, positions, rows, limits = self._branch_inputs(chunk, branches)
        out = self.model(
            input_ids=forced[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{_cache_kwarg(self.model): cache},
        )
        self._decode(out.logits[:, -1], _out_cache(out), mask, positions + 1, rows, limits, generator, results,
                     keys=keys)

    def _branch_inputs(self, chunk, branches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(forced tokens, their positions (= prefix lengths), result rows, max new tokens)`` of a batch of
        branches, on the model's device."""
        device = self.device
        forced = torch.as_tensor([int(branches[k][2]) for k in chunk], device=device)
        positions = torch.as_tensor([int(branches[k][1]) for k in chunk], device=device)
        limits = torch.as_tensor([int(branches[k][3]) for k in chunk], device=device)
        return forced, positions, torch.as_tensor(chunk, device=device), limits


def _buffered_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A dynamic cache layer whose keys/values live in a preallocated buffer: appending a token writes in place
        instead of concatenating (``DynamicLayer.update`` copies the whole cache at every decoding step)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            super().__init__()
            b, h, n, _ = keys.shape
            cap = max(int(capacity), n)
            self._k = keys.new_empty((b, h, cap, keys.shape[-1]))
            self._v = values.new_empty((b, h, cap, values.shape[-1]))
            self._k[:, :, :n] = keys
            self._v[:, :, :n] = values
            self._n = n
            self.device = keys.device
            self.is_initialized = True
            self._sync()

        def _sync(self) -> None:
            self.keys = self._k[:, :, : self._n]
            self.values = self._v[:, :, : self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            m = key_states.shape[-2]
            if self._n + m > self._k.shape[2]:  # grow (not expected: capacity covers the longest continuation)
                grow = max(m, self._k.shape[2])
                self._k = torch.cat([self._k, self._k.new_empty(self._k.shape[:2] + (grow, self._k.shape[3]))], 2)
                self._v = torch.cat([self._v, self._v.new_empty(self._v.shape[:2] + (grow, self._v.shape[3]))], 2)
            self._k[:, :, self._n : self._n + m] = key_states
            self._v[:, :, self._n : self._n + m] = value_states
            self._n += m
            self._sync()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k = self._k[indices]
            self._v = self._v[indices]
            self._sync()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0:
                self._n = max(self._n + tokens_to_remove, 0)
                self._sync()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._sync()

    return BufferedLayer


_BUFFERED = None


def _BufferedLayer(keys, values, capacity):  # noqa: N802 - a factory that builds the class lazily
    global _BUFFERED
    if _BUFFERED is None:
        _BUFFERED = _buffered_layer_class()
    return _BUFFERED(keys, values, capacity)


_SHARED_PREFIX = "opd_shared_prefix"  # name of the attention implementation, and of the model keyword with its state


class _NotShareable(Exception):
    """An attention call that shared-prefix attention does not cover (the batch falls back to per-row prefixes)."""


class _SharedPrefix:
    """Shared-prefix attention for one batch of branch rows: one copy of each base row's keys/values for all rows.

    Row ``i`` continues ``bases[row_base[i]][:L_i]``. The base forward left the keys/values of every base row in
    ``layers[l] = (K, V)``, ``[R, Hkv, W, D]``, left-padded (base row ``b`` occupies columns ``starts[b]:``). Rather
    than a per-row copy of its prefix, row ``i``'s query attends to its base row's ``K``/``V`` with the columns outside
    ``[starts[b], starts[b] + L_i)`` masked out, and to its own suffix (forced token and sampled tokens), which is the
    model's ordinary KV cache. Rows of one base row are contiguous, so each such segment's prefix scores are one
    matmul against that base row's keys.

    The model receives this object as the ``opd_shared_prefix`` keyword, which transformers passes down to every
    attention call, while the model's configs name :func:`_shared_prefix_attention` as the attention implementation
    (no attention mask is built for an implementation without a registered mask function). ``calls`` counts the
    attention calls that used it, to check that the model routes attention that way.
    """

    def __init__(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        row_base: Sequence[int],
        prefix_lens: Sequence[int],
        starts: Sequence[int],
    ) -> None:
        device = layers[0][0].device
        width = layers[0][0].shape[2]
        start = torch.as_tensor([starts[b] for b in row_base], device=device)[:, None]
        end = start + torch.as_tensor(prefix_lens, device=device)[:, None]
        cols = torch.arange(width, device=device)[None, :]
        self.layers = layers
        self.masked = ((cols < start) | (cols >= end))[:, None, None, :]  # [B, 1, 1, W]
        self.calls = 0
        self._row_base = list(row_base)
        self._segment()

    def _segment(self) -> None:
        self.segments: list[tuple[int, int, int]] = []  # (base row, first row, end row)
        first = 0
        for b, rows in itertools.groupby(self._row_base):
            n = len(list(rows))
            self.segments.append((b, first, first + n))
            first += n

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (increasing), as the KV cache does when finished rows are compacted away."""
        self._row_base = [self._row_base[i] for i in keep.tolist()]
        self.masked = self.masked[keep]
        self._segment()

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Attention output ``[B, 1, Hq, D]`` (eager's layout) of one-token queries ``[B, Hq, 1, D]`` over the
        prefix and the suffix keys/values ``[B, Hkv, s, D]``. Same operations as eager attention: scores in the query
        dtype, scaled, masked, softmax in float32."""
        k_pre, v_pre = self.layers[layer]
        B, Hq, _, D = query.shape
        Hkv, W = k_pre.shape[1], k_pre.shape[2]
        rep = Hq // Hkv
        q = query.reshape(B, Hkv, rep, D)  # query head h * rep + r reads key/value head h (transformers' repeat_kv)
        scores = query.new_empty((B, Hkv, rep, W + key.shape[2]))
        for b, i, j in self.segments:  # [n, Hkv, rep, D] x [Hkv, W, D] as one [Hkv] batch of [n * rep, W] products
            qs = q[i:j].transpose(0, 1).reshape(Hkv, (j - i) * rep, D)
            s = torch.matmul(qs, k_pre[b].transpose(1, 2))
            scores[i:j, ..., :W] = s.view(Hkv, j - i, rep, W).transpose(0, 1)
        scores[..., W:] = torch.matmul(q, key.transpose(2, 3))
        scores.mul_(scaling)
        scores[..., :W].masked_fill_(self.masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs[..., W:], value)  # [B, Hkv, rep, D]
        for b, i, j in self.segments:
            ps = probs[i:j, ..., :W].transpose(0, 1).reshape(Hkv, (j - i) * rep, W)
            out[i:j] += torch.matmul(ps, v_pre[b]).view(Hkv, j - i, rep, D).transpose(0, 1)
        return out.view(B, 1, Hq, D)


def _shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function of :class:`_SharedPrefix`; plain SDPA for a call without that state."""
    shared = kwargs.pop(_SHARED_PREFIX, None)
    if shared is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = getattr(module, "layer_idx", None)
    if (
        layer is None
        or query.shape[2] != 1
        or attention_mask is not None
        or dropout
        or kwargs.get("sliding_window") is not None
        or kwargs.get("softcap") is not None
    ):
        raise _NotShareable
    shared.calls += 1
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return shared.attend(int(layer), query, key, value, scale), None


@functools.cache
def _register_shared_prefix_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_SHARED_PREFIX, _shared_prefix_attention)


@contextmanager
def _shared_prefix_attention_on(model: torch.nn.Module) -> Iterator[None]:
    """Make every config reachable from ``model``'s modules name shared-prefix attention; restore them on exit."""
    _register_shared_prefix_attention()
    configs: dict[int, object] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if hasattr(c, "_attn_implementation_internal"):
            configs[id(c)] = c
    saved = [(c, c._attn_implementation_internal) for c in configs.values()]
    try:
        for c, _ in saved:
            c._attn_implementation_internal = _SHARED_PREFIX
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation_internal = impl


def _kv_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) of a plain dynamic cache, or None when it is anything else (sliding, linear...)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    out = []
    for layer in layers:
        if type(layer).__name__ != "DynamicLayer" or getattr(layer, "is_sliding", False):
            return None
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or v is None or k.dim() != 4:
            return None
        out.append((k, v))
    return out


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    try:
        params = inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _select_cache_rows(cache, keep: torch.Tensor) -> None:
    """Keep only batch rows ``keep`` of a transformers cache, in place."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(keep)
        return
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if t is not None:
                    setattr(layer, name, t.index_select(0, keep.to(t.device)))
        return
    raise TypeError(f"cannot compact a cache of type {type(cache).__name__}")
