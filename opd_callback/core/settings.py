"""User-facing configuration: teachers, teacher configurations and rollout settings.

Dataclasses with ``metadata={"help": ...}`` so that ``transformers.HfArgumentParser`` can turn them into flags.

Validation is one layer, here, driven by the dataclasses' annotations (:func:`check_value`): every public constructor
checks its arguments before any model is touched. Types are checked, never coerced by accident: a ``bool`` field takes
only ``True``/``False``, an ``int`` field only an integer (not ``2.5``, not ``"2"``, not ``True``), a ``float`` field
any finite real number. Wrong types raise ``TypeError``, values out of range ``ValueError``; every message names the
argument, the value it got, and what to pass instead. Strings from YAML/TOML or the command line are parsed by the CLI
(:func:`parse_setting`), never here.
"""

from __future__ import annotations

import math
import numbers
import string
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal

import numpy as np
import torch

from opd_callback.core.divergences import get_divergence

__all__ = [
    "ExternalTeacher",
    "ContextTeacher",
    "TeacherConfig",
    "RolloutSettings",
    "template_fields",
    "format_template",
    "messages_to_prompt_row",
    "check_value",
    "parse_setting",
]


# --------------------------------------------------------------------------------------------------------------------
# the validation layer


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        inner = typing.get_args(tp)
        plural = {int: "ints", float: "numbers", str: "strings", bool: "bools"}
        return f"a list of {plural.get(inner[0], _type_name(inner[0]))}" if inner else "a list"
    if tp is type(None):
        return "None"
    return {bool: "a bool (True or False)", int: "an int", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_NO = object()


def _conform(value: Any, tp: Any) -> Any:
    """``value`` normalised to annotation ``tp`` (numpy scalars -> Python numbers, tuples -> lists), or ``_NO`` when it
    does not have that type. Nothing is parsed: ``"2"`` is not an int, ``1`` is not a bool, ``True`` is not an int."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _conform(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin is Literal:
        return value if isinstance(value, str) and value in typing.get_args(tp) else _NO
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _NO
        inner = (typing.get_args(tp) or (Any,))[0]
        items = [_conform(v, inner) for v in value]
        return _NO if any(v is _NO for v in items) else items
    if tp is type(None):
        return None if value is None else _NO
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        return _NO
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        return _NO
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            return float(value) if math.isfinite(float(value)) else _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    return value if isinstance(value, tp) else _NO


def check_value(owner: str, name: str, value: Any, tp: Any, hint: str = "") -> Any:
    """``value`` checked against annotation ``tp`` (and normalised: numpy scalars to Python numbers); raises
    ``TypeError`` naming ``owner.name``, the value and what to pass. Floats must also be finite."""
    out = _conform(value, tp)
    if out is _NO:
        what = _type_name(tp)
        if typing.get_origin(tp) is Literal:
            raise ValueError(f"{owner}: {name} must be {what}, got {_got(value)}")
        extra = ""
        base = _strip_none(tp)
        if isinstance(value, str) and base in (int, float, bool):
            extra = f"; pass the {'bool' if base is bool else 'number'} itself, not a string"
        elif base is float and isinstance(value, float):
            raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
        elif base is int and isinstance(value, numbers.Real) and not isinstance(value, bool):
            extra = "; pass a whole number"
        raise TypeError(f"{owner}: {name} must be {what}, got {_got(value)}{extra}{hint}")
    return out


_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


def parse_setting(owner: str, name: str, value: Any, tp: Any) -> Any:
    """Parse a value read from a config file or the command line into annotation ``tp``: strings are parsed
    (``"no"`` -> ``False``, ``"8"`` -> ``8``, ``"none"`` -> ``None``) or refused with a message naming ``name``; values
    that already have the type pass through :func:`check_value`."""
    if not isinstance(value, str):
        if isinstance(value, (list, tuple)) and typing.get_origin(_strip_none(tp)) in (list, tuple):
            inner = typing.get_args(_strip_none(tp))[0]
            return [parse_setting(owner, f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return check_value(owner, name, value, tp)
    s = value.strip()
    base = _strip_none(tp)
    if base is not tp and s.lower() in ("none", "null", "~"):
        return None
    if base is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ValueError(f"{owner}: {name} must be true or false (yes/no, on/off, 1/0), got {value!r}")
    if base is int:
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"{owner}: {name} must be an integer, got {value!r}") from None
    if base is float:
        try:
            out = float(s)
        except ValueError:
            raise ValueError(f"{owner}: {name} must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
        return out
    if typing.get_origin(base) in (list, tuple):
        inner = typing.get_args(base)[0]
        parts = [p for p in s.replace(",", " ").split() if p]
        return [parse_setting(owner, f"{name}[{i}]", p, inner) for i, p in enumerate(parts)]
    return check_value(owner, name, s, tp)


def _strip_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


# --------------------------------------------------------------------------------------------------------------------
# templates and chat rows


def _parse_template(template: str) -> list[tuple[str, str | None, str | None]]:
    """``(field name, conversion, format spec)`` of every replacement field, nested ones (``{a:{w}}``) included."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"template {template!r} cannot be parsed ({exc}): a literal brace is written '{{{{' or '}}}}', and every "
            "field is '{name}' with a column name"
        ) from None
    out = []
    for _, field_name, spec, conv in parsed:
        if field_name is None:
            continue
        out.append((field_name, conv, spec))
        if spec:
            out.extend(_parse_template(spec))
    return out


