"""The transformers rollout backend: a KV-cached sampling loop over any causal LM, with shared-prefix attention
for the branches of one base rollout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .base import RolloutBackend, _device_of, _left_pad, next_token_logits
from .shared_prefix import (
    _SHARED_PREFIX,
    _BufferedLayer,
    _cache_kwarg,
    _kv_layers,
    _NotShareable,
    _out_cache,
    _select_cache_rows,
    _shared_prefix_attention_on,
    _SharedPrefix,
)
from .streams import row_keys, row_uniforms


@dataclass
class _Call:
    """One sampling call: where its tokens come from and where they go. ``results[i]`` collects row ``i``'s tokens;
    ``keys`` are the rows' random-stream keys (None: one shared ``torch.multinomial`` stream on ``generator``)."""

    generator: torch.Generator
    results: list[list[int]]
    keys: torch.Tensor | None


@dataclass
class _Batch:
    """The live rows of one decoding batch: the result row each fills, its next position and token limit, and the
    attention state of its cached tokens (a 2D mask, or with shared-prefix attention the :class:`_SharedPrefix`)."""

    rows: torch.Tensor
    next_pos: torch.Tensor
    limits: torch.Tensor
    mask: torch.Tensor | None = None
    shared: _SharedPrefix | None = None

    def keep(self, keep: torch.Tensor) -> None:
        """Drop every row not in ``keep`` (finished rows stop costing compute)."""
        self.rows, self.limits, self.next_pos = self.rows[keep], self.limits[keep], self.next_pos[keep]
        if self.shared is not None:
            self.shared.select(keep)
        if self.mask is not None:
            self.mask = self.mask[keep]

    def advance(self) -> None:
        """One more cached token per row."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)


@dataclass
class _Bases:
    """The base sequences of a :meth:`TransformersBackend.sample_branches` call after their one forward pass: the
    branches ``(base, prefix_len, forced, max_new)``, every layer's keys/values ``[R, Hkv, width, D]`` (left-padded:
    base ``b`` occupies its last ``lens[b]`` columns)."""

    branches: Sequence[tuple[int, int, int, int]]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    width: int
    lens: list[int]


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
        """:meth:`sample` with the call's row keys given: batches of similar prefix lengths."""
        n = len(prefixes)
        call = _Call(generator, [[] for _ in range(n)], keys)
        order = sorted(range(n), key=lambda k: len(prefixes[k]))
        for start in range(0, n, self.batch_size):
            chunk = [k for k in order[start : start + self.batch_size] if max_new_tokens[k] > 0]
            if chunk:
                self._sample_batch(chunk, prefixes, max_new_tokens, call)
        return call.results

    def _sample_batch(self, chunk, prefixes, max_new_tokens, call: _Call) -> None:
        """Encode a batch of prefixes (left-padded) and sample their continuations."""
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
        self._decode(out.logits[:, -1], cache, _Batch(rows, pos[:, -1] + 1, limits, mask=mask), call)

    def _decode(self, logits: torch.Tensor, cache, batch: _Batch, call: _Call) -> None:
        """Sample until every row of ``batch`` has hit EOS or its limit. ``logits`` predict each row's next token;
        ``cache`` holds the rows' keys/values (compacted along with the rows)."""
        device = self.device
        eos = torch.as_tensor(self.eos_ids or [-1], device=device)
        cache_kw = _cache_kwarg(self.model)
        shared_kw = {} if batch.shared is None else {_SHARED_PREFIX: batch.shared}
        step = 0
        # every row's uniforms for the whole call at once (compacted with the rows); None: shared multinomial
        uni = None if call.keys is None else row_uniforms(call.keys[batch.rows], int(batch.limits.max()))
        uni = None if uni is None else uni.to(logits.device)
        while True:
            tok = self._draw(logits, call.generator, None if uni is None else uni[:, step : step + 1]).to(device)
            step += 1
            for r, t in zip(batch.rows.tolist(), tok.tolist()):
                call.results[r].append(t)
            done = torch.isin(tok, eos) | (batch.limits <= step)
            if bool(done.all()):
                break
            if bool(done.any()):  # compact: finished rows stop costing compute
                keep = (~done).nonzero().squeeze(-1)
                tok = tok[keep]
                if uni is not None:
                    uni = uni[keep.to(uni.device)]
                _select_cache_rows(cache, keep)
                batch.keep(keep)
            batch.advance()
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=batch.mask,
                position_ids=batch.next_pos[:, None],
                use_cache=True,
                **{cache_kw: cache},
                **shared_kw,
            )
            cache = _out_cache(out)
            logits = out.logits[:, -1]
            batch.next_pos = batch.next_pos + 1

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
        base = _Bases(branches, layers, ids.shape[1], [len(b) for b in bases])
        call = _Call(generator, [[] for _ in branches], keys)
        if self.shared_prefix:  # rows of one base row contiguous: few segments per batch
            order = sorted(range(len(branches)), key=lambda k: (branches[k][0], -branches[k][1]))
        else:  # similar prefix lengths together: little padding in the gathered caches
            order = sorted(range(len(branches)), key=lambda k: -branches[k][1])
        todo = [k for k in order if branches[k][3] > 0]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            if not (self.shared_prefix and self._shared_branch_batch(chunk, base, call)):
                self._branch_batch(chunk, base, call)
        return call.results

    def _shared_branch_batch(self, chunk: list[int], base: _Bases, call: _Call) -> bool:
        """Sample a batch of branches with shared-prefix attention (:class:`_SharedPrefix`). Returns False, having
        sampled nothing, when the model cannot serve it: its first forward refused the state's keyword, made an
        attention call it does not cover, or did not call the attention function once per cache layer with it."""
        from transformers import DynamicCache

        B, branches, layers = len(chunk), base.branches, base.layers
        Ls = [int(branches[k][1]) for k in chunk]
        shared = _SharedPrefix(layers, [int(branches[k][0]) for k in chunk], Ls, [base.width - n for n in base.lens])
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
            batch = _Batch(rows, positions + 1, limits, shared=shared)
            self._decode(out.logits[:, -1], _out_cache(out), batch, call)
        return True

    def _branch_batch(self, chunk: list[int], base: _Bases, call: _Call) -> None:
        """Sample a batch of branches, each with its own copy of its prefix's keys/values (right-aligned, masked)."""
        from transformers import DynamicCache

        device, branches, width = self.device, base.branches, base.width
        B = len(chunk)
        Ls = [int(branches[k][1]) for k in chunk]
        lmax = max(Ls)
        mask = torch.zeros((B, lmax + 1), dtype=torch.long, device=device)
        # gather index: row b takes base row i_b, columns [start_b, start_b + L_b) right-aligned into [lmax-L_b, lmax)
        base_rows = torch.as_tensor([int(branches[k][0]) for k in chunk], device=device)
        cols = torch.arange(lmax, device=device)
        shift = torch.as_tensor([lmax - L for L in Ls], device=device)
        start = torch.as_tensor([width - base.lens[int(branches[k][0])] for k in chunk], device=device)
        src = (start[:, None] + cols[None, :] - shift[:, None]).clamp(0, width - 1)  # [B, lmax]
        valid = cols[None, :] >= shift[:, None]
        mask[:, :lmax] = valid.long()
        mask[:, lmax] = 1
        cache = DynamicCache()
        capacity = lmax + 1 + max(int(branches[k][3]) for k in chunk)
        for li, (k, v) in enumerate(base.layers):
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
        self._decode(out.logits[:, -1], _out_cache(out), _Batch(rows, positions + 1, limits, mask=mask), call)

    def _branch_inputs(self, chunk, branches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(forced tokens, their positions (= prefix lengths), result rows, max new tokens)`` of a batch of
        branches, on the model's device."""
        device = self.device
        forced = torch.as_tensor([int(branches[k][2]) for k in chunk], device=device)
        positions = torch.as_tensor([int(branches[k][1]) for k in chunk], device=device)
        limits = torch.as_tensor([int(branches[k][3]) for k in chunk], device=device)
        return forced, positions, torch.as_tensor(chunk, device=device), limits


