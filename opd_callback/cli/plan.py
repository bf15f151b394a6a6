"""``run``'s plan: the request loaded step by step (settings, reward, prompts, output directory, tokenizer, models,
engine) into a :class:`RunPlan`, each failure one :class:`CliError` before the first prompt is scored."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd_callback.cli.errors import PROG, CliError
from opd_callback.cli.inputs import load_examples, load_reward
from opd_callback.cli.models import ModelCache, load_tokenizer, pick_device
from opd_callback.cli.resolve import RunRequest, resolve
from opd_callback.cli.specs import ConfigSpec

if TYPE_CHECKING:
    import torch

    from opd_callback.core.engine import AlignmentEngine
    from opd_callback.core.settings import RolloutSettings, TeacherConfig
    from opd_callback.report import AlignmentReport

__all__ = ["RunPlan", "plan_run", "check_data"]

_VLLM_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_seqs")


@dataclasses.dataclass
class RunPlan:
    """Everything ``run`` scores with: the request, its settings, the output directory (and the run saved there when
    resuming), the tokenizer, the student, the teacher configurations, the engine and its prepared prompts."""

    request: RunRequest
    settings: RolloutSettings
    out: Path
    previous: AlignmentReport | None  # the run saved in ``out`` when resuming
    device: torch.device
    tokenizer_path: str
    tokenizer: Any
    student: torch.nn.Module
    configs: list[TeacherConfig]
    engine: AlignmentEngine | None = None
    prepared: list = dataclasses.field(default_factory=list)  # the engine's prepared prompts

    def meta(self, argv: list[str]) -> dict:
        """The run's description in ``meta.json`` (the progress counters are added at each save)."""
        from opd_callback.core.settings import settings_dict

        r, specs = self.request, self.request["specs"]
        return {
            "settings": settings_dict(self.settings),
            "configs": [
                {**c.meta(), "model": next((s.model for s in specs if s.name == c.name), None)} for c in self.configs
            ],
            "student": str(r["student"]),
            "tokenizer": str(self.tokenizer_path),
            "data": str(r["data"]),
            "reward": str(r["reward"]),
            "device": str(self.device),
            "backend": r["backend"] or "transformers",
            "command": " ".join([PROG] + list(argv)),
            "total_prompts": len(self.prepared),
        }


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Resolve ``run``'s flags and config file and load what they name, in the order the errors are reported: every
    check that needs no model (settings, reward, prompts and templates, output directory) before any model loads."""
    request = resolve(args)
    settings = _settings(request)
    reward_fn = load_reward(request["reward"])
    examples = load_examples(request["data"], request["split"], request["limit"])
    check_data(examples, request["specs"], request["data"])
    out = Path(request["out"])
    previous = _previous_run(out, settings, args.resume)
    device = pick_device(request["device"])
    tokenizer_path = request["tokenizer"] or request["student"]
    if not Path(tokenizer_path).exists():
        raise CliError(f"--tokenizer {tokenizer_path}: no such directory")
    tokenizer = load_tokenizer(tokenizer_path, bool(request["trust_remote_code"]))
    models = ModelCache(device, request["dtype"], request["trust_remote_code"])
    student = models.get(request["student"], "--student")
    plan = RunPlan(request, settings, out, previous, device, tokenizer_path, tokenizer, student,
                   _teacher_configs(request["specs"], models))
    _prepare_engine(plan, reward_fn, examples, _vllm_options(args))
    return plan


def _settings(request: RunRequest) -> RolloutSettings:
    """The ``RolloutSettings`` the request describes (its own checks as one-line errors)."""
    from opd_callback.core.settings import RolloutSettings

    try:
        return RolloutSettings(**request["settings"])
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None


def check_data(examples: list[dict], specs: list[ConfigSpec], data: str) -> None:
    """The rows' prompts and every context template against every row, before any model is loaded (``examples`` is
    replaced by the checked rows)."""
    from opd_callback.core.inputs import check_examples

    try:
        rows = check_examples(examples)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--data {data}: {exc}") from None
    examples[:] = rows
    for s in specs:
        if s.kind == "context":
            for i, r in enumerate(rows):
                _check_template(s, r, i, data)


def _check_template(s: ConfigSpec, row: dict, i: int, data: str) -> None:
    """Context configuration ``s``'s template formats row ``i`` (a chat prompt's ``{prompt}``: its last user turn)."""
    from opd_callback.core.settings import format_template

    p = row["prompt"]
    if not isinstance(p, str):
        user = [m for m in p if m.get("role") == "user"]
        if not user:
            raise CliError(f"--data {data}: row {i} is a chat prompt without a 'user' message, which context "
                           f"configuration {s.name!r} rewrites")
        row = {**row, "prompt": user[-1]["content"]}
    try:
        format_template(s.template, row, f"context configuration {s.name!r}, row {i} of {data}")
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _previous_run(out: Path, settings: RolloutSettings, resume: bool) -> AlignmentReport | None:
    """The run saved in ``out`` to continue (``--resume``, same settings), None for a fresh run; a run already there
    without ``--resume``, or ``out`` being a file, is refused."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a directory")
    if not (out / "records.parquet").exists():
        return None
    if not resume:
        raise CliError(f"--out {out} already holds a run: pass --resume to continue it, or choose a new --out")
    from opd_callback.core.settings import settings_dict
    from opd_callback.report import AlignmentReport

    prev = AlignmentReport.load(out)
    old = prev.meta.get("settings") or {}
    new = settings_dict(settings)
    diff = sorted(k for k in new if k in old and old[k] != new[k])
    if diff:
        raise CliError(f"--resume: settings differ from the saved run in {diff}; use the same settings or a new --out")
    return prev