def template_fields(template: str) -> list[str]:
    """Root field names that ``template.format(**example)`` needs (``{a.b}``, ``{a[0]}`` and ``{x:{w}}`` need ``a``,
    ``x`` and ``w``). Raises ``ValueError`` naming the template when it cannot be parsed or has a positional field."""
    if not isinstance(template, str):
        raise TypeError(f"a template must be a string, got {_got(template)}")
    names: list[str] = []
    for field_name, conv, _ in _parse_template(template):
        if field_name == "" or field_name.isdigit():
            raise ValueError(
                f"template {template!r} has a positional field '{{{field_name}}}': name every field after an "
                "example column, e.g. '{prompt}' or '{solution}' (a literal brace is written '{{' or '}}')"
            )
        if conv not in (None, "r", "s", "a"):
            raise ValueError(f"template {template!r}: field '{{{field_name}!{conv}}}' has an unknown conversion "
                             f"'!{conv}'; use !r, !s or !a, or none")
        root = field_name.split(".", 1)[0].split("[", 1)[0]
        if not root.isidentifier():
            raise ValueError(f"template {template!r}: field '{{{field_name}}}' does not start with a column name")
        if root not in names:
            names.append(root)
    return names


def format_template(template: str, example: dict, where: str) -> str:
    """``template.format(**example)``, with any failure (missing column, bad format spec for the value, index out of
    range...) raised as a ``ValueError`` that names ``where`` (the configuration and example), the template and the
    cause."""
    missing = [f for f in template_fields(template) if f not in example]
    if missing:
        raise ValueError(
            f"{where}: template {template!r} names field {missing[0]!r}, which the example does not have (its "
            f"fields: {sorted(example)}). Add that column to the data or change the template."
        )
    try:
        return template.format(**example)
    except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{where}: template {template!r} cannot be filled from the example ({type(exc).__name__}: {exc}); check "
            "the field's format spec, index or attribute against the column's value"
        ) from None


def messages_to_prompt_row(row: dict) -> dict:
    """A chat-``messages`` row (TRL's conversational format, GKD / SFT datasets) -> a row with ``prompt``: the
    messages before the final assistant turn(s), which are dropped (the student writes its own). Rows that already
    have ``prompt``, or have no ``messages``, are returned unchanged."""
    if "prompt" in row or "messages" not in row:
        return row
    msgs = row["messages"]
    if not isinstance(msgs, (list, tuple)) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in msgs
    ):
        raise TypeError(
            f"'messages' must be a list of chat messages [{{'role': ..., 'content': ...}}], got {_got(msgs)[:200]}"
        )
    msgs = list(msgs)
    while msgs and msgs[-1].get("role") == "assistant":
        msgs.pop()
    if not msgs:
        raise ValueError("a 'messages' row has no non-assistant message to use as the prompt")
    out = {k: v for k, v in row.items() if k != "messages"}
    out["prompt"] = msgs
    return out


# --------------------------------------------------------------------------------------------------------------------
# teachers and settings


