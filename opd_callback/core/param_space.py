"""Parameter-space alignment: ``cos(Jᵀg, Jᵀd)`` over a chosen parameter subset (method.md §5).

At a node ``u`` the logit-space vectors ``g`` (ideal gradient) and ``d_c`` (each configuration's distillation direction)
are pulled back to parameter space through the Jacobian ``J = ∂z(u)/∂θ`` of the node's logits. One forward pass
recomputes ``z(u)`` with autograd on, and **one batched backward pass** (``torch.autograd.grad(...,
is_grads_batched=True)``, a vmap over the vector-Jacobian product) returns ``Jᵀv`` for every ``v`` in
``[g; d_1; ...; d_C]`` at once. Their Gram matrix is accumulated parameter tensor by parameter tensor, so no
parameter-space vector is kept: memory is one batch of gradients. With ``projection_dim=k`` each parameter-space
vector is first mapped to ``k`` dimensions by a seeded count sketch (a sparse random projection with one ±1 per column;
inner products are preserved in expectation, with error ``O(1/sqrt(k))``).

Exact identity (tested): with an untied ``lm_head`` as the only parameters, ``Jᵀv = v hᵀ`` and the cosine equals the
logit-space one. No ``.grad`` is left on any parameter, and every ``requires_grad`` flag is restored.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from typing import Any, Callable, Sequence

import torch

from opd_callback.core.alignment import NodeScore
from opd_callback.core.inputs import vocab_size

__all__ = ["select_parameters", "CountSketch", "vjp_gram", "ParamSpaceScorer", "param_space_cosines"]


# --------------------------------------------------------------------------------------------------------------------
# which parameters


def _block_prefixes(model: torch.nn.Module) -> list[str]:
    """Names of the transformer blocks, in order: the longest ``nn.ModuleList`` (``model.layers``, ``h``,
    ``blocks``)."""
    best: tuple[int, str] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if best is None or len(mod) > best[0]:
                best = (len(mod), name)
    if best is None:
        return []
    n, name = best
    return [f"{name}.{i}." if name else f"{i}." for i in range(n)]


def select_parameters(
    model: torch.nn.Module, param_filter: str | Sequence[str] | Callable[[str], bool] | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """The ``(name, parameter)`` pairs that span the parameter space.

    ``param_filter``: ``None`` / ``"trainable"`` (every parameter with ``requires_grad``), ``"all"``, ``"lora"`` (peft
    adapter weights: names containing ``lora_``), ``"lm_head"`` (the output embedding), ``"last:N"`` (the last N
    transformer blocks: the model's longest ``ModuleList``), ``"re:REGEX"`` (``re.search`` on names), a list of exact
    names, or a callable ``name -> bool``. Raises ``ValueError`` naming the fix when nothing matches.
    """
    named = list(model.named_parameters())
    f = param_filter
    if f is None or f == "trainable":
        out = [(n, p) for n, p in named if p.requires_grad]
        if not out:
            raise ValueError("param_filter=None selects the trainable parameters, but none has requires_grad=True; "
                             "use param_filter='all', 'lm_head', 'last:N' or 'lora'")
        return out
    if callable(f):
        out, what = [(n, p) for n, p in named if f(n)], "the callable param_filter"
    elif isinstance(f, str):
        out, what = _by_rule(model, named, f), repr(f)
    else:
        out, what = _by_names(named, list(f)), "the list param_filter"
    if not out:
        raise ValueError(f"{what} selects no parameter of the model; see model.named_parameters() for the names")
    return out


Named = list[tuple[str, torch.nn.Parameter]]


def _by_rule(model: torch.nn.Module, named: Named, rule: str) -> Named:
    """The parameters a string ``param_filter`` (other than ``"trainable"``) selects."""
    if rule == "all":
        return named
    if rule == "lora":
        out = [(n, p) for n, p in named if "lora_" in n]
        if not out:
            raise ValueError("param_filter='lora' found no LoRA parameters (names containing 'lora_'): the student "
                             "is not a peft LoRA model; use 'all', 'lm_head' or 'last:N'")
        return out
    if rule == "lm_head":
        emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        ids = {id(p) for p in emb.parameters()} if emb is not None else set()
        return [(n, p) for n, p in named if id(p) in ids]
    if rule.startswith("last:"):
        return _last_blocks(model, named, rule)
    if rule.startswith("re:"):
        rx = re.compile(rule[3:])
        return [(n, p) for n, p in named if rx.search(n)]
    raise ValueError(f"param_filter {rule!r} is not understood: use 'all', 'lora', 'lm_head', 'last:N', 're:REGEX', "
                     "a list of names or a callable")


def _last_blocks(model: torch.nn.Module, named: Named, rule: str) -> Named:
    """``param_filter="last:N"``: the parameters of the model's last ``N`` transformer blocks."""
    k = int(rule[5:])
    blocks = _block_prefixes(model)
    if not blocks:
        raise ValueError(f"param_filter={rule!r}: the model has no list of blocks (nn.ModuleList); use 'all' or a "
                         "list of parameter names")
    if k > len(blocks):
        raise ValueError(f"param_filter={rule!r}: the model has only {len(blocks)} blocks; use last:1..last:"
                         f"{len(blocks)}")
    prefixes = tuple(blocks[-k:])
    return [(n, p) for n, p in named if n.startswith(prefixes)]


def _by_names(named: Named, names: list[str]) -> Named:
    """A list ``param_filter``: exactly these parameters (each once); an unknown name raises with close matches."""
    have = dict(named)
    missing = [n for n in names if n not in have]
    if missing:
        close = difflib.get_close_matches(missing[0], list(have), n=3)
        raise ValueError(f"param_filter names {missing[0]!r}, which is not a parameter of the model"
                         + (f" (close: {close})" if close else "") + "; see model.named_parameters()")
    return [(n, have[n]) for n in dict.fromkeys(names)]


# --------------------------------------------------------------------------------------------------------------------
# projection


class CountSketch:
    """Seeded sparse random projection to ``dim`` dimensions: coordinate ``i`` of a parameter tensor goes to bucket
    ``h(i)`` with sign ``s(i)``. ``E[<Sx, Sy>] = <x, y>``. Buckets and signs are drawn once per parameter tensor from
    ``(seed, tensor index)`` and cached (12 bytes per parameter)."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        self.dim = int(dim)
        self.seed = int(seed)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _hash(self, index: int, numel: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, numel)
        if key not in self._cache:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index * 7919 + 11) % (2**63 - 1))
            bucket = torch.randint(0, self.dim, (numel,), generator=gen)
            sign = torch.randint(0, 2, (numel,), generator=gen).to(torch.float32).mul_(2).sub_(1)
            self._cache[key] = (bucket, sign)
        b, s = self._cache[key]
        return b.to(device), s.to(device)

    def project(self, grads: torch.Tensor, index: int) -> torch.Tensor:
        """``grads`` ``[B, n]`` (the batched gradient of parameter tensor ``index``) -> ``[B, dim]`` float64."""
        bucket, sign = self._hash(index, grads.shape[1], grads.device)
        out = torch.zeros(grads.shape[0], self.dim, dtype=torch.float64, device=grads.device)
        out.index_add_(1, bucket, grads.to(torch.float64) * sign.to(torch.float64))
        return out


# --------------------------------------------------------------------------------------------------------------------
# the batched vector-Jacobian product


_VMAP_OK: dict[type, bool] = {}


def _forward_logits(model: torch.nn.Module, input_ids: Sequence[int]) -> torch.Tensor:
    dev = next(model.parameters()).device
    ids = torch.as_tensor([list(input_ids)], dtype=torch.long, device=dev)
    mask = torch.ones_like(ids)
    try:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits[0, -1]


def _batched_vjp(z: torch.Tensor, params: list[torch.Tensor], cot: torch.Tensor) -> list[torch.Tensor]:
    """``[Jᵀ cot_b for b]`` per parameter (``[B, *shape]``): one vmapped backward, or a loop where vmap fails."""
    key = type(z.grad_fn) if z.grad_fn is not None else type(None)
    vmap_failed = False
    if _VMAP_OK.get(key, True) and cot.shape[0] > 1:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                grads = torch.autograd.grad(
                    z, params, grad_outputs=cot, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
            return [torch.zeros((cot.shape[0], *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                    for g, p in zip(grads, params)]
        except (RuntimeError, NotImplementedError):  # maybe an op without a batching rule: try the loop
            vmap_failed = True
    per = [torch.autograd.grad(z, params, grad_outputs=cot[b], retain_graph=True, allow_unused=True)
           for b in range(cot.shape[0])]
    if vmap_failed:  # the loop worked where vmap did not: use the loop for this model from now on
        _VMAP_OK[key] = False
    return [
        torch.stack([torch.zeros_like(p) if per[b][i] is None else per[b][i] for b in range(cot.shape[0])])
        for i, p in enumerate(params)
    ]


def vjp_gram(
    model: torch.nn.Module,
    input_ids: Sequence[int],
    cotangents: torch.Tensor,
    params: Sequence[tuple[str, torch.nn.Parameter]] | None = None,
    *,
    projection: CountSketch | None = None,
) -> torch.Tensor:
    """Gram matrix ``[B, B]`` (float64) of ``Jᵀ v_b`` where ``J`` is the Jacobian of the next-token logits after
    ``input_ids`` with respect to ``params`` and ``v_b = cotangents[b]`` (``[B, V]``).

    Only the chosen parameters require grad during the call; every flag is restored and no ``.grad`` is written.
    """
    chosen = list(params) if params is not None else select_parameters(model, None)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in chosen:
            p.requires_grad_(True)
        with torch.enable_grad():
            z = _forward_logits(model, input_ids)
            cot = cotangents.to(device=z.device, dtype=z.dtype)
            tensors = [p for _, p in chosen]
            grads = _batched_vjp(z, tensors, cot)
        B = cot.shape[0]
        if projection is None:
            gram = torch.zeros(B, B, dtype=torch.float64)
            for g in grads:
                x = g.reshape(B, -1).to(torch.float64)
                gram += (x @ x.T).cpu()
            return gram
        y = torch.zeros(B, projection.dim, dtype=torch.float64, device=grads[0].device)
        for i, g in enumerate(grads):
            y += projection.project(g.reshape(B, -1), i)
        return (y @ y.T).cpu()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _cos(gram: torch.Tensor, i: int, j: int, eps: float) -> tuple[float, float, float, float, bool]:
    inner = float(gram[i, j])
    ni = float(gram[i, i].clamp_min(0).sqrt())
    nj = float(gram[j, j].clamp_min(0).sqrt())
    if ni < eps or nj < eps:
        return float("nan"), inner, ni, nj, True
    return inner / (ni * nj), inner, ni, nj, False


def param_space_cosines(
    model: torch.nn.Module,
    input_ids: Sequence[int],
    g: torch.Tensor,
    ds: Sequence[torch.Tensor],
    *,
    param_filter: Any = None,
    projection_dim: int | None = None,
    seed: int = 0,
    eps: float = 1e-9,
) -> list[dict]:
    """``cos(Jᵀg, Jᵀd_c)`` for each ``d_c`` at the node after ``input_ids`` (``g``, ``d_c``: full-vocabulary ``[V]``).

    Returns one dict per direction: ``alignment, inner, g_norm, d_norm, degenerate``.
    """
    params = select_parameters(model, param_filter)
    cot = torch.stack([g.reshape(-1).to(torch.float64)] + [d.reshape(-1).to(torch.float64) for d in ds])
    proj = CountSketch(projection_dim, seed) if projection_dim else None
    gram = vjp_gram(model, input_ids, cot, params, projection=proj)
    out = []
    for c in range(len(ds)):
        cos, inner, gn, dn, deg = _cos(gram, 0, c + 1, eps)
        out.append({"alignment": cos, "inner": inner, "g_norm": gn, "d_norm": dn, "degenerate": deg})
    return out


# --------------------------------------------------------------------------------------------------------------------
# the scorer the engine holds


class ParamSpaceScorer:
    """Replaces a node's logit-space alignment by the parameter-space one (``RolloutSettings(space="params")``).

    Args:
        model: the student (its live weights; a peft model works with ``param_filter="lora"``).
        settings: :class:`~opd_callback.core.settings.RolloutSettings` (``param_filter``, ``projection_dim``, ``seed``,
            ``degenerate_eps``).
    """

    def __init__(self, model: torch.nn.Module, settings: Any) -> None:
        self.model = model
        self.settings = settings
        self.params = select_parameters(model, settings.param_filter)
        self.projection = CountSketch(settings.projection_dim, settings.seed) if settings.projection_dim else None
        self.vocab = None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def rescore(self, ns: NodeScore, sequence: Sequence[int], position: int) -> NodeScore:
        """Score node ``sequence[:position]`` (the logits that predict ``sequence[position]``) in parameter space.

        Returns a copy of ``ns`` whose configurations carry the parameter-space ``alignment``, ``inner``,
        ``g_norm``, ``d_norm``, ``degenerate``, and the logit-space cosine in ``alignment_logits``. Every other field
        (teacher advantage, KL, JS, entropies) is a logit-space quantity and is kept.
        """
        if any(cs.d is None for cs in ns.configs):
            raise ValueError("parameter-space scoring needs each ConfigScore's direction d (score_node sets it)")
        vocab = self._vocab()
        vecs = [ns.g] + [cs.d for cs in ns.configs]
        if ns.support is not None:
            full = []
            for v in vecs:
                x = torch.zeros(vocab, dtype=torch.float64)
                x[ns.support] = v.to(torch.float64)
                full.append(x)
            vecs = full
        cot = torch.stack([v.reshape(-1).to(torch.float64) for v in vecs])
        gram = vjp_gram(self.model, list(sequence[:position]), cot, self.params, projection=self.projection)
        eps = float(self.settings.degenerate_eps)
        new = []
        for c, cs in enumerate(ns.configs):
            cos, inner, gn, dn, deg = _cos(gram, 0, c + 1, eps)
            deg = deg or bool(cs.degenerate)
            new.append(
                dataclasses.replace(
                    cs,
                    alignment=float("nan") if deg else cos,
                    inner=inner,
                    g_norm=gn,
                    d_norm=dn,
                    degenerate=deg,
                    alignment_logits=cs.alignment,
                )
            )
        return dataclasses.replace(ns, configs=new)

    def _vocab(self) -> int:
        if self.vocab is None:
            self.vocab = vocab_size(self.model)
        return self.vocab
