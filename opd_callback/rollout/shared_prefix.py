"""Shared-prefix attention and KV-cache helpers for the transformers backend: branches attend to one copy of their
base rollout's keys/values in place, and appended tokens go to preallocated buffers."""

from __future__ import annotations

import functools
import itertools
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


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
