"""The estimator: base rollouts -> nodes -> targeted rollouts -> ideal gradient -> alignment, per prompt.

:func:`diagnose` is the training-free entry point; :class:`AlignmentEngine` is the reusable object behind it (the
trainer callback holds one). Work is done one prompt at a time with a random generator seeded from
``(settings.seed, prompt_index)``, so records do not depend on how prompts are split across processes; within a
prompt every sampled row has its own random stream (:class:`~opd_callback.rollout.TransformersBackend`), so they do
not depend on ``batch_size`` or ``prefix_cache`` either.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from opd_callback.core.inputs import (
    RewardFunctionError,
    check_examples,
    check_rewards,
    last_user_index,
    no_nodes_message,
    repeated_names,
    vocab_size,
    warn_no_nodes,
)
from opd_callback.core.nodes import position_limit, select_nodes
from opd_callback.core.param_space import ParamSpaceScorer
from opd_callback.core.prompt_run import PreparedPrompt, PromptRun, random_streams
from opd_callback.core.settings import (
    ContextTeacher,
    ExternalTeacher,
    RolloutSettings,
    TeacherConfig,
    format_template,
    settings_dict,
)
from opd_callback.report import AlignmentReport
from opd_callback.rollout import RolloutBackend, TransformersBackend, eos_token_ids
from opd_callback.rollout.base import eval_mode

# select_nodes, position_limit (core.nodes), vocab_size, RewardFunctionError and no_nodes_message (core.inputs) are
# re-exported from here for the modules that import them from the engine
__all__ = ["diagnose", "AlignmentEngine", "RewardFunctionError", "no_nodes_message", "select_nodes", "vocab_size",
           "position_limit"]


logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]


def _config_list(configs: Any) -> list[TeacherConfig]:
    """``configs`` as a list (one :class:`TeacherConfig` alone is a list of one); refuses what is not a sequence."""
    if isinstance(configs, TeacherConfig):
        configs = [configs]
    if configs is None or isinstance(configs, (str, bytes, Mapping)) or not hasattr(configs, "__iter__"):
        raise TypeError(f"configs must be a list of TeacherConfig, got {type(configs).__name__}")
    return list(configs)


def _check_config_list(configs: list[TeacherConfig]) -> None:
    """At least one configuration, uniquely named, every one a :class:`TeacherConfig`."""
    if not configs:
        raise ValueError("configs is empty: pass at least one TeacherConfig to score")
    dup = repeated_names([c.name for c in configs])
    if dup:
        raise ValueError(f"TeacherConfig names must be unique; repeated: {dup}")
    for c in configs:
        if not isinstance(c, TeacherConfig):
            raise TypeError(f"configs must be TeacherConfig objects, got {type(c).__name__}")


class AlignmentEngine:
    """Holds a student, its teacher configurations and a reward function; scores prompts.

    Args:
        student: the student causal LM (its current weights are what is diagnosed).
        tokenizer: the student's tokenizer (needs an EOS token; a chat template for chat prompts).
        configs: teacher configurations scored side by side on the same rollouts and nodes.
        reward_fn: the verifier, TRL signature ``reward_fn(prompts, completions, **columns) -> list[float]``.
        settings: :class:`RolloutSettings`.
        backend: optional :class:`RolloutBackend` for the student (default: :class:`TransformersBackend`).
    """

    def __init__(
        self,
        student: torch.nn.Module,
        tokenizer: Any,
        configs: Sequence[TeacherConfig],
        reward_fn: RewardFn,
        settings: RolloutSettings | None = None,
        backend: RolloutBackend | None = None,
    ) -> None:
        if not isinstance(student, torch.nn.Module):
            raise TypeError(f"student must be a causal LM (a torch.nn.Module), got {type(student).__name__}")
        if settings is not None and not isinstance(settings, RolloutSettings):
            raise TypeError(f"settings must be a RolloutSettings, got {type(settings).__name__}; e.g. "
                            "settings=RolloutSettings(num_rollouts=4)")
        self.student = student
        self.tokenizer = tokenizer
        self.configs = _config_list(configs)
        self.reward_fn = reward_fn
        self.settings = settings or RolloutSettings()
        if not callable(reward_fn):
            raise TypeError("reward_fn must be callable: reward_fn(prompts, completions, **columns) -> list[float]")
        _check_config_list(self.configs)
        self.eos_ids = eos_token_ids(student, tokenizer)
        if not self.eos_ids:
            raise ValueError("the tokenizer has no eos_token and the model no eos_token_id: set tokenizer.eos_token")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.vocab = vocab_size(student)
        self._check_teachers()
        self.backend = backend or TransformersBackend(
            student,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            temperature=self.settings.temperature,
            batch_size=self.settings.batch_size,
        )
        self.reward_name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
        self._limits: dict[int, tuple[int | None, bool]] = {}
        self._warned_positions: set[int] = set()
        self._param_scorer: ParamSpaceScorer | None = None

    # ---------------------------------------------------------------------------------------------------- validation
    def _check_teachers(self) -> None:
        """Every teacher must share the student's vocabulary (and tokenizer, when it has one)."""
        for c in self.configs:
            t = c.teacher
            v = vocab_size(self.teacher_model(c))
            if v != self.vocab:
                raise ValueError(
                    f"TeacherConfig {c.name!r}: the teacher's vocabulary has {v} entries but the student's has "
                    f"{self.vocab}. Alignment compares distributions token by token, so the teacher must use the "
                    "student's tokenizer and vocabulary (a model of the same family, or a ContextTeacher). "
                    "Cross-tokenizer distillation (TRL's GOLD) is not supported."
                )
            tok = getattr(t, "tokenizer", None)
            if tok is not None and tok is not self.tokenizer:
                if tok.get_vocab() != self.tokenizer.get_vocab():
                    raise ValueError(
                        f"TeacherConfig {c.name!r}: the teacher's tokenizer differs from the student's (different "
                        "token-to-id maps). Use the student's tokenizer for the teacher, or a ContextTeacher."
                    )

    def teacher_model(self, c: TeacherConfig) -> torch.nn.Module:
        """Configuration ``c``'s teacher model (the student for a ContextTeacher without its own model)."""
        return c.teacher.model if c.teacher.model is not None else self.student

    def teacher_models(self) -> list[torch.nn.Module]:
        """The distinct teacher models (the student itself for live-weight context teachers)."""
        out: dict[int, torch.nn.Module] = {}
        for c in self.configs:
            m = self.teacher_model(c)
            out.setdefault(id(m), m)
        return list(out.values())

    # ---------------------------------------------------------------------------------------------------- prompts
    def _encode_text(self, text: str, raw: bool) -> list[int]:
        """Token ids of ``text`` (with the tokenizer's special tokens when ``raw``: not from a chat template)."""
        enc = self.tokenizer(text, add_special_tokens=raw)
        ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc.input_ids
        return list(ids)

    def _encode_prompt(self, prompt: Any) -> list[int]:
        """Token ids of a prompt: a string, or chat messages through the tokenizer's chat template."""
        if isinstance(prompt, str):
            return self._encode_text(prompt, raw=True)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("chat-format prompts need a tokenizer with a chat_template; set tokenizer.chat_template")
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return self._encode_text(text, raw=False)

    def teacher_prompt(self, c: TeacherConfig, example: dict, index: int | None = None) -> Any:
        """The prompt (string or messages) that configuration ``c``'s teacher sees for ``example``."""
        t = c.teacher
        if isinstance(t, ExternalTeacher):
            return example["prompt"]
        prompt = example["prompt"]
        where = f"ContextTeacher of config {c.name!r}" + ("" if index is None else f", example {index}")
        if isinstance(prompt, str):
            return format_template(t.template, example, where)
        msgs = copy.deepcopy(prompt)
        i = last_user_index(msgs)
        content = msgs[i]["content"]
        msgs[i]["content"] = format_template(t.template, {**example, "prompt": content}, where)
        return msgs

    def prepare(self, examples: Any, indices: Sequence[int] | None = None) -> list[PreparedPrompt]:
        """Validate and tokenize examples (every check that needs no model call happens here)."""
        rows = check_examples(examples)
        if indices is None:
            indices = list(range(len(rows)))
        if len(indices) != len(rows):
            raise ValueError(f"indices has {len(indices)} entries for {len(rows)} examples")
        for c in self.configs:
            if isinstance(c.teacher, ContextTeacher):
                for idx, r in zip(indices, rows):
                    missing = [f for f in c.teacher.fields if f not in r]
                    if missing:
                        raise ValueError(
                            f"ContextTeacher template of config {c.name!r} names field {missing[0]!r}, which example "
                            f"{idx} does not have (its fields: {sorted(r)}). Add that column to the data or change "
                            f"the template {c.teacher.template!r}."
                        )
        out = []
        for idx, r in zip(indices, rows):
            pids = self._encode_prompt(r["prompt"])
            if not pids:
                raise ValueError(
                    f"example {idx}: the prompt {str(r['prompt'])[:80]!r} encodes to no tokens (the tokenizer adds no "
                    "BOS); the student needs at least one prompt token to continue: give it text"
                )
            tids = [self._encode_prompt(self.teacher_prompt(c, r, idx)) for c in self.configs]
            self._check_lengths(idx, pids, tids)
            cols = {k: v for k, v in r.items() if k != "prompt"}
            out.append(PreparedPrompt(int(idx), r, r["prompt"], pids, tids, cols))
        return out

    def _check_lengths(self, idx: int, pids: list[int], tids: list[list[int]]) -> None:
        """Refuse a prompt whose rollouts would run past a model's learned position embeddings (the limit named);
        warn once where a rotary model would run past its configured length."""
        T = self.settings.max_new_tokens
        for who, model, n in [("student", self.student, len(pids))] + [
            (f"teacher of config {c.name!r}", self.teacher_model(c), len(t)) for c, t in zip(self.configs, tids)
        ]:
            limit, hard = self._limits.setdefault(id(model), position_limit(model))
            if limit is None or n + T <= limit:
                continue
            if hard:
                raise ValueError(
                    f"example {idx}: the {who}'s prompt has {n} tokens and completions up to max_new_tokens={T}, "
                    f"{n + T} positions in all, past the model's {limit} position embeddings; shorten the prompt or "
                    f"lower max_new_tokens to {max(limit - n, 0)} or less"
                    + (" (the prompt alone is too long)" if n >= limit else "")
                )
            if id(model) not in self._warned_positions:
                self._warned_positions.add(id(model))
                warnings.warn(
                    f"example {idx}: the {who}'s prompt ({n} tokens) plus max_new_tokens={T} runs past the model's "
                    f"max_position_embeddings={limit}; rotary positions beyond it were not trained",
                    stacklevel=3,
                )

    # ---------------------------------------------------------------------------------------------------- rewards
    def score(self, prep: PreparedPrompt, completions: Sequence[Sequence[int]]) -> list[float]:
        """Rewards of completions (token ids, EOS included or not) of one prompt, batched."""
        texts = self.tokenizer.batch_decode([list(c) for c in completions], skip_special_tokens=True)
        chat = not isinstance(prep.prompt, str)
        out: list[float] = []
        bs = self.settings.reward_batch_size
        for s in range(0, len(texts), bs):
            chunk = texts[s : s + bs]
            n = len(chunk)
            comps = [[{"role": "assistant", "content": t}] for t in chunk] if chat else list(chunk)
            cols = {k: [v] * n for k, v in prep.columns.items()}
            try:
                res = self.reward_fn(
                    prompts=[prep.prompt] * n,
                    completions=comps,
                    completion_ids=[list(c) for c in completions[s : s + bs]],
                    **cols,
                )
            except Exception as exc:  # noqa: BLE001 - wrapped with context and re-raised
                raise RewardFunctionError(
                    f"reward function {self.reward_name} raised {type(exc).__name__}: {exc} (called with {n} "
                    f"completions and columns {sorted(cols)}; it must accept "
                    "reward_fn(prompts, completions, **columns) and return one float per completion)"
                ) from exc
            out.extend(check_rewards(res, n, self.reward_name))
        return out

    # ---------------------------------------------------------------------------------------------------- one prompt
    def _generator(self, index: int) -> tuple[torch.Generator, np.random.Generator]:
        """The random streams of prompt ``index`` (:func:`~opd_callback.core.prompt_run.random_streams`)."""
        return random_streams(self.settings.seed, index, getattr(self.backend, "device", torch.device("cpu")))

    def run_prompt(self, prep: PreparedPrompt) -> tuple[list[dict], list[dict], dict]:
        """All work for one prompt (:class:`~opd_callback.core.prompt_run.PromptRun`). Returns ``(records, rollouts,
        stats)``."""
        return PromptRun(self, prep).execute()

    def param_scorer(self) -> ParamSpaceScorer:
        """The parameter-space scorer of ``RolloutSettings(space="params")``: built on first use, and again when the
        student changes."""
        if self._param_scorer is None or self._param_scorer.model is not self.student:
            self._param_scorer = ParamSpaceScorer(self.student, self.settings)
        return self._param_scorer

    # ---------------------------------------------------------------------------------------------------- all prompts
    def run(
        self,
        examples: Any,
        indices: Sequence[int] | None = None,
        *,
        progress: bool = False,
        meta: dict | None = None,
    ) -> AlignmentReport:
        """Score every example; returns an :class:`AlignmentReport`."""
        t0 = time.perf_counter()
        prepared = self.prepare(examples, indices)
        records: list[dict] = []
        rollouts: list[dict] = []
        totals = {"rollouts": 0, "nodes": 0, "continuations": 0, "tokens": 0}
        with _progress_bar(prepared, progress) as prompts, eval_mode(self.student, *self.teacher_models()):
            for prep in prompts:
                rec, rol, stats = self.run_prompt(prep)
                records.extend(rec)
                rollouts.extend(rol)
                for k in totals:
                    totals[k] += stats[k]
        if totals["nodes"] == 0:
            warn_no_nodes(self.settings, rollouts)
        info = {
            "settings": settings_dict(self.settings),
            "configs": [c.meta() for c in self.configs],
            "seconds": time.perf_counter() - t0,
            **totals,
            **(meta or {}),
        }
        return AlignmentReport(records, rollouts, meta=info)


