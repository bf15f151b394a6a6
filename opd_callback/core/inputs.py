"""Checks of what a user hands the engine: the examples, a reward function's output, a model's vocabulary size, and
the message given when a diagnostic scored no node."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Sequence

import torch

from opd_callback.core.settings import RolloutSettings, messages_to_prompt_row

__all__ = [
    "RewardFunctionError",
    "check_examples",
    "check_rewards",
    "last_user_index",
    "no_nodes_message",
    "repeated_names",
    "vocab_size",
    "warn_no_nodes",
]


class RewardFunctionError(RuntimeError):
    """``reward_fn`` raised, or returned something other than one finite float per completion."""


def vocab_size(model: torch.nn.Module) -> int:
    """Size of a model's output distribution (rows of its output embedding, else ``config.vocab_size``)."""
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if w is not None and w.dim() == 2:
        return int(w.shape[0])
    return int(model.config.vocab_size)


def repeated_names(names: Sequence[str]) -> list[str]:
    """The names that occur more than once (sorted): configuration names must be unique."""
    names = list(names)
    return sorted({n for n in names if names.count(n) > 1})


# --------------------------------------------------------------------------------------------------------------------
# examples


def check_examples(examples: Any) -> list[dict]:
    """``examples`` (a list of dicts or a ``datasets.Dataset``) as a list of dicts, each with a valid ``"prompt"`` (a
    non-empty string or chat messages; chat ``messages`` rows become prompts). Raises ``ValueError`` / ``TypeError``
    naming the example and the fix."""
    if examples is None:
        raise ValueError("examples is None: pass a non-empty list of dicts (or a datasets.Dataset) with a 'prompt' "
                         "field")
    try:
        rows = [dict(e) for e in examples]
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "examples must be a list of dicts or a datasets.Dataset whose rows have a 'prompt' field"
        ) from exc
    if not rows:
        raise ValueError("examples is empty: the diagnostic needs at least one prompt (a dict with a 'prompt' field)")
    return [_checked_row(i, r) for i, r in enumerate(rows)]


def _checked_row(i: int, r: dict) -> dict:
    """Example ``i`` with a ``prompt`` field (from chat ``messages`` where needed, arrays as lists), checked."""
    if "prompt" not in r and "messages" in r:
        try:
            r = messages_to_prompt_row(r)  # TRL's conversational format: drop the final assistant turn
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"example {i}: {exc}") from None
    if "prompt" not in r:
        raise ValueError(
            f"example {i} has no 'prompt' field (its fields: {sorted(r)}); add one (a string or chat messages), "
            "or give chat rows a 'messages' list"
        )
    p = r["prompt"]
    if hasattr(p, "tolist") and not isinstance(p, str):  # numpy arrays from parquet / datasets
        r = {**r, "prompt": p.tolist()}
        p = r["prompt"]
    _check_prompt(i, p)
    return r


def _check_prompt(i: int, p: Any) -> None:
    """Example ``i``'s prompt must be a non-empty string or a non-empty list of chat messages with string contents."""
    if isinstance(p, str):
        if not p:
            raise ValueError(f"example {i}: 'prompt' is an empty string; the student needs a prompt to continue "
                             "(drop the row or give it text)")
        return
    if isinstance(p, (list, tuple)) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
        if not all(isinstance(m["content"], str) for m in p):
            raise TypeError(f"example {i}: every chat message's 'content' must be a string")
        return
    raise TypeError(
        f"example {i}: 'prompt' must be a string or a list of chat messages (non-empty) "
        f"[{{'role': ..., 'content': ...}}], got {type(p).__name__}"
    )


def last_user_index(messages: list[dict]) -> int:
    """Index of the last ``user`` message of a chat prompt (the one a ContextTeacher template rewrites)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise ValueError("a chat prompt for ContextTeacher needs a 'user' message to rewrite")


# --------------------------------------------------------------------------------------------------------------------
# rewards


def check_rewards(out: Any, n: int, name: str) -> list[float]:
    """The output of reward function ``name`` on ``n`` completions as ``n`` finite floats (``RewardFunctionError``
    otherwise); warns, once per call site, when a reward lies outside ``[0, 1]``."""
    if isinstance(out, (Mapping, str, bytes, set, frozenset)) or not hasattr(out, "__len__"):
        raise RewardFunctionError(
            f"reward function {name} returned {type(out).__name__}; it must return a list of {n} floats "
            "(one per completion, in the order of the completions)"
        )
    if hasattr(out, "ndim") and getattr(out, "ndim") != 1:
        raise RewardFunctionError(
            f"reward function {name} returned a {getattr(out, 'ndim')}-dimensional {type(out).__name__}; it must "
            f"return a flat list of {n} floats (one per completion)"
        )
    try:
        if any(isinstance(v, (str, bytes)) for v in out):
            raise TypeError("a string is not a reward")
        vals = [float("nan") if v is None else float(v) for v in out]
    except (TypeError, ValueError) as exc:
        raise RewardFunctionError(
            f"reward function {name} returned {type(out).__name__}; it must return a list of {n} floats "
            "(one per completion)"
        ) from exc
    if len(vals) != n:
        raise RewardFunctionError(
            f"reward function {name} returned {len(vals)} rewards for {n} completions; it must return exactly one "
            "float per completion"
        )
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        raise RewardFunctionError(
            f"reward function {name} returned a non-finite reward (NaN/inf/None) for {len(bad)} of {n} completions "
            f"(first at index {bad[0]}); return a finite float for every completion, e.g. 0.0 for an unparseable one"
        )
    if any(v < 0.0 or v > 1.0 for v in vals):
        warnings.warn(
            f"reward function {name} returned rewards outside [0, 1]; S_j is then a mean reward rather than a success "
            "probability (alignment is unaffected by the scale, but correct_threshold applies to these values)",
            stacklevel=3,
        )
    return vals


# --------------------------------------------------------------------------------------------------------------------
# no nodes


def no_nodes_message(settings: RolloutSettings, rollouts: Sequence[dict]) -> str:
    """Why a diagnostic scored no node, and what to change."""
    lens = [len(r.get("completion_ids", [])) for r in rollouts]
    longest = max(lens, default=0)
    if settings.node_selection == "positions":
        return (
            f"no node was scored: every position in positions={settings.positions} is beyond the completions "
            f"(the longest has {longest} tokens); choose positions below that, or another node_selection"
        )
    return (
        f"no node was scored: every completion is empty (the student emitted EOS first, {len(lens)} rollouts); "
        "check the prompt format and the EOS token"
    )


def warn_no_nodes(settings: RolloutSettings, rollouts: Sequence[dict]) -> None:
    """Warn that a diagnostic scored no node (:func:`no_nodes_message`): its alignment statistics are NaN."""
    warnings.warn(no_nodes_message(settings, rollouts) + "; the report's alignment statistics are undefined (NaN)",
                  stacklevel=3)
