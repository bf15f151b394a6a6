"""Derive the *current* teacher configuration from a TRL trainer.

:func:`describe_trainer` reads a trainer's public attributes and arguments and returns a :class:`TrainerSpec`: the
``TeacherConfig`` named ``"current"`` that mirrors what the trainer's loss does, the trainer's sampling temperature and
completion length (defaults for the diagnostic's :class:`~opd_callback.RolloutSettings`), and notes on where the
diagnostic necessarily differs from the trainer. It never imports TRL at module import time; trainers are recognised
by the classes in their MRO.

Mirrored (checked against TRL 1.16's sources):

* ``trl.DistillationTrainer``: ``teacher_model``; ``beta`` 0 -> forward KL, 1 -> reverse KL, else TRL's generalized
  JSD with that ``beta``; ``temperature`` divides both sides' logits in the loss.
* ``trl.experimental.gkd.GKDTrainer``: ``teacher_model``; ``beta`` as above; its ``compute_loss`` calls
  ``generalized_jsd_loss`` without ``temperature`` (defaults to 1.0), so the loss temperature is 1.0 whatever
  ``args.temperature`` (which only sets the sampling temperature).
* ``trl.experimental.sdft.SDFTTrainer``: the teacher is the student's weights as selected by ``teacher_model_kind``
  (``live``: the student itself; ``base``/``ema``: the frozen or EMA copy ``trainer.teacher_model``, or, for a PEFT
  student, the same model with the adapter disabled/switched through the trainer's own context manager) prompted with
  ``args.teacher_prompt_template`` over ``prompt`` and ``privileged_context``. ``distillation_mode``: ``full_logits``
  -> divergence from ``distillation_alpha`` as from ``beta`` above; ``sampled_token`` -> REINFORCE on
  ``log Q(y) - log P(y)``; ``topk_logits`` -> TRL's own ``compute_topk_self_distillation_loss`` (student top-k support,
  ``distillation_topk``, ``distillation_add_tail``) called on temperature-scaled logits.
* SDPO, server / async / GOLD / IW-OPD distillation: refused (see :data:`REFUSALS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from opd_callback.core.settings import ContextTeacher, ExternalTeacher, TeacherConfig, messages_to_prompt_row

__all__ = [
    "TrainerSpec",
    "describe_trainer",
    "divergence_for_beta",
    "SDFTTopKLoss",
    "RoutedModel",
    "messages_to_prompt_row",
    "unwrap",
]

CURRENT = "current"

# TRL trainers whose teacher configuration cannot be expressed as one fixed TeacherConfig, with the reason.
REFUSALS: dict[str, str] = {
    "SDPOTrainer": (
        "SDPOTrainer re-prompts its self-teacher with a *successful sibling rollout* of the same training group, so "
        "its teacher context depends on rollouts that exist only inside one training step and cannot be rebuilt on a "
        "fixed probe set. The current configuration cannot be derived faithfully."
    ),
    "ServerDistillationTrainer": (
        "ServerDistillationTrainer's teacher is remote and exposes only top-k log-probabilities; full-vocabulary "
        "alignment needs a local teacher with the student's vocabulary."
    ),
    "AsyncDistillationTrainer": (
        "AsyncDistillationTrainer's teacher is served remotely (top-k log-probabilities only); full-vocabulary "
        "alignment needs a local teacher."
    ),
    "GOLDTrainer": (
        "GOLDTrainer distils across tokenizers; alignment compares distributions token by token and needs the "
        "student's vocabulary."
    ),
    "IWOPDTrainer": (
        "IWOPDTrainer weights its distillation loss by importance ratios that this diagnostic does not model."
    ),
}


@dataclass
class TrainerSpec:
    """What the callback knows about a trainer.

    Attributes:
        kind: ``"distillation"``, ``"gkd"``, ``"sdft"``, ``"plain"`` (any trainer with no derivable teacher) or
            ``"refused"``.
        trainer_name: the trainer's class name.
        current: the derived ``TeacherConfig`` named ``"current"`` (``None`` for ``plain`` / ``refused``).
        refusal: why the current configuration cannot be derived (``kind == "refused"``).
        sampling_temperature: the temperature the trainer samples completions at (default for the diagnostic).
        max_new_tokens: the trainer's completion length (default for the diagnostic).
        prepare_example: maps a probe row to what the engine expects (e.g. chat ``messages`` -> ``prompt``), or None.
        description: one line describing ``current``.
        notes: where the diagnostic necessarily differs from what the trainer does (logged once).
    """

    kind: str
    trainer_name: str
    current: TeacherConfig | None = None
    refusal: str | None = None
    sampling_temperature: float | None = None
    max_new_tokens: int | None = None
    prepare_example: Callable[[dict], dict] | None = None
    description: str = ""
    notes: list[str] = field(default_factory=list)


def unwrap(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / accelerate wrappers (``trainer.accelerator.unwrap_model``)."""
    acc = getattr(trainer, "accelerator", None)
    if acc is not None and model is not None:
        return acc.unwrap_model(model)
    return model


