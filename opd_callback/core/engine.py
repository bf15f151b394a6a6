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
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from opd_callback.core.alignment import NodeScore, score_node, window_index
from opd_callback.core.allocation import SATURATION_MIN_SAMPLES, NodeErrorModel, SaturatedNodeModel, greedy_allocation
from opd_callback.core.settings import (
    ContextTeacher,
    ExternalTeacher,
    RolloutSettings,
    TeacherConfig,
    format_template,
    messages_to_prompt_row,
)
from opd_callback.report import AlignmentReport
from opd_callback.rollout.base import eval_mode
from opd_callback.rollout import RolloutBackend, TransformersBackend, eos_token_ids, next_token_logits

__all__ = ["diagnose", "AlignmentEngine", "RewardFunctionError", "select_nodes", "vocab_size",
           "position_limit"]

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]


class RewardFunctionError(RuntimeError):
    """``reward_fn`` raised, or returned something other than one finite float per completion."""


# --------------------------------------------------------------------------------------------------------------------
# validation helpers


def vocab_size(model: torch.nn.Module) -> int:
    """Size of a model's output distribution (rows of its output embedding, else ``config.vocab_size``)."""
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if w is not None and w.dim() == 2:
        return int(w.shape[0])
    return int(model.config.vocab_size)


def _check_examples(examples: Any) -> list[dict]:
    if examples is None:
        raise ValueError("examples is None: pass a non-empty list of dicts (or a datasets.Dataset) with a 'prompt' field")
    try:
        rows = [dict(e) for e in examples]
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "examples must be a list of dicts or a datasets.Dataset whose rows have a 'prompt' field"
        ) from exc
    if not rows:
        raise ValueError("examples is empty: the diagnostic needs at least one prompt (a dict with a 'prompt' field)")
    for i, r in enumerate(rows):
        if "prompt" not in r and "messages" in r:
            try:
                rows[i] = r = messages_to_prompt_row(r)  # TRL's conversational format: drop the final assistant turn
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"example {i}: {exc}") from None
        if "prompt" not in r:
            raise ValueError(
                f"example {i} has no 'prompt' field (its fields: {sorted(r)}); add one (a string or chat messages), "
                "or give chat rows a 'messages' list"
            )
        p = r["prompt"]
        if hasattr(p, "tolist") and not isinstance(p, str):  # numpy arrays from parquet / datasets
            rows[i] = r = {**r, "prompt": p.tolist()}
            p = r["prompt"]
        if isinstance(p, str):
            if not p:
                raise ValueError(f"example {i}: 'prompt' is an empty string; the student needs a prompt to continue "
                                 "(drop the row or give it text)")
            continue
        if isinstance(p, (list, tuple)) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            if not all(isinstance(m["content"], str) for m in p):
                raise TypeError(f"example {i}: every chat message's 'content' must be a string")
            continue
        raise TypeError(
            f"example {i}: 'prompt' must be a string or a list of chat messages (non-empty) "
            f"[{{'role': ..., 'content': ...}}], got {type(p).__name__}"
        )
    return rows


def _last_user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise ValueError("a chat prompt for ContextTeacher needs a 'user' message to rewrite")


def _check_reward(out: Any, n: int, name: str) -> list[float]:
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
    hard = False
    for name, sub in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(sub, torch.nn.Embedding) and ("wpe" == leaf or "position" in leaf or leaf.startswith("pos")):
            hard = True
            break
    return limit, hard


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
    cap = settings.max_nodes_per_rollout
    if mode == "all":
        return list(range(length))
    if mode == "positions":
        return sorted({int(p) for p in settings.positions or [] if int(p) < length})
    if mode == "entropy":
        if entropies is None:
            raise ValueError("node_selection='entropy' needs the student's entropies")
        ent = np.asarray(entropies, dtype=np.float64)
        order = np.argsort(-ent, kind="stable")[:cap]
        return sorted(int(i) for i in order)
    # depth windows [0,1), [1,2), [2,4), [4,8), ...: window w covers [2^(w-1), 2^w) for w >= 1
    chosen: list[int] = []
    w = 0
    while len(chosen) < cap:
        lo = 0 if w == 0 else 2 ** (w - 1)
        if lo >= length:
            break
        hi = min(1 if w == 0 else 2**w, length)
        m = min(settings.nodes_per_window, hi - lo, cap - len(chosen))
        picks = rng.choice(hi - lo, size=m, replace=False) + lo
        chosen.extend(int(p) for p in sorted(picks))
        w += 1
    return chosen


# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    index: int
    example: dict
    prompt: Any
    prompt_ids: list[int]
    teacher_prompt_ids: list[list[int]]
    columns: dict = field(default_factory=dict)


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
        if isinstance(configs, TeacherConfig):
            configs = [configs]
        if configs is None or isinstance(configs, (str, bytes, Mapping)) or not hasattr(configs, "__iter__"):
            raise TypeError(f"configs must be a list of TeacherConfig, got {type(configs).__name__}")
        self.student = student
        self.tokenizer = tokenizer
        self.configs = list(configs)
        self.reward_fn = reward_fn
        self.settings = settings or RolloutSettings()
        if not callable(reward_fn):
            raise TypeError("reward_fn must be callable: reward_fn(prompts, completions, **columns) -> list[float]")
        if not self.configs:
            raise ValueError("configs is empty: pass at least one TeacherConfig to score")
        names = [c.name for c in self.configs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"TeacherConfig names must be unique; repeated: {dup}")
        for c in self.configs:
            if not isinstance(c, TeacherConfig):
                raise TypeError(f"configs must be TeacherConfig objects, got {type(c).__name__}")
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

    # ---------------------------------------------------------------------------------------------------- validation
    def _check_teachers(self) -> None:
        for c in self.configs:
            t = c.teacher
            model = t.model if t.model is not None else self.student
            v = vocab_size(model)
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

    def _model_of(self, c: TeacherConfig) -> torch.nn.Module:
        return c.teacher.model if c.teacher.model is not None else self.student

    def teacher_models(self) -> list[torch.nn.Module]:
        """The distinct teacher models (the student itself for live-weight context teachers)."""
        out: dict[int, torch.nn.Module] = {}
        for c in self.configs:
            m = self._model_of(c)
            out.setdefault(id(m), m)
        return list(out.values())

    # ---------------------------------------------------------------------------------------------------- prompts
    def _encode_text(self, text: str, raw: bool) -> list[int]:
        enc = self.tokenizer(text, add_special_tokens=raw)
        ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc.input_ids
        return list(ids)

    def _encode_prompt(self, prompt: Any) -> list[int]:
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
        i = _last_user_index(msgs)
        content = msgs[i]["content"]
        msgs[i]["content"] = format_template(t.template, {**example, "prompt": content}, where)
        return msgs

    def prepare(self, examples: Any, indices: Sequence[int] | None = None) -> list[_Prepared]:
        """Validate and tokenize examples (every check that needs no model call happens here)."""
        rows = _check_examples(examples)
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
            out.append(_Prepared(int(idx), r, r["prompt"], pids, tids, cols))
        return out

    def _check_lengths(self, idx: int, pids: list[int], tids: list[list[int]]) -> None:
        """Refuse a prompt whose rollouts would run past a model's learned position embeddings (the limit named);
        warn once where a rotary model would run past its configured length."""
        T = self.settings.max_new_tokens
        for who, model, n in [("student", self.student, len(pids))] + [
            (f"teacher of config {c.name!r}", self._model_of(c), len(t)) for c, t in zip(self.configs, tids)
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
    def score(self, prep: _Prepared, completions: Sequence[Sequence[int]]) -> list[float]:
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
            out.extend(_check_reward(res, n, self.reward_name))
        return out

    def _continue(self, seqs, branches, gen) -> list[list[int]]:
        """Sample every branch's continuation (shared-prefix KV reuse unless ``settings.prefix_cache`` is off)."""
        if not branches:
            return []
        if self.settings.prefix_cache:
            return self.backend.sample_branches(seqs, branches, gen)
        prefixes = [list(seqs[b][:L]) + [int(j)] for b, L, j, _ in branches]
        return self.backend.sample(prefixes, [m for _, _, _, m in branches], gen)

    # ---------------------------------------------------------------------------------------------------- one prompt
    def _generator(self, index: int) -> tuple[torch.Generator, np.random.Generator]:
        seed = (int(self.settings.seed) * 1_000_003 + int(index) * 7919 + 17) % (2**63 - 1)
        dev = getattr(self.backend, "device", torch.device("cpu"))
        gen = torch.Generator(device=dev if isinstance(dev, torch.device) else torch.device(dev))
        gen.manual_seed(seed)
        return gen, np.random.default_rng([int(self.settings.seed), int(index)])

    def run_prompt(self, prep: _Prepared) -> tuple[list[dict], list[dict], dict]:
        """All work for one prompt. Returns ``(records, rollouts, stats)``."""
        st = self.settings
        gen, rng = self._generator(prep.index)
        R, T = st.num_rollouts, st.max_new_tokens
        plen = len(prep.prompt_ids)
        base = self.backend.sample([prep.prompt_ids] * R, [T] * R, gen)
        base_rewards = self.score(prep, base)
        rollouts = [
            {
                "prompt_index": prep.index,
                "rollout_index": r,
                "prompt": prep.prompt if isinstance(prep.prompt, str) else repr(prep.prompt),
                "completion": self.tokenizer.decode(base[r], skip_special_tokens=True),
                "completion_ids": list(base[r]),
                "reward": base_rewards[r],
                "correct": bool(base_rewards[r] >= st.correct_threshold),
            }
            for r in range(R)
        ]
        # --- nodes
        seqs = [prep.prompt_ids + list(c) for c in base]
        nodes: list[tuple[int, int]] = []
        if st.node_selection == "entropy":
            all_pos = [[plen + t for t in range(len(c))] for c in base]
            full = self.backend.logits(seqs, all_pos)
            for r, c in enumerate(base):
                lp = torch.log_softmax(full[r].double() / st.temperature, -1)
                ent = (-(lp.exp() * lp).nan_to_num(0.0).sum(-1)).tolist()
                nodes.extend((r, t) for t in select_nodes(len(c), st, rng, ent))
            del full
        else:
            for r, c in enumerate(base):
                nodes.extend((r, t) for t in select_nodes(len(c), st, rng))
        stats = {"rollouts": R, "nodes": len(nodes), "continuations": 0, "tokens": sum(len(c) for c in base)}
        if not nodes:
            return [], rollouts, stats
        by_r: dict[int, list[int]] = {}
        for r, t in nodes:
            by_r.setdefault(r, []).append(t)
        rs = sorted(by_r)
        s_logits = self.backend.logits([seqs[r] for r in rs], [[plen + t for t in by_r[r]] for r in rs])
        z_of: dict[tuple[int, int], torch.Tensor] = {}
        for r, zz in zip(rs, s_logits):
            for t, row in zip(by_r[r], zz):
                z_of[(r, t)] = row
        # --- teacher logits (shared between configs with the same model and prompt)
        zt_of: list[dict[tuple[int, int], torch.Tensor]] = []
        cache: dict[tuple[int, tuple[int, ...]], dict] = {}
        for ci, c in enumerate(self.configs):
            model = self._model_of(c)
            tp = prep.teacher_prompt_ids[ci]
            key = (id(model), tuple(tp))
            if key not in cache:
                tseqs = [tp + list(base[r]) for r in rs]
                tpos = [[len(tp) + t for t in by_r[r]] for r in rs]
                tl = next_token_logits(model, tseqs, tpos, pad_id=self.pad_id, batch_size=st.batch_size)
                d = {}
                for r, zz in zip(rs, tl):
                    for t, row in zip(by_r[r], zz):
                        d[(r, t)] = row
                cache[key] = d
            zt_of.append(cache[key])
        # --- candidates
        V = self.vocab
        eos = set(self.eos_ids)
        cands: dict[tuple[int, int], list[int]] = {}
        live: list[tuple[tuple[int, int], int]] = []  # (node, slot) of candidates that need continuations
        terminal: list[tuple[tuple[int, int], int]] = []  # EOS forced or completion limit reached: exact reward
        for node in nodes:
            r, t = node
            y_t = int(base[r][t])
            ids: list[int] = []
            for j in torch.topk(z_of[node], k=min(st.top_k, V)).indices.tolist():
                if j not in ids:
                    ids.append(int(j))
            if st.teacher_top_k > 0:
                for ci in range(len(self.configs)):
                    for j in torch.topk(zt_of[ci][node], k=min(st.teacher_top_k, V)).indices.tolist():
                        if j not in ids:
                            ids.append(int(j))
            if y_t not in ids:
                ids.append(y_t)
            cands[node] = ids
            for slot, j in enumerate(ids):
                (terminal if (j in eos or t + 1 >= T) else live).append((node, slot))
        sums: dict[tuple[tuple[int, int], int], float] = {}
        counts: dict[tuple[tuple[int, int], int], int] = {}
        lo: dict[tuple[int, int], float] = {}  # per node: smallest and largest reward seen (saturation)
        hi: dict[tuple[int, int], float] = {}

        def add(key, rew: float) -> None:
            sums[key] = sums.get(key, 0.0) + rew
            counts[key] = counts.get(key, 0) + 1
            lo[key[0]] = min(lo.get(key[0], rew), rew)
            hi[key[0]] = max(hi.get(key[0], rew), rew)

        def run(requests: list[tuple[tuple[tuple[int, int], int], int]]) -> None:
            """Sample ``n`` continuations for each (node, slot) and score them in one batched pass."""
            owners = [key for key, n in requests for _ in range(n)]
            branches = [(k[0][0], plen + k[0][1], cands[k[0]][k[1]], T - (k[0][1] + 1)) for k in owners]
            conts = self._continue(seqs, branches, gen)
            stats["continuations"] += len(conts)
            stats["tokens"] += sum(len(c) for c in conts)
            full = [list(base[k[0][0]][: k[0][1]]) + [cands[k[0]][k[1]]] + list(c) for k, c in zip(owners, conts)]
            for k, rew in zip(owners, self.score(prep, full) if full else []):
                add(k, rew)

        # exact rewards of terminal candidates, and the base rollout as a free sample of its own token
        if terminal:
            done = [list(base[n[0]][: n[1]]) + [cands[n][s]] for n, s in terminal]
            for k, rew in zip(terminal, self.score(prep, done)):
                add(k, rew)
        if st.reuse_base_rollout:
            for node in nodes:
                r, t = node
                slot = cands[node].index(int(base[r][t]))
                if (node, slot) in counts:
                    continue  # terminal: already exact
                add((node, slot), base_rewards[r])
        def success(node: tuple[int, int]) -> list[float]:
            """Mean reward per candidate so far (0 where none was sampled)."""
            return [sums.get((node, s), 0.0) / max(counts.get((node, s), 0), 1) for s in range(len(cands[node]))]

        def node_score(node: tuple[int, int]) -> NodeScore:
            r, t = node
            return score_node(
                z_of[node],
                [zt_of[ci][node] for ci in range(len(self.configs))],
                [c.divergence for c in self.configs],
                torch.as_tensor(cands[node], dtype=torch.long),
                torch.as_tensor(success(node), dtype=torch.float64),
                int(base[r][t]),
                temperature=st.temperature,
                teacher_temperatures=[c.temperature for c in self.configs],
                betas=[c.beta for c in self.configs],
                top_ks=[c.top_k for c in self.configs],
                tail=st.tail,
                eps=st.degenerate_eps,
            )

        if not st.adaptive:
            run([(key, st.rollouts_per_branch) for key in live])
        else:
            self._adaptive_rounds(live, cands, z_of, sums, counts, lo, hi, node_score, run, rng)
        # --- per-node scores
        records: list[dict] = []
        for node in nodes:
            r, t = node
            ids = cands[node]
            n_j = [counts.get((node, s), 0) for s in range(len(ids))]
            s_j = success(node)
            cand_t = torch.as_tensor(ids, dtype=torch.long)
            ns = node_score(node)
            # ---- issue 4: parameter-space alignment (opd_callback/core/param_space.py) ------------------------------ begin
            if st.space == "params":
                from opd_callback.core.param_space import rescore

                ns = rescore(self, ns, prep.prompt_ids + list(base[r]), plen + t)
            # ---- issue 4 ------------------------------------------------------------------------------------------ end
            p_c = torch.softmax(z_of[node].double() / st.temperature, -1)[cand_t].tolist()
            y_t = int(base[r][t])
            common = {
                "prompt_index": prep.index,
                "rollout_index": r,
                "position": t,
                "token_id": y_t,
                "token": self.tokenizer.decode([y_t]),
                "rollout_reward": base_rewards[r],
                "rollout_correct": bool(base_rewards[r] >= st.correct_threshold),
                "window": window_index(t),
                "student_entropy": ns.student_entropy,
                "covered_mass": ns.covered_mass,
                "value": ns.value,
                "candidate_ids": list(ids),
                "candidate_probs": p_c,
                "candidate_success": s_j,
                "candidate_rollouts": n_j,
            }
            for c, cs in zip(self.configs, ns.configs):
                records.append(
                    {
                        **common,
                        "config": c.name,
                        "alignment": cs.alignment,
                        "inner": cs.inner,
                        "teacher_advantage": cs.teacher_advantage,
                        "kl_reverse": cs.kl_reverse,
                        "kl_forward": cs.kl_forward,
                        "js": cs.js,
                        "teacher_entropy": cs.teacher_entropy,
                        "degenerate": cs.degenerate,
                        "g_norm": cs.g_norm,  # issue 4: EXTRA_RECORD_COLUMNS
                        "d_norm": cs.d_norm,
                        **({"alignment_logits": cs.alignment_logits} if st.space == "params" else {}),
                    }
                )
        return records, rollouts, stats

    def _adaptive_rounds(self, live, cands, z_of, sums, counts, lo, hi, node_score, run, rng) -> None:
        """Adaptive allocation of one prompt's continuation budget (``RolloutSettings(adaptive=True)``).

        Round 1 gives every live candidate ``max(adaptive_initial, rollouts_per_branch / 4)`` continuations. The rest
        of the prompt's budget (pooled over its nodes) is spent in two more rounds, half and then the rest, by
        :func:`~opd_callback.core.allocation.greedy_allocation`, which minimises the sum over nodes of the predicted
        alignment error (``allocation.py`` explains the error models). A node whose outcomes so far are all equal is
        *saturated*: it stops once each of its candidates has ``max(SATURATION_MIN_SAMPLES, rollouts_per_branch / 2)``
        continuations (8 at least, half the uniform share); before that it competes for continuations by its chance
        of breaking the tie, up to its nominal budget. Any other node gets at most 4x its nominal budget.
        """
        st = self.settings
        n0 = min(max(st.adaptive_initial, math.ceil(st.rollouts_per_branch / 4)), st.rollouts_per_branch)
        run([(key, n0) for key in live])
        by_node: dict[tuple[int, int], list[int]] = {}
        for node, slot in live:
            by_node.setdefault(node, []).append(slot)
        nominal = {node: st.budget if st.budget is not None else st.rollouts_per_branch * len(sl) for node, sl in by_node.items()}
        remaining = sum(nominal.values()) - n0 * len(live)
        eps = rng.standard_normal((256, max(len(c) for c in cands.values())))
        # a saturated node stops once each candidate has this many continuations (at least half the uniform share:
        # success rates around 0.1 are common, and 8 failures in a row are then not rare)
        stop_at = max(SATURATION_MIN_SAMPLES, math.ceil(st.rollouts_per_branch / 2))
        for rnd in range(2):
            spend = remaining // 2 if rnd == 0 else remaining
            nodes, models, rooms = [], [], []
            for node, slots in by_node.items():
                ids = cands[node]
                n = np.array([counts.get((node, s), 0) for s in range(len(ids))], dtype=np.float64)
                spent = int(sum(n[s] for s in slots))
                if lo.get(node) == hi.get(node):  # saturated: every outcome so far is the same
                    if min(n[s] for s in slots) >= stop_at or nominal[node] - spent <= 0:
                        continue  # enough evidence (or its nominal share is spent): stop
                    sigma = np.zeros(len(ids))
                    sigma[slots] = 1.0
                    models.append(SaturatedNodeModel(sigma=sigma, n=n))
                    nodes.append(node)
                    rooms.append(nominal[node] - spent)
                    continue
                room = 4 * nominal[node] - spent
                if room <= 0:
                    continue
                ns = node_score(node)
                cand_t = torch.as_tensor(ids, dtype=torch.long)
                p = torch.softmax(z_of[node].double() / st.temperature, -1)[cand_t]
                q = (p / p.sum()) if st.tail == "renormalize" else p
                d = torch.stack([c.d.to(torch.float64).reshape(-1) for c in ns.configs])
                s_sum = np.array([sums.get((node, s), 0.0) for s in range(len(ids))])
                m = (s_sum + 0.5) / (n + 1.0)
                sigma = np.zeros(len(ids))
                sigma[slots] = np.sqrt(m[slots] * (1.0 - m[slots]))
                models.append(NodeErrorModel(
                    q=q.numpy(),
                    d=(d if st.tail == "renormalize" else d[:, cand_t]).numpy(),
                    d_norm=d.norm(dim=1).numpy(),
                    s_hat=s_sum / np.maximum(n, 1.0),
                    sigma=sigma,
                    n=n,
                    eps=eps,
                ))
                nodes.append(node)
                rooms.append(room)
            if spend <= 0 or not models:
                break
            extra = greedy_allocation(spend, models, rooms)
            requests = [((node, sl), int(x)) for node, xs in zip(nodes, extra) for sl, x in enumerate(xs) if x > 0]
            run(requests)
            remaining -= sum(x for _, x in requests)

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
        it: Iterable[_Prepared] = prepared
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(prepared, desc="opd diagnose", unit="prompt")
                it = bar
            except ImportError:  # pragma: no cover
                pass
        try:
            with eval_mode(self.student, *self.teacher_models()):
                for prep in it:
                    rec, rol, stats = self.run_prompt(prep)
                    records.extend(rec)
                    rollouts.extend(rol)
                    for k in totals:
                        totals[k] += stats[k]
        finally:
            if bar is not None:
                bar.close()
        if totals["nodes"] == 0:
            warn_no_nodes(self.settings, rollouts)
        info = {
            "settings": _settings_dict(self.settings),
            "configs": [
                {
                    "name": c.name,
                    "teacher": c.teacher.kind,
                    "template": getattr(c.teacher, "template", None),
                    "divergence": c.divergence_name,
                    "beta": c.beta,
                    "temperature": c.temperature,
                    "top_k": c.top_k,
                }
                for c in self.configs
            ],
            "seconds": time.perf_counter() - t0,
            **totals,
            **(meta or {}),
        }
        return AlignmentReport(records, rollouts, meta=info)


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
    warnings.warn(no_nodes_message(settings, rollouts) + "; the report's alignment statistics are undefined (NaN)",
                  stacklevel=3)


def _settings_dict(s: RolloutSettings) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(s).items()}


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
        vllm_options: ``backend="vllm"``: a :class:`~opd_callback.rollout.vllm_backend.VLLMOptions` or a dict of its fields
            (``tensor_parallel_size``, ``gpu_memory_utilization``, ``dtype``, ``max_model_len``, ...).

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
    if named is not None:  # issue 9: "transformers" / "vllm" (opd_callback/rollout/vllm_backend.py)
        from opd_callback.rollout.vllm_backend import make_backend

        st = engine.settings
        engine.backend = make_backend(
            named, student, eos_ids=engine.eos_ids, pad_id=engine.pad_id, temperature=st.temperature,
            batch_size=st.batch_size, options=vllm_options,
        ) or engine.backend
    return engine.run(examples, progress=progress)
