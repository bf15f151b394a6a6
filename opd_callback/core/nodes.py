"""Where nodes go: the completion positions scored on each base rollout (method.md §2, node selection), the depth
windows behind the default rule, the number of nodes a rollout gets (shared by the selection and the cost estimate),
and a model's position limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from opd_callback.core.settings import RolloutSettings

__all__ = [
    "depth_windows",
    "estimate_continuations",
    "nodes_per_rollout",
    "position_limit",
    "select_nodes",
    "window_index",
]


def window_index(position: int) -> int:
    """Exponential depth window of a completion position: 0 -> 0, 1 -> 1, [2,4) -> 2, [4,8) -> 3, ..."""
    return int(position).bit_length()


def depth_windows(length: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` of the depth windows ``[0,1), [1,2), [2,4), [4,8), ...`` on a completion of ``length`` tokens:
    window ``w >= 1`` covers ``[2^(w-1), 2^w)`` (the positions whose :func:`window_index` is ``w``), cut at
    ``length``."""
    w = 0
    while True:
        lo = 0 if w == 0 else 2 ** (w - 1)
        if lo >= length:
            return
        yield lo, min(1 if w == 0 else 2**w, length)
        w += 1


def _window_quotas(length: int, settings: RolloutSettings) -> list[tuple[int, int, int]]:
    """``(lo, hi, picks)`` per depth window: ``nodes_per_window`` positions each (fewer where a window is narrower),
    window by window from the start until ``max_nodes_per_rollout`` are taken."""
    quotas = []
    left = settings.max_nodes_per_rollout
    for lo, hi in depth_windows(length):
        if left <= 0:
            break
        picks = min(settings.nodes_per_window, hi - lo, left)
        quotas.append((lo, hi, picks))
        left -= picks
    return quotas


def _fixed_positions(length: int, settings: RolloutSettings) -> list[int]:
    """``node_selection="positions"``: the distinct configured positions inside a completion of ``length`` tokens."""
    return sorted({int(p) for p in settings.positions or [] if int(p) < length})


def nodes_per_rollout(settings: RolloutSettings, length: int) -> int:
    """How many nodes :func:`select_nodes` puts on a rollout of ``length`` tokens (at most ``length``)."""
    if length <= 0:
        return 0
    mode = settings.node_selection
    if mode == "all":
        return length
    if mode == "positions":
        return len(_fixed_positions(length, settings))
    if mode == "entropy":
        return min(settings.max_nodes_per_rollout, length)
    return sum(picks for _, _, picks in _window_quotas(length, settings))


def select_nodes(
    length: int,
    settings: RolloutSettings,
    rng: np.random.Generator,
    entropies: Sequence[float] | None = None,
) -> list[int]:
    """Completion positions to score on a rollout of ``length`` tokens (method.md §2, node selection)."""
    if length <= 0:
        return []
    mode = settings.node_selection
    if mode == "all":
        return list(range(length))
    if mode == "positions":
        return _fixed_positions(length, settings)
    if mode == "entropy":
        if entropies is None:
            raise ValueError("node_selection='entropy' needs the student's entropies")
        ent = np.asarray(entropies, dtype=np.float64)
        order = np.argsort(-ent, kind="stable")[: settings.max_nodes_per_rollout]
        return sorted(int(i) for i in order)
    chosen: list[int] = []
    for lo, hi, picks in _window_quotas(length, settings):
        drawn = rng.choice(hi - lo, size=picks, replace=False) + lo
        chosen.extend(int(p) for p in sorted(drawn))
    return chosen


def estimate_continuations(settings: RolloutSettings, n_prompts: int, n_configs: int) -> int:
    """Upper bound on the continuations one diagnostic samples:
    ``prompts x num_rollouts x nodes_per_rollout x |C| x rollouts_per_branch`` with
    ``|C| <= top_k + n_configs x teacher_top_k + 1`` and nodes per rollout those of a full-length completion."""
    nodes = nodes_per_rollout(settings, settings.max_new_tokens)
    cands = settings.top_k + n_configs * settings.teacher_top_k + 1
    return int(n_prompts * settings.num_rollouts * nodes * cands * settings.rollouts_per_branch)


def position_limit(model: torch.nn.Module) -> tuple[int | None, bool]:
    """``(max positions, hard)`` of a model: ``max_position_embeddings`` (or ``n_positions``...) from its config, and
    whether it is a hard limit (a learned absolute position embedding, e.g. GPT-2's ``wpe``, which fails past it) or
    not (rotary / relative positions run past it, untrained)."""
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            cfg = get_text()
        except Exception:  # noqa: BLE001 - fall back to the top-level config
            pass
    limit = None
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            limit = v
            break
    if limit is None:
        return None, False
    return limit, _has_learned_positions(model)


def _has_learned_positions(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a learned absolute position embedding (``wpe``, ``position_embeddings``, ``pos_*``)."""
    for name, sub in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(sub, torch.nn.Embedding) and ("wpe" == leaf or "position" in leaf or leaf.startswith("pos")):
            return True
    return False