def divergence_for_beta(beta: float) -> tuple[str, float | None]:
    """TRL's ``beta`` convention: 0 -> forward KL, 1 -> reverse KL, otherwise generalized JSD with that beta."""
    b = float(beta)
    if b == 0.0:
        return "forward_kl", None
    if b == 1.0:
        return "reverse_kl", None
    return "jsd", b


class SDFTTopKLoss:
    """TRL SDFT's ``topk_logits`` objective at one node, via TRL's own ``compute_topk_self_distillation_loss``.

    The support is the student's top-k tokens; ``add_tail`` appends a bucket with the leftover mass, otherwise the
    top-k are renormalized; the divergence interpolates with ``alpha`` (0 forward KL, 1 reverse KL). Logits are divided
    by ``temperature`` first, as ``SDFTTrainer._forward_logits`` does.
    """

    def __init__(self, top_k: int, alpha: float, add_tail: bool, temperature: float = 1.0) -> None:
        self.top_k = int(top_k)
        self.alpha = float(alpha)
        self.add_tail = bool(add_tail)
        self.temperature = float(temperature)
        tail = "bucket" if self.add_tail else "renorm"
        self.__name__ = f"sdft_topk(k={self.top_k}, alpha={self.alpha:g}, tail={tail})"

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        from trl.experimental.sdft.loss_utils import compute_topk_self_distillation_loss

        k = min(self.top_k, student_logits.shape[-1])
        return compute_topk_self_distillation_loss(
            student_logits / self.temperature,
            teacher_logits / self.temperature,
            distillation_topk=k,
            distillation_alpha=self.alpha,
            distillation_add_tail=self.add_tail,
        ).sum()

    def __repr__(self) -> str:
        return self.__name__


class RoutedModel(torch.nn.Module):
    """Run ``model``'s forward inside ``context()``: the same weights routed differently (e.g. a PEFT adapter
    disabled, or switched to an EMA ``"teacher"`` adapter).

    The wrapped model is *not* registered as a sub-module, so ``train()``/``eval()`` on this wrapper never change the
    student's mode (the callback manages that).
    """

    def __init__(self, model: torch.nn.Module, context: Callable[[], Any], label: str = "routed") -> None:
        super().__init__()
        object.__setattr__(self, "_inner", model)
        object.__setattr__(self, "_context", context)
        self.label = label

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._context():
            return self._inner(*args, **kwargs)

    def parameters(self, recurse: bool = True):  # device / dtype discovery
        return self._inner.parameters(recurse)

    def get_output_embeddings(self):
        return self._inner.get_output_embeddings()

    @property
    def config(self):
        return self._inner.config

    @property
    def generation_config(self):
        return getattr(self._inner, "generation_config", None)

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def __repr__(self) -> str:
        return f"RoutedModel({self.label}, {type(self._inner).__name__})"


def _mro_names(obj: Any) -> list[tuple[str, str]]:
    return [(c.__module__ or "", c.__name__) for c in type(obj).__mro__]


def _trl_class(trainer: Any, name: str) -> bool:
    return any(n == name and m.startswith("trl.") for m, n in _mro_names(trainer))


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def _user_subclass_note(trainer: Any, base: str) -> list[str]:
    if type(trainer).__module__.startswith("trl."):
        return []
    return [
        f"{type(trainer).__name__} subclasses TRL's {base}; 'current' mirrors {base}'s loss. If your subclass changes "
        "the loss, pass include_current=False and describe it with explicit configs."
    ]


def describe_trainer(trainer: Any) -> TrainerSpec:
    """Recognise ``trainer`` and derive its current teacher configuration (see the module docstring)."""
    name = type(trainer).__name__
    for refused, why in REFUSALS.items():
        if _trl_class(trainer, refused):
            return _refused(name, why)
    args = getattr(trainer, "args", None)
    if _trl_class(trainer, "GKDTrainer"):
        return _describe_gkd(trainer, args, name)
    if _trl_class(trainer, "SDFTTrainer"):
        return _describe_sdft(trainer, args, name)
    if _trl_class(trainer, "DistillationTrainer"):
        return _describe_distillation(trainer, args, name)
    return TrainerSpec(kind="plain", trainer_name=name)


