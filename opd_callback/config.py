"""User-facing configuration: teachers, teacher configurations and rollout settings.

Dataclasses with ``metadata={"help": ...}`` so that ``transformers.HfArgumentParser`` can turn them into flags.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from .divergences import get_divergence

__all__ = ["ExternalTeacher", "ContextTeacher", "TeacherConfig", "RolloutSettings", "template_fields"]


def template_fields(template: str) -> list[str]:
    """Root field names that ``template.format(**example)`` needs (``{a.b}`` and ``{a[0]}`` need ``a``)."""
    names: list[str] = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise ValueError(
                f"template {template!r} has a positional field '{{{field_name}}}': name every field after an "
                "example column, e.g. '{prompt}' or '{solution}'"
            )
        root = field_name.split(".", 1)[0].split("[", 1)[0]
        if root not in names:
            names.append(root)
    return names


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
            raise TypeError(f"ContextTeacher template must be a str, got {type(self.template).__name__}")
        self.fields = template_fields(self.template)


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
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("TeacherConfig needs a non-empty string name")
        if "/" in self.name:
            raise ValueError(f"TeacherConfig name {self.name!r} contains '/': it is used in metric keys; rename it")
        if not isinstance(self.teacher, (ExternalTeacher, ContextTeacher)):
            raise TypeError(
                f"TeacherConfig {self.name!r}: teacher must be ExternalTeacher(model) or ContextTeacher(template), "
                f"got {type(self.teacher).__name__}"
            )
        if not callable(self.divergence):
            get_divergence(self.divergence)  # raises with the list of known names
        if self.beta is not None and not (0.0 <= float(self.beta) <= 1.0):
            raise ValueError(f"TeacherConfig {self.name!r}: beta must be in [0, 1], got {self.beta}")
        if not self.temperature > 0:
            raise ValueError(f"TeacherConfig {self.name!r}: temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"TeacherConfig {self.name!r}: top_k must be >= 1, got {self.top_k}")

    @property
    def divergence_name(self) -> str:
        d = self.divergence
        return d if isinstance(d, str) else getattr(d, "__name__", type(d).__name__)


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
    teacher_top_k: int = field(default=2, metadata={"help": "Each teacher's top-k added to the candidates (0 allowed)."})
    rollouts_per_branch: int = field(default=8, metadata={"help": "Continuations sampled per forced candidate."})
    adaptive: bool = field(
        default=False,
        metadata={
            "help": "Adaptive allocation (docs/method.md): a uniform first round, then the prompt's budget (pooled over "
            "its nodes) goes where it most reduces the predicted alignment error; saturated nodes stop."
        },
    )
    adaptive_initial: int = field(
        default=2,
        metadata={"help": "Adaptive: minimum first-round continuations per candidate (at least rollouts_per_branch/4)."},
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
            "help": "Sequences per forward pass when sampling/scoring. Larger is faster (a branch row holds only its own "
            "continuation's KV cache; the prefix is shared); each step materialises batch_size x vocabulary logits, "
            "so lower it if a diagnostic runs out of memory."
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
            "help": "space='params': which parameters. None or 'trainable': every trainable one (requires_grad); 'all'; 'lora' "
            "(peft adapters); 'lm_head' (output embedding); 'last:N' (last N transformer blocks); 're:REGEX' (names "
            "matching). From Python also a list of parameter names or a callable name -> bool."
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
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"RolloutSettings: {msg}")

        need(isinstance(self.num_rollouts, int) and self.num_rollouts >= 1, f"num_rollouts must be >= 1, got {self.num_rollouts}")
        need(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            f"max_new_tokens must be >= 1, got {self.max_new_tokens}",
        )
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(
            self.node_selection in ("depth_windows", "entropy", "all", "positions"),
            f"node_selection must be 'depth_windows', 'entropy', 'all' or 'positions', got {self.node_selection!r}",
        )
        need(self.nodes_per_window >= 1, f"nodes_per_window must be >= 1, got {self.nodes_per_window}")
        need(self.max_nodes_per_rollout >= 1, f"max_nodes_per_rollout must be >= 1, got {self.max_nodes_per_rollout}")
        if self.node_selection == "positions":
            need(bool(self.positions), "node_selection='positions' needs a non-empty positions list")
            need(all(int(p) >= 0 for p in self.positions or []), "positions must be >= 0")
        need(isinstance(self.top_k, int) and self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        need(self.teacher_top_k >= 0, f"teacher_top_k must be >= 0, got {self.teacher_top_k}")
        need(self.adaptive_initial >= 1, f"adaptive_initial must be >= 1, got {self.adaptive_initial}")
        need(self.budget is None or self.budget >= 1, f"budget must be >= 1 or None, got {self.budget}")
        need(self.rollouts_per_branch >= 1, f"rollouts_per_branch must be >= 1, got {self.rollouts_per_branch}")
        need(self.tail in ("impute", "renormalize"), f"tail must be 'impute' or 'renormalize', got {self.tail!r}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.reward_batch_size >= 1, f"reward_batch_size must be >= 1, got {self.reward_batch_size}")
        need(0 < self.ci_level < 1, f"ci_level must be in (0, 1), got {self.ci_level}")
        need(self.bootstrap_samples >= 0, f"bootstrap_samples must be >= 0, got {self.bootstrap_samples}")
        need(self.space in ("logits", "params"), f"space must be 'logits' or 'params', got {self.space!r}")
        need(
            self.projection_dim is None or (isinstance(self.projection_dim, int) and self.projection_dim >= 1),
            f"projection_dim must be a positive int or None, got {self.projection_dim!r}",
        )
        f = self.param_filter
        if f is not None and not callable(f):
            if isinstance(f, str):
                ok = f in ("all", "lora", "lm_head", "trainable") or f.startswith("re:")
                if f.startswith("last:"):
                    n = f[5:]
                    ok = n.isdigit() and int(n) >= 1
                need(
                    ok,
                    f"param_filter {f!r} is not understood: use 'all', 'lora', 'lm_head', 'last:N' (N >= 1), "
                    "'re:REGEX', a list of parameter names or a callable name -> bool",
                )
            else:
                need(
                    isinstance(f, (list, tuple)) and len(f) > 0 and all(isinstance(x, str) for x in f),
                    f"param_filter must be a string, a non-empty list of parameter names or a callable, got {f!r}",
                )
        if self.space == "logits":
            need(
                f is None and self.projection_dim is None,
                "param_filter and projection_dim apply to space='params'; set space='params' or drop them",
            )
