"""One diagnostic over several processes: each rank scores its share of the probe set, the payloads are gathered and
merged into one report in the order a single process would produce, and the main process's decision is broadcast.

In a single process every helper is the identity; ``accelerate`` is imported only with several.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opd_callback.core.engine import AlignmentEngine
from opd_callback.report import AlignmentReport
from opd_callback.training.trainers import TrainerSpec

__all__ = ["Outcome", "engine_payload", "from_main", "gathered_from_ranks", "merged_report"]

# report metadata summed over ranks ("seconds": the slowest rank's)
COUNTERS = ("rollouts", "nodes", "continuations", "tokens", "seconds")


@dataclass
class Outcome:
    """What the main process decided after a diagnostic, broadcast to every rank: the scalars to log, whether to stop,
    the early-stopping counters, or the traceback of a failure."""

    metrics: dict[str, float] = field(default_factory=dict)
    stop: bool = False
    error: str | None = None
    stopper: dict | None = None


def from_main(value: Any, world: int) -> Any:
    """The main process's ``value`` on every rank (``value`` itself in a single process)."""
    if world <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gathered_from_ranks(item: Any, world: int) -> list:
    """Every rank's ``item``, in rank order."""
    if world <= 1:
        return [item]
    from accelerate.utils import gather_object

    return gather_object([item])


def engine_payload(engine: AlignmentEngine, rows: list[dict], mine: list[int]) -> tuple[dict, dict]:
    """Run ``engine`` on the probe rows of indices ``mine``; returns the picklable payload gathered from every rank
    (records, rollouts, counters) and the report's metadata (settings and configurations), which stays local."""
    if not mine:
        return {"records": [], "rollouts": [], "meta": {}}, {}
    rep = engine.run([rows[i] for i in mine], indices=mine)
    payload = {
        "records": rep.records.to_dict("records"),
        "rollouts": rep.rollouts.to_dict("records"),
        "meta": {k: v for k, v in rep.meta.items() if k in COUNTERS},
    }
    return payload, rep.meta


def merged_report(payloads: list[dict | None], local_meta: dict, step: int, spec: TrainerSpec) -> AlignmentReport:
    """One report from every rank's payload, in the order one process would produce (counters summed; seconds: the
    slowest rank's), stamped with ``step`` and the trainer (``spec``); the rest of the metadata is this rank's."""
    records: list[dict] = []
    rollouts: list[dict] = []
    meta = {k: v for k, v in local_meta.items() if k not in COUNTERS}
    for k in COUNTERS:
        meta[k] = 0
    for p in payloads:
        if not p:
            continue
        records.extend(p["records"])
        rollouts.extend(p["rollouts"])
        for k, v in (p.get("meta") or {}).items():
            if isinstance(v, (int, float)):
                meta[k] = max(meta[k], v) if k == "seconds" else meta[k] + v
    # same order as one process: by prompt, keeping the engine's order inside a prompt (stable sort)
    records.sort(key=lambda r: int(r["prompt_index"]))
    rollouts.sort(key=lambda r: (int(r["prompt_index"]), int(r["rollout_index"])))
    for r in records:
        r["step"] = step
    for r in rollouts:
        r["step"] = step
    meta.update({"step": step, "trainer": spec.trainer_name, "current": spec.description or None})
    return AlignmentReport(records, rollouts, meta)
