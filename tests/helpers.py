"""Tiny, self-contained test fixtures: character-level tokenizers and tiny random Qwen2 models (built by
``opd_callback.toy``'s builders), plain (unbatched, unpadded, uncached) forward passes, exact enumeration of success
probabilities, and a backend wrapper that records calls. Nothing here uses the package's rollout code, so it can serve
as independent truth."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from opd_callback.rollout import RolloutBackend
from opd_callback.toy import char_tokenizer, qwen2_config, random_model

EOS = "</s>"
PAD = "<pad>"
UNK = "<unk>"

# a chat template that only emits characters of the vocabulary: every message's content followed by "|"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}:{% endif %}"


def make_tokenizer(
    chars: Sequence[str] = ("a", "b"),
    *,
    pad_is_eos: bool = False,
    unk: bool = False,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Character-level tokenizer. Ids: EOS=0, then PAD (unless pad_is_eos), then the characters, then UNK."""
    vocab = [EOS] + ([] if pad_is_eos else [PAD]) + list(chars) + ([UNK] if unk else [])
    return char_tokenizer(vocab, eos_token=EOS, pad_token=EOS if pad_is_eos else PAD, unk_token=UNK if unk else None,
                          chat_template=chat_template)


def eos_char_tokenizer(chars: Sequence[str]) -> PreTrainedTokenizerFast:
    """Character-level tokenizer with ``<eos>`` (id 0, also PAD) then ``chars``; other characters read as EOS."""
    return char_tokenizer(["<eos>", *chars], eos_token="<eos>", unk_token="<eos>")


def tiny_qwen2(
    vocab_size: int,
    *,
    eos_id: int,
    pad_id: int,
    seed: int,
    hidden: int = 16,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 1,
    init: float = 0.02,
    max_positions: int = 128,
) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 (untied head, no BOS, intermediate size 2x hidden), deterministic from ``seed`` (which
    seeds the global RNG, as ``torch.manual_seed`` would); in eval mode."""
    config = qwen2_config(vocab_size, eos_id, pad_id, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          num_kv_heads=kv_heads, intermediate_size=2 * hidden, max_position_embeddings=max_positions,
                          initializer_range=init)
    return random_model(config, seed, fork_rng=False)


def make_model(tokenizer, *, seed: int, hidden: int = 16, init: float = 0.5, layers: int = 1) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 whose logits are far from uniform (large ``initializer_range``). Its generation_config is
    made hostile (top_k=1, top_p=0.5): the engine must ignore it."""
    model = tiny_qwen2(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=seed,
                       hidden=hidden, layers=layers, init=init)
    model.generation_config.top_k = 1
    model.generation_config.top_p = 0.5
    return model


@torch.no_grad()
def plain_next_logits(model, ids: Sequence[int]) -> torch.Tensor:
    """float64 logits of the token after ``ids``: one sequence, no padding, no cache, full forward."""
    out = model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0, -1].double()


def entropy_of(logits: torch.Tensor, tau: float) -> float:
    lp = torch.log_softmax(logits.double() / tau, -1)
    return float(-(lp.exp() * lp).sum())


class ExactTree:
    """Exact success probabilities by enumerating every continuation.

    ``S(c)`` for a completion prefix ``c`` (token ids) = E[R(decode(completion))] when the completion is continued by
    ancestral sampling from ``softmax(z/tau)`` until EOS or ``max_new_tokens`` tokens in total."""

    def __init__(self, model, tokenizer, prompt_ids, reward: Callable[[str], float], max_new_tokens: int, tau: float):
        self.model, self.tok, self.prompt = model, tokenizer, list(prompt_ids)
        self.reward, self.T, self.tau = reward, max_new_tokens, tau
        self.eos = tokenizer.eos_token_id
        self._logits: dict[tuple, torch.Tensor] = {}
        self._S: dict[tuple, float] = {}

    def logits(self, comp: Sequence[int]) -> torch.Tensor:
        key = tuple(comp)
        if key not in self._logits:
            self._logits[key] = plain_next_logits(self.model, self.prompt + list(comp))
        return self._logits[key]

    def probs(self, comp: Sequence[int]) -> torch.Tensor:
        return torch.softmax(self.logits(comp) / self.tau, -1)

    def S(self, comp: Sequence[int]) -> float:
        key = tuple(comp)
        if key in self._S:
            return self._S[key]
        if (comp and comp[-1] == self.eos) or len(comp) >= self.T:
            val = float(self.reward(self.tok.decode(list(comp), skip_special_tokens=True)))
        else:
            p = self.probs(comp)
            val = float(sum(float(p[j]) * self.S(list(comp) + [j]) for j in range(p.shape[0])))
        self._S[key] = val
        return val