def _refused(name: str, why: str) -> TrainerSpec:
    """A trainer whose current configuration cannot be derived, and why."""
    return TrainerSpec(kind="refused", trainer_name=name, refusal=why)


def _teacher_model_config(trainer: Any, teacher: torch.nn.Module, beta: float,
                          temperature: float) -> tuple[TeacherConfig, str]:
    """``current`` for a trainer distilling from its ``teacher_model`` with TRL's ``beta`` convention, and the
    divergence's name."""
    div, b = divergence_for_beta(beta)
    cfg = TeacherConfig(CURRENT, ExternalTeacher(unwrap(trainer, teacher)), divergence=div, beta=b,
                        temperature=temperature)
    return cfg, div


def _describe_distillation(trainer: Any, args: Any, name: str) -> TrainerSpec:
    """``trl.DistillationTrainer``: its ``teacher_model``, ``beta`` and loss ``temperature``."""
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is None:
        return _refused(name, f"{name} has no local teacher_model (a remote teacher?); alignment needs a local "
                              "teacher.")
    beta = float(getattr(trainer, "beta", getattr(args, "beta", 1.0)))
    temp = float(getattr(trainer, "temperature", getattr(args, "temperature", 1.0)))
    cfg, div = _teacher_model_config(trainer, teacher, beta, temp)
    notes = _user_subclass_note(trainer, "DistillationTrainer")
    trunc = []
    if getattr(args, "top_k", 0) not in (0, None):
        trunc.append(f"top_k={args.top_k}")
    if getattr(args, "top_p", 1.0) not in (1.0, None):
        trunc.append(f"top_p={args.top_p}")
    if getattr(args, "min_p", None):
        trunc.append(f"min_p={args.min_p}")
    if trunc:
        notes.append(
            f"{name} samples with {', '.join(trunc)}; the diagnostic samples the untruncated softmax(z/tau) that its "
            "formulas assume (method.md §1)."
        )
    description = f"{name}.teacher_model, {div} (TRL beta={beta:g}), temperature={temp:g}"
    return TrainerSpec("distillation", name, cfg, sampling_temperature=temp, description=description, notes=notes,
                       max_new_tokens=getattr(args, "max_completion_length", None))


def _describe_gkd(trainer: Any, args: Any, name: str) -> TrainerSpec:
    """``trl.experimental.gkd.GKDTrainer``: its ``teacher_model`` and ``beta``; the loss temperature is 1.0."""
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is None:
        return _refused(name, f"{name} has no teacher_model")
    beta = float(getattr(trainer, "beta", getattr(args, "beta", 0.5)))
    # GKDTrainer.compute_loss calls generalized_jsd_loss(..., beta=self.beta) without temperature: the loss is at 1.0.
    cfg, div = _teacher_model_config(trainer, teacher, beta, 1.0)
    notes = _user_subclass_note(trainer, "GKDTrainer")
    lmbda = float(getattr(trainer, "lmbda", getattr(args, "lmbda", 1.0)))
    if lmbda < 1.0:
        notes.append(
            f"{name} uses lmbda={lmbda:g}: only that fraction of its batches distil on student rollouts (the rest on "
            "dataset or teacher completions); the diagnostic measures the on-policy part."
        )
    samp = float(getattr(args, "temperature", 1.0))
    if samp != 1.0:
        notes.append(
            f"{name} samples at temperature {samp:g} but its loss uses temperature 1.0 (generalized_jsd_loss is "
            "called without it); 'current' uses 1.0 like the loss."
        )
    description = f"{name}.teacher_model, {div} (TRL beta={beta:g}), loss temperature 1.0"
    return TrainerSpec("gkd", name, cfg, sampling_temperature=samp, description=description, notes=notes,
                       max_new_tokens=getattr(args, "max_new_tokens", None), prepare_example=messages_to_prompt_row)