def _teacher_configs(specs: list[ConfigSpec], models: ModelCache) -> list[TeacherConfig]:
    """Each spec as a ``TeacherConfig`` with its model loaded (a context on the student's own weights has none)."""
    from opd_callback.core.settings import ContextTeacher, ExternalTeacher, TeacherConfig

    configs = []
    for s in specs:
        if s.kind == "teacher":
            teacher = ExternalTeacher(models.get(s.model, f"--teacher {s.name}"))
        else:
            teacher = ContextTeacher(s.template, models.get(s.model, f"--context-model {s.name}") if s.model else None)
        try:
            configs.append(TeacherConfig(s.name, teacher, **s.options))
        except (ValueError, TypeError) as exc:
            raise CliError(f"configuration {s.name!r}: {exc}") from None
    return configs


def _vllm_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--vllm-*`` flags given, as vLLM engine options."""
    return {k: getattr(args, "vllm_" + k) for k in _VLLM_OPTIONS if getattr(args, "vllm_" + k, None) is not None}


def _prepare_engine(plan: RunPlan, reward_fn: Any, examples: list[dict], vllm_options: dict[str, Any]) -> None:
    """The engine over the plan's models (the parameter space selected when ``space='params'``), its prompts prepared
    and, for ``--backend vllm``, the vLLM rollout backend."""
    from opd_callback.core.engine import AlignmentEngine

    settings = plan.settings
    try:
        engine = AlignmentEngine(plan.student, plan.tokenizer, plan.configs, reward_fn, settings)
        if settings.space == "params":
            from opd_callback.core.param_space import select_parameters

            select_parameters(plan.student, settings.param_filter)
        plan.prepared = engine.prepare(examples)
        if plan.request["backend"] == "vllm":
            from opd_callback.rollout.vllm_backend import make_backend

            engine.backend = make_backend("vllm", plan.student, eos_ids=engine.eos_ids, pad_id=engine.pad_id,
                                          temperature=settings.temperature, batch_size=settings.batch_size,
                                          model_path=plan.request["student"], options=vllm_options)
    except (ValueError, TypeError, ImportError) as exc:
        raise CliError(str(exc)) from None
    plan.engine = engine