@contextlib.contextmanager
def _progress_bar(prepared: list[PreparedPrompt], show: bool) -> Iterator[Iterable[PreparedPrompt]]:
    """``prepared`` itself, or wrapped in a tqdm bar over prompts (closed on exit) when ``show`` and tqdm is there."""
    if not show:
        yield prepared
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        yield prepared
        return
    bar = tqdm(prepared, desc="opd diagnose", unit="prompt")
    try:
        yield bar
    finally:
        bar.close()


def diagnose(
    student: torch.nn.Module,
    tokenizer: Any,
    examples: Any,
    *,
    reward_fn: RewardFn,
    configs: Sequence[TeacherConfig],
    settings: RolloutSettings | None = None,
    backend: RolloutBackend | str | None = None,
    progress: bool = True,
    vllm_options: Any = None,
) -> AlignmentReport:
    """Run the gradient-alignment diagnostic on a student, training-free.

    For each example, sample ``settings.num_rollouts`` completions from the student, pick nodes on each, force every
    candidate token there and continue ``rollouts_per_branch`` times, score with ``reward_fn``, estimate the ideal
    logit gradient, and compute the cosine of each configuration's distillation direction with it.

    Args:
        student: a ``transformers`` causal LM (any device). Its mode is restored afterwards; no gradient is left.
        tokenizer: the student's tokenizer.
        examples: a list of dicts (or a ``datasets.Dataset``), each with ``"prompt"`` (a string, or chat messages)
            and any other fields (passed to ``reward_fn`` as columns and to ``ContextTeacher`` templates).
        reward_fn: ``reward_fn(prompts, completions, **columns) -> list[float]`` (TRL signature); rewards in [0, 1].
        configs: the teacher configurations to score side by side.
        settings: :class:`RolloutSettings`.
        backend: the student's rollout engine: ``"transformers"`` (default), ``"vllm"`` (starts a vLLM engine on the
            student's checkpoint directory, or on its config with its current weights pushed; docs/backends.md), or a
            :class:`RolloutBackend`.
        progress: show a tqdm bar over prompts.
        vllm_options: ``backend="vllm"``: a :class:`~opd_callback.rollout.vllm_backend.VLLMOptions` or a dict of its
            fields (``tensor_parallel_size``, ``gpu_memory_utilization``, ``dtype``, ``max_model_len``, ...).

    Returns:
        :class:`AlignmentReport` with ``records`` (one row per node and configuration), ``rollouts`` and
        ``summary()``.

    Raises:
        ValueError / TypeError: bad input, before any rollout (empty examples, vocabulary mismatch, missing template
            field, bad settings, unknown divergence).
        RewardFunctionError: ``reward_fn`` raised or returned the wrong length / NaN (checked on the first base
            rollouts, before any targeted rollout).
    """
    named = backend if isinstance(backend, str) else None
    engine = AlignmentEngine(student, tokenizer, configs, reward_fn, settings, None if named else backend)
    if named is not None:  # "transformers" or "vllm" (opd_callback/rollout/vllm_backend.py)
        from opd_callback.rollout.vllm_backend import make_backend

        st = engine.settings
        engine.backend = make_backend(
            named, student, eos_ids=engine.eos_ids, pad_id=engine.pad_id, temperature=st.temperature,
            batch_size=st.batch_size, options=vllm_options,
        ) or engine.backend
    return engine.run(examples, progress=progress)