def _sdft_teacher(trainer: Any, name: str, kind: str) -> tuple[torch.nn.Module | None, str]:
    """The SDFT teacher's model for ``teacher_model_kind`` ``kind`` (None: the live student) and who it is: the
    frozen or EMA copy, or for a PEFT student the same model routed through the trainer's own adapter context."""
    if kind == "live":
        return None, "the live student"
    student = unwrap(trainer, trainer.model)
    teacher_attr = getattr(trainer, "teacher_model", None)
    if _is_peft(student) and (teacher_attr is None or unwrap(trainer, teacher_attr) is student):
        ctx = getattr(trainer, "_get_teacher_context_for_self_distillation", None)
        if ctx is None:  # pragma: no cover - older/newer TRL
            if kind != "base":
                raise ValueError(f"{name}: cannot route the PEFT student to its {kind!r} teacher adapter")
            ctx = student.disable_adapter
        who = "the student's base weights (adapter disabled)" if kind == "base" else \
            "the student's EMA 'teacher' adapter"
        return RoutedModel(student, ctx, label=f"sdft-{kind}-adapter"), who
    if teacher_attr is None:
        raise ValueError(f"{name}: teacher_model_kind={kind!r} but trainer.teacher_model is None")
    who = "the initial student (frozen copy)" if kind == "base" else "the EMA copy of the student"
    return unwrap(trainer, teacher_attr), who


def _sdft_divergence(args: Any, name: str, temperature: float) -> tuple[Any, float | None, str]:
    """The SDFT ``distillation_mode``'s divergence, its beta, and a description."""
    mode = getattr(args, "distillation_mode", "topk_logits")
    alpha = float(getattr(args, "distillation_alpha", 0.5))
    if mode == "full_logits":
        div, b = divergence_for_beta(alpha)
        return div, b, f"{div} (distillation_alpha={alpha:g})"
    if mode == "sampled_token":
        return "sampled_token", None, "sampled_token (REINFORCE on log Q(y) - log P(y))"
    if mode == "topk_logits":
        k = getattr(args, "distillation_topk", 100)
        if k is None:
            raise ValueError(f"{name}: distillation_mode='topk_logits' requires distillation_topk to be set")
        loss = SDFTTopKLoss(int(k), alpha, bool(getattr(args, "distillation_add_tail", False)), temperature)
        return loss, None, loss.__name__
    raise ValueError(f"{name}: unknown distillation_mode {mode!r}")


def _sdft_notes(trainer: Any, args: Any, name: str) -> list[str]:
    """Where the diagnostic necessarily differs from an SDFT trainer."""
    notes = _user_subclass_note(trainer, "SDFTTrainer")
    skip = int(getattr(args, "num_loss_tokens_to_skip", 0) or 0)
    if skip > 0:
        notes.append(
            f"{name} skips the first {skip} completion tokens in its loss (num_loss_tokens_to_skip); the diagnostic "
            "still scores nodes there (filter records with position >= that)."
        )
    if getattr(args, "generate_from_teacher", False):
        notes.append(
            f"{name} samples from the teacher prompt (generate_from_teacher=True); the diagnostic samples from the "
            "student prompt, as the ideal gradient of the student's success requires."
        )
    if getattr(args, "use_teacher_server", False):
        notes.append(
            f"{name} scores the teacher on a server returning top-k log-probabilities; the diagnostic evaluates the "
            "same (live) weights locally with full logits."
        )
    return notes


class _SDFTExample:
    """Maps a probe row as an SDFT trainer does: chat ``messages`` -> ``prompt``, and ``privileged_context``
    stringified by the trainer's teacher-context builder (when it has one)."""

    def __init__(self, trainer: Any) -> None:
        builder = getattr(trainer, "teacher_context_builder", None)
        self.stringify = getattr(builder, "_stringify_privileged_context", None)

    def __call__(self, row: dict) -> dict:
        row = messages_to_prompt_row(row)
        if self.stringify is not None and "privileged_context" in row and row["privileged_context"] is not None:
            row = {**row, "privileged_context": self.stringify(row["privileged_context"])}
        return row


def _describe_sdft(trainer: Any, args: Any, name: str) -> TrainerSpec:
    """``trl.experimental.sdft.SDFTTrainer``: the teacher selected by ``teacher_model_kind``, prompted with
    ``teacher_prompt_template``, and the divergence of its ``distillation_mode``."""
    kind = getattr(args, "teacher_model_kind", "base")
    teacher_model, who = _sdft_teacher(trainer, name, kind)
    template = getattr(args, "teacher_prompt_template", "{prompt}\n\n{privileged_context}")
    temp = float(getattr(args, "temperature", 1.0))
    divergence, b, desc = _sdft_divergence(args, name, temp)
    cfg = TeacherConfig(
        CURRENT, ContextTeacher(template, model=teacher_model), divergence=divergence, beta=b, temperature=temp
    )
    description = f"{who} prompted with {template!r}, {desc}, temperature={temp:g} (teacher_model_kind={kind!r})"
    return TrainerSpec("sdft", name, cfg, sampling_temperature=temp, description=description,
                       notes=_sdft_notes(trainer, args, name), prepare_example=_SDFTExample(trainer),
                       max_new_tokens=getattr(args, "max_completion_length", None))
