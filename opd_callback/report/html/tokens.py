"""Token-level inputs of the HTML views: scored nodes indexed by position, and token ids decoded to strings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd

__all__ = ["NodeKey", "index_nodes", "decoder", "load_tokenizer_from_meta"]

#: ``(prompt_index, rollout_index, position)``
NodeKey = tuple[int, int, int]


def index_nodes(records: pd.DataFrame) -> dict[NodeKey, dict[str, Any]]:
    """The records grouped by node: ``{key: {"common": a record of the node, "configs": {config: record}}}``."""
    by_node: dict[NodeKey, dict[str, Any]] = {}
    for r in records.to_dict("records") if len(records) else []:
        key = (int(r["prompt_index"]), int(r["rollout_index"]), int(r["position"]))
        by_node.setdefault(key, {"common": r, "configs": {}})["configs"][r["config"]] = r
    return by_node


def decoder(tokenizer: Any) -> Callable[[int], str] | None:
    """``token id -> text`` with ``tokenizer`` (special tokens kept); None without a tokenizer."""
    if tokenizer is None:
        return None

    def dec(i: int) -> str:
        return tokenizer.decode([int(i)], skip_special_tokens=False)

    return dec


def load_tokenizer_from_meta(report: Any) -> Any:
    """The tokenizer recorded by ``opd-diagnose run`` (a local path), or None."""
    path = report.meta.get("tokenizer") or report.meta.get("student")
    if not isinstance(path, str) or not Path(path).exists():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - the report still renders without token strings
        return None