@dataclass
class ExternalTeacher:
    """A separate teacher model that sees the same prompt as the student.

    Args:
        model: a causal LM with the **same vocabulary** as the student (same tokenizer). Any device; inputs follow it.
        tokenizer: optional; when given, it is compared with the student's tokenizer before any rollout.
    """

    model: torch.nn.Module
    tokenizer: Any = None

    kind: str = field(default="external", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(
                f"ExternalTeacher: model must be a causal LM (a torch.nn.Module), got {type(self.model).__name__}; "
                "load it first, e.g. AutoModelForCausalLM.from_pretrained(path)"
            )


@dataclass
class ContextTeacher:
    """The student itself (or ``model``) given a privileged context: self-distillation.

    Args:
        template: a ``str.format`` template over the example's fields, e.g.
            ``"{prompt}\\nReference solution: {solution}\\n"``. For a string prompt the formatted text is the teacher's
            prompt; for a chat prompt (list of messages) ``{prompt}`` is the last user message's content, that message
            is rewritten with the formatted text, and the tokenizer's chat template is applied.
        model: ``None`` uses the student's own (live) weights; otherwise a frozen copy or any same-vocabulary model.
    """

    template: str
    model: torch.nn.Module | None = None

    kind: str = field(default="context", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str):
            raise TypeError(f"ContextTeacher: template must be a str.format string, got {_got(self.template)}")
        if not self.template.strip():
            raise ValueError(
                "ContextTeacher: template is empty; give the teacher's prompt, e.g. '{prompt}\\n{solution}'"
            )
        try:
            self.fields = template_fields(self.template)
        except ValueError as exc:
            raise ValueError(f"ContextTeacher: {exc}") from None
        if self.model is not None and not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"ContextTeacher: model must be a torch.nn.Module or None, got {type(self.model).__name__}")


Teacher = ExternalTeacher | ContextTeacher


@dataclass
class TeacherConfig:
    """One teacher configuration ``c``: a teacher plus the divergence that distils it.

    Args:
        name: label used in records, summaries and logged keys (``opd/<name>/alignment``).
        teacher: an :class:`ExternalTeacher` or a :class:`ContextTeacher`.
        divergence: ``"reverse_kl"`` (TRL ``beta=1``, default), ``"forward_kl"`` (``beta=0``), ``"jsd"`` (TRL's
            generalized JSD with ``beta``), ``"sampled_token"``, ``"topk"`` (student top-k + tail bucket, TRL SDFT), any
            name registered with :func:`opd_callback.register_divergence`, or a callable
            ``loss(student_logits, teacher_logits) -> scalar`` (its direction is taken by autograd).
        beta: TRL's interpolation coefficient for ``jsd`` (default 0.5) and ``topk`` (default 1.0 = reverse KL).
        temperature: divides both the student's and the teacher's logits inside the loss (TRL's convention).
        top_k: support size for ``topk`` (default 100, TRL SDFT's default).
    """

    name: str
    teacher: Teacher
    divergence: str | Callable[..., torch.Tensor] = "reverse_kl"
    beta: float | None = None
    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise (TypeError if not isinstance(self.name, str) else ValueError)(
                f"TeacherConfig: name must be a non-empty string, got {_got(self.name)}"
            )
        if "/" in self.name:
            raise ValueError(f"TeacherConfig name {self.name!r} contains '/': it is used in metric keys; rename it")
        owner = f"TeacherConfig {self.name!r}"
        if not isinstance(self.teacher, (ExternalTeacher, ContextTeacher)):
            raise TypeError(
                f"{owner}: teacher must be ExternalTeacher(model) or ContextTeacher(template), "
                f"got {type(self.teacher).__name__}"
            )
        if not callable(self.divergence):
            if not isinstance(self.divergence, str):
                raise TypeError(f"{owner}: divergence must be a name such as 'reverse_kl' or a callable "
                                f"loss(student_logits, teacher_logits), got {_got(self.divergence)}")
            try:
                get_divergence(self.divergence)  # raises with the list of known names
            except ValueError as exc:
                raise ValueError(f"{owner}: {exc}") from None
        self.beta = check_value(owner, "beta", self.beta, float | None)
        if self.beta is not None and not (0.0 <= self.beta <= 1.0):
            raise ValueError(f"{owner}: beta must be in [0, 1], got {self.beta}")
        self.temperature = check_value(owner, "temperature", self.temperature, float)
        if not self.temperature > 0:
            raise ValueError(f"{owner}: temperature must be > 0, got {self.temperature}")
        self.top_k = check_value(owner, "top_k", self.top_k, int | None)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"{owner}: top_k must be >= 1, got {self.top_k}")

    @property
    def divergence_name(self) -> str:
        """The divergence's registered name, or a callable's ``__name__``."""
        d = self.divergence
        return d if isinstance(d, str) else getattr(d, "__name__", type(d).__name__)

    def meta(self) -> dict[str, Any]:
        """The configuration as written into a report's metadata (``meta["configs"]``)."""
        return {
            "name": self.name,
            "teacher": self.teacher.kind,
            "template": getattr(self.teacher, "template", None),
            "divergence": self.divergence_name,
            "beta": self.beta,
            "temperature": self.temperature,
            "top_k": self.top_k,
        }


