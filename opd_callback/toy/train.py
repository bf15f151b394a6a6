"""A small, deterministic supervised training loop and a sampled-accuracy evaluator."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .task import format_prompt, reward_fn

__all__ = [
    "CPU_TRAINER_ARGS", "encode_items", "TrainRecipe", "train_lm", "sample_accuracy", "sample_completions",
    "num_threads",
]

#: ``TrainingArguments`` of a toy-sized trainer run on CPU (TRL trainers in the demo, tests and benchmarks): full
#: precision, no checkpoints, no gradient checkpointing, no progress bar, data loaded in the main process.
CPU_TRAINER_ARGS = dict(
    save_strategy="no",
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    disable_tqdm=True,
    dataloader_num_workers=0,
)


@contextlib.contextmanager
def num_threads(n: int | None):
    """Temporarily set ``torch.set_num_threads`` (no-op for None)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def encode_items(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]
) -> list[tuple[list[int], int]]:
    """Token ids of ``prompt + completion + eos`` and the prompt length, per item."""
    p_ids = tokenizer(list(prompts), add_special_tokens=False).input_ids
    c_ids = tokenizer(list(completions), add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [(p + c + [eos], len(p)) for p, c in zip(p_ids, c_ids)]


def _collate(items: Sequence[tuple[list[int], int]], pad_id: int):
    L = max(len(ids) for ids, _ in items)
    B = len(items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(items):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        attn[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = t[n_prompt:]  # loss on completion (+eos) only
    return input_ids, attn, labels


def _batches(items: Sequence[tuple[list[int], int]], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches (item indices) from a seeded permutation."""
    perm = torch.randperm(len(items), generator=gen).tolist()
    return [perm[k : k + batch_size] for k in range(0, len(perm) - batch_size + 1, batch_size)]


def _micro_batches(idx: list[int], items: Sequence[tuple[list[int], int]], ratio: float = 1.25) -> list[list[int]]:
    """Split a batch into micro-batches of similar sequence length (less padding); the
    gradient of the whole batch is accumulated over them, so batches stay mixed."""
    idx = sorted(idx, key=lambda i: len(items[i][0]))
    groups: list[list[int]] = []
    for i in idx:
        if groups and len(items[i][0]) <= ratio * len(items[groups[-1][0]][0]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass(frozen=True)
class TrainRecipe:
    """How :func:`train_lm` trains: AdamW (``weight_decay`` on matrices only, betas 0.9/0.98) for up to ``steps``
    steps of ``batch_size`` items in an order deterministic from ``seed``; learning rate: linear warmup over
    ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps`` (default ``steps``), constant
    afterwards."""

    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 50
    min_lr_ratio: float = 0.1
    seed: int = 0
    total_steps: int | None = None

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) ``step``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        total = self.total_steps or self.steps
        frac = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    def optimizer(self, model: PreTrainedModel) -> torch.optim.Optimizer:
        """A fresh AdamW over ``model``'s parameters (no weight decay on vectors: biases and norms)."""
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.98),
        )


def _batch_loss(model: PreTrainedModel, items: Sequence[tuple[list[int], int]], idx: list[int], pad_id: int) -> float:
    """Backpropagate the mean cross-entropy over the completion tokens of the batch ``idx`` (run as micro-batches of
    similar length); returns the loss."""
    n_tokens = sum(len(items[i][0]) - items[i][1] for i in idx)
    loss = 0.0
    for group in _micro_batches(idx, items):
        input_ids, attn, labels = _collate([items[i] for i in group], pad_id)
        logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
        part = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ) / n_tokens
        part.backward()
        loss += part.item()
    return loss


def train_lm(
    model: PreTrainedModel,
    items: Sequence[tuple[list[int], int]],
    pad_id: int,
    recipe: TrainRecipe,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    callback: Callable[[int, float], bool] | None = None,
    callback_every: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.optim.Optimizer, int]:
    """Train ``model`` on completion tokens as ``recipe`` says.

    ``items`` are ``(token_ids, prompt_len)`` pairs (see :func:`encode_items`); the loss covers
    ``token_ids[prompt_len:]`` only: the mean over the batch's completion tokens, each batch run as micro-batches of
    similar length (less padding). ``callback(step, ema_loss)`` is called every ``callback_every`` steps with the
    model in eval mode; returning True stops training. Pass ``optimizer`` to continue with an existing AdamW state.
    Returns the optimizer and the number of steps done. The model is left in eval mode.
    """
    optimizer = optimizer if optimizer is not None else recipe.optimizer(model)
    gen = torch.Generator().manual_seed(recipe.seed)
    batches: list[list[int]] = []
    model.train()
    ema = None
    done = 0
    for step in range(recipe.steps):
        if not batches:
            batches = _batches(items, recipe.batch_size, gen)
            batches.reverse()
        for g in optimizer.param_groups:
            g["lr"] = recipe.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss = _batch_loss(model, items, batches.pop(), pad_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        done = step + 1
        if log is not None and done % 200 == 0:
            log(f"  step {done} loss {ema:.4f}")
        if callback is not None and callback_every and done % callback_every == 0:
            model.eval()
            stop = callback(done, ema)
            model.train()
            if stop:
                break
    model.eval()
    return optimizer, done


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 256,
) -> list[str]:
    """Sample one completion per prompt (left padding, ancestral sampling, no top-k/top-p).

    Deterministic from ``seed``; the global RNG state is restored afterwards.
    """
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i : i + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                gen_kwargs = dict(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                if temperature and temperature > 0:
                    gen_kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                else:
                    gen_kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
                seqs = model.generate(**gen_kwargs)
                new = seqs[:, enc["input_ids"].shape[1] :]
                outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return outs


def sample_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    n: int | None = None,
    template: str | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    answer_key: str = "answer",
) -> float:
    """Fraction of sampled completions whose final answer is right (scored with ``reward_fn``).

    ``template`` (e.g. ``SOLUTION_TEMPLATE``) wraps each prompt in a privileged context;
    ``answer_key`` picks the field to score against (e.g. ``"misleading_answer"``).
    """
    examples = list(examples)[: n if n is not None else None]
    if not examples:
        return float("nan")
    prompts = [format_prompt(e, template) for e in examples]
    completions = sample_completions(
        model, tokenizer, prompts, temperature=temperature, seed=seed, max_new_tokens=max_new_tokens
    )
    rewards = reward_fn(prompts, completions, [e[answer_key] for e in examples])
    return sum(rewards) / len(rewards)