class RecordingBackend(RolloutBackend):
    """Wraps a backend and records every call (how many prefixes were sampled, how many logits were asked for)."""

    def __init__(self, inner: RolloutBackend):
        self.inner = inner
        self.sample_calls: list[int] = []
        self.branch_calls: list[int] = []
        self.logits_calls: list[int] = []

    @property
    def device(self):
        return getattr(self.inner, "device", torch.device("cpu"))

    def sample(self, prefixes, max_new_tokens, generator):
        self.sample_calls.append(len(prefixes))
        return self.inner.sample(prefixes, max_new_tokens, generator)

    def sample_branches(self, bases, branches, generator):  # newer engines: shared-prefix continuations
        self.branch_calls.append(len(branches))
        inner = getattr(self.inner, "sample_branches", None)
        if inner is None:
            return super().sample_branches(bases, branches, generator)
        return inner(bases, branches, generator)

    def logits(self, sequences, positions):
        self.logits_calls.append(len(sequences))
        return self.inner.logits(sequences, positions)


def count_forwards(model) -> tuple[list[int], Callable[[], None]]:
    """Count forward calls of ``model`` with a hook; returns (counter list, remove function)."""
    counter = [0]

    def hook(*_):
        counter[0] += 1

    h = model.register_forward_hook(hook)
    return counter, h.remove


def reward_from(fn: Callable[[str], float]):
    """TRL-style reward function from a per-completion-string function (chat completions are unwrapped)."""

    def reward(prompts, completions, **kw):
        out = []
        for c in completions:
            text = c[-1]["content"] if isinstance(c, list) else c
            out.append(float(fn(text)))
        return out

    reward.__name__ = getattr(fn, "__name__", "reward")
    return reward


def bernstein_halfwidth(s: float, n: int, delta: float = 1e-6) -> float:
    """Half-width ``eps`` with P(|mean of n Bernoulli(s) - s| >= eps) <= delta (Bernstein's inequality):
    ``sqrt(2 s(1-s) L / n) + 2 L / (3 n)``, ``L = log(2/delta)``. At delta=1e-6 the first term is a 5.4-sigma z-bound;
    the second is the range correction that keeps it valid when s is near 0 or 1 (where the normal approx fails)."""
    if n <= 0:
        return math.inf
    s = min(max(s, 0.0), 1.0)  # exact enumeration can overshoot 1 by rounding
    L = math.log(2.0 / delta)
    return math.sqrt(2.0 * s * (1.0 - s) * L / n) + 2.0 * L / (3.0 * n)


# --------------------------------------------------------------------------------------------------------------------
# the CLI tests' lab (tests/test_cli.py, tests/test_hostile.py)

CHARS = list("0123456789+=> abns")
FAST = ["--num-rollouts", "2", "--max-new-tokens", "5", "--rollouts-per-branch", "2", "--no-progress",
        "--bootstrap-samples", "50"]


def _save_cli_model(path: Path, tok, seed: int) -> None:
    tiny_qwen2(len(CHARS) + 1, eos_id=0, pad_id=0, seed=seed, max_positions=64).save_pretrained(path)
    tok.save_pretrained(path)


def build_cli_lab(root: Path) -> Path:
    """The CLI tests' lab in ``root``: a student and a teacher checkpoint, data (jsonl, parquet) and a reward file."""
    tok = eos_char_tokenizer(CHARS)
    _save_cli_model(root / "student", tok, 0)
    _save_cli_model(root / "teacher", tok, 1)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (2, 2), (3, 1), (4, 4), (2, 5)]]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(root / "data.parquet")
    (root / "rw.py").write_text(
        "def reward(prompts, completions, answer, **kw):\n"
        "    return [float(a in c) for c, a in zip(completions, answer)]\n"
    )
    return root


def base_args(lab: Path, out: Path, data: str = "data.jsonl") -> list[str]:
    return [
        "run", "--student", str(lab / "student"), "--teacher", f"big={lab / 'teacher'}",
        "--context", "self+ans=ans {answer} {prompt}", "--divergence", "self+ans=jsd,beta=0.5",
        "--data", str(lab / data), "--reward", f"{lab / 'rw.py'}:reward", "--out", str(out), *FAST,
    ]