@dataclass
class RolloutSettings:
    """How the diagnostic samples, where it puts nodes, and how it scores them.

    Cost of one diagnostic ~= ``len(examples) * num_rollouts * nodes_per_rollout * |C| * rollouts_per_branch``
    continuations, with ``|C| <= top_k + n_teachers * teacher_top_k + 1``.
    """

    num_rollouts: int = field(default=4, metadata={"help": "Base rollouts sampled from the student per prompt."})
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum completion length (base and continuations)."})
    temperature: float = field(default=1.0, metadata={"help": "Student sampling temperature tau (P = softmax(z/tau))."})
    node_selection: Literal["depth_windows", "entropy", "all", "positions"] = field(
        default="depth_windows", metadata={"help": "How nodes are chosen on each rollout."}
    )
    nodes_per_window: int = field(default=1, metadata={"help": "depth_windows: positions drawn per window."})
    max_nodes_per_rollout: int = field(
        default=8, metadata={"help": "Cap on nodes per rollout (also the m of node_selection='entropy')."}
    )
    positions: list[int] | None = field(
        default=None, metadata={"help": "node_selection='positions': completion positions to score."}
    )
    top_k: int = field(default=4, metadata={"help": "Student top-k candidates per node (>= vocab size: every token)."})
    teacher_top_k: int = field(
        default=2, metadata={"help": "Each teacher's top-k added to the candidates (0 allowed)."}
    )
    rollouts_per_branch: int = field(default=8, metadata={"help": "Continuations sampled per forced candidate."})
    adaptive: bool = field(
        default=False,
        metadata={
            "help": "Adaptive allocation (docs/method.md): a uniform first round, then the prompt's budget (pooled "
            "over its nodes) goes where it most reduces the predicted alignment error; saturated nodes stop."
        },
    )
    adaptive_initial: int = field(
        default=2,
        metadata={
            "help": "Adaptive: minimum first-round continuations per candidate (at least rollouts_per_branch/4)."
        },
    )
    budget: int | None = field(
        default=None,
        metadata={
            "help": "Adaptive: nominal continuations per node (default rollouts_per_branch x live candidates); the "
            "budgets of a prompt's nodes are pooled, one node gets at most 4x its own."
        },
    )
    reuse_base_rollout: bool = field(
        default=True, metadata={"help": "Count the base rollout as one free sample of its own token's success."}
    )
    tail: Literal["impute", "renormalize"] = field(
        default="impute", metadata={"help": "Tokens outside the candidates: impute V_hat, or renormalize onto C."}
    )
    correct_threshold: float = field(default=0.5, metadata={"help": "A rollout is correct when reward >= this."})
    batch_size: int = field(
        default=256,
        metadata={
            "help": "Sequences per forward pass when sampling/scoring. Larger is faster (a branch row holds only its "
            "own continuation's KV cache; the prefix is shared); each step materialises batch_size x vocabulary "
            "logits, so lower it if a diagnostic runs out of memory."
        },
    )
    prefix_cache: bool = field(
        default=True,
        metadata={"help": "Reuse the base rollout's KV cache for every node prefix instead of re-encoding it."},
    )
    reward_batch_size: int = field(default=512, metadata={"help": "Completions per reward_fn call."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice (per prompt: seed and prompt index)."})
    degenerate_eps: float = field(default=1e-9, metadata={"help": "A node is degenerate when |g| or |d| < this."})
    bootstrap_samples: int = field(default=1000, metadata={"help": "Question-bootstrap resamples for CIs."})
    ci_level: float = field(default=0.95, metadata={"help": "Confidence level of bootstrap intervals."})
    space: Literal["logits", "params"] = field(
        default="logits",
        metadata={
            "help": "Where the cosine is taken: 'logits' (the node's logit vector) or 'params' (cos(J^T g, J^T d) over "
            "the parameters chosen by param_filter; one batched backward pass per node)."
        },
    )
    param_filter: str | None = field(
        default=None,
        metadata={
            "help": "space='params': which parameters. None or 'trainable': every trainable one (requires_grad); "
            "'all'; 'lora' (peft adapters); 'lm_head' (output embedding); 'last:N' (last N transformer blocks); "
            "'re:REGEX' (names matching). From Python also a list of parameter names or a callable name -> bool."
        },
    )
    projection_dim: int | None = field(
        default=None,
        metadata={
            "help": "space='params': project parameter-space vectors to this many dimensions with a seeded sparse "
            "random projection (count sketch) instead of exact inner products."
        },
    )

    def __post_init__(self) -> None:
        self._check_types()
        self._check_sampling()
        self._check_positions()
        self._check_counts()
        self._check_param_space()

    def _check_types(self) -> None:
        """Every field against its annotation (normalised in place); ``param_filter`` also takes a list or a callable
        from Python."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "param_filter" and (callable(value) or isinstance(value, (list, tuple))):
                continue
            setattr(self, f.name, check_value("RolloutSettings", f.name, value, hints[f.name]))

    def _check_sampling(self) -> None:
        _need(self.num_rollouts >= 1, f"num_rollouts must be >= 1, got {self.num_rollouts}")
        _need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _need(self.nodes_per_window >= 1, f"nodes_per_window must be >= 1, got {self.nodes_per_window}")
        _need(self.max_nodes_per_rollout >= 1, f"max_nodes_per_rollout must be >= 1, got {self.max_nodes_per_rollout}")

    def _check_positions(self) -> None:
        if self.node_selection == "positions":
            _need(bool(self.positions),
                  "node_selection='positions' needs a non-empty positions list, e.g. positions=[0, 4, 8]")
        if self.positions is None:
            return
        _need(self.node_selection == "positions",
              f"positions={self.positions} is only used with node_selection='positions'; set it, or drop positions")
        _need(all(p >= 0 for p in self.positions),
              f"positions must be >= 0 (completion positions), got {self.positions}")
        _need(
            any(p < self.max_new_tokens for p in self.positions),
            f"positions {self.positions} are all >= max_new_tokens = {self.max_new_tokens}: a completion has at most "
            "max_new_tokens tokens, so no node could be scored; use positions below it or raise max_new_tokens",
        )

    def _check_counts(self) -> None:
        _need(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        _need(self.teacher_top_k >= 0, f"teacher_top_k must be >= 0, got {self.teacher_top_k}")
        _need(self.adaptive_initial >= 1, f"adaptive_initial must be >= 1, got {self.adaptive_initial}")
        _need(self.budget is None or self.budget >= 1, f"budget must be >= 1 or None, got {self.budget}")
        _need(self.rollouts_per_branch >= 1, f"rollouts_per_branch must be >= 1, got {self.rollouts_per_branch}")
        _need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _need(self.reward_batch_size >= 1, f"reward_batch_size must be >= 1, got {self.reward_batch_size}")
        _need(self.seed >= 0,
              f"seed must be >= 0, got {self.seed} (any non-negative int; it seeds every random choice)")
        _need(self.degenerate_eps >= 0, f"degenerate_eps must be >= 0, got {self.degenerate_eps}")
        _need(0 < self.ci_level < 1, f"ci_level must be in (0, 1), got {self.ci_level}")
        _need(self.bootstrap_samples >= 0, f"bootstrap_samples must be >= 0, got {self.bootstrap_samples}")

    def _check_param_space(self) -> None:
        _need(self.projection_dim is None or self.projection_dim >= 1,
              f"projection_dim must be a positive int or None, got {self.projection_dim!r}")
        f = self.param_filter
        if isinstance(f, str):
            ok = f in ("all", "lora", "lm_head", "trainable") or f.startswith("re:")
            if f.startswith("last:"):
                ok = f[5:].isdigit() and int(f[5:]) >= 1
            _need(
                ok,
                f"param_filter {f!r} is not understood: use 'all', 'lora', 'lm_head', 'last:N' (N >= 1), "
                "'re:REGEX', a list of parameter names or a callable name -> bool",
            )
        elif f is not None and not callable(f):
            _need(
                isinstance(f, (list, tuple)) and len(f) > 0 and all(isinstance(x, str) for x in f),
                f"param_filter must be a string, a non-empty list of parameter names or a callable, got {f!r}",
            )
        if self.space == "logits":
            _need(
                f is None and self.projection_dim is None,
                "param_filter and projection_dim apply to space='params'; set space='params' or drop them",
            )


def _need(cond: bool, msg: str) -> None:
    """Raise ``ValueError("RolloutSettings: msg")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"RolloutSettings: {msg}")


def settings_dict(settings: RolloutSettings) -> dict[str, Any]:
    """``settings`` as plain JSON values (tuples become lists, anything else JSON lacks becomes its ``str``): the one
    form written into a report's metadata, a run directory and the callback's records."""
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))
