"""Tiny builders shared by the callback tests, and the ``torchrun`` worker of the 2-process test.

Imported by ``tests/test_callback*.py`` (``from _dist_worker import ...``) and run as a script by
``tests/test_callback_distributed.py``::

    torchrun --nproc_per_node 2 tests/_dist_worker.py <output_dir> <model_dir>

Everything is built in code (no Hub): a character-level tokenizer over digits, ``+``, ``=`` and a few letters; a
1-layer Qwen2 with hidden size 16; a dataset of one-digit additions with ``answer``/``solution`` columns.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch

EOS = "<eos>"
UNK = "<unk>"
CHARS = list("0123456789+=ab<>/ \n")  # '<', '>', '/' let a completion contain "<script>"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ message['content'] + '\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '=' }}{%- endif -%}"
)


def build_tokenizer():
    from opd_callback.toy import char_tokenizer

    return char_tokenizer([EOS, UNK] + CHARS, eos_token=EOS, unk_token=UNK, special_tokens=[EOS, UNK],
                          chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def build_model(tok, seed: int = 0, hidden: int = 16):
    from helpers import tiny_qwen2

    model = tiny_qwen2(len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=seed, hidden=hidden,
                       max_positions=64).train()  # as built: in training mode, default initializer range
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def build_dataset(n: int = 8, chat: bool = False, privileged: bool = False):
    """One-digit additions ``"a+b="`` with ``answer`` and ``solution`` columns (and ``privileged_context``)."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        a, b = (3 * i + 1) % 5, (7 * i + 2) % 5
        prompt = f"{a}+{b}="
        row = {
            "prompt": [{"role": "user", "content": prompt}] if chat else prompt,
            "answer": str(a + b),
            "solution": f"{a}+{b}={a + b}",
        }
        if privileged:
            row["privileged_context"] = f"{a + b}"
        rows.append(row)
    return Dataset.from_list(rows)


def addition_rows(wrong: bool = False) -> list[dict]:
    """All 25 one-digit additions a+b (a, b < 5); ``wrong=True`` gives (a+b+3) % 10 as the answer."""
    rows = []
    for a in range(5):
        for b in range(5):
            c = (a + b + 3) % 10 if wrong else a + b
            rows.append({"prompt": f"{a}+{b}=", "answer": str(c), "solution": f"{a}+{b}={c}"})
    return rows


def pretrain(model, tok, rows, steps: int, lr: float = 1e-2):
    """Plain supervised training on ``prompt + answer + EOS`` (loss on the answer and EOS), full batch."""
    seqs = [tok(r["prompt"])["input_ids"] + tok(r["answer"])["input_ids"] + [tok.eos_token_id] for r in rows]
    plen = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    labels = ids.clone()
    for i, s in enumerate(seqs):
        labels[i, : plen[i]] = -100
        labels[i, len(s) :] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model


def accuracy_reward(prompts, completions, answer, **kwargs):
    """TRL reward signature: 1.0 when the completion starts with the answer."""
    out = []
    for c, a in zip(completions, answer):
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(1.0 if text.strip().startswith(str(a)) else 0.0)
    return out


def tiny_settings(**kw):
    import opd_callback as oc

    base = dict(
        num_rollouts=2,
        max_new_tokens=4,
        rollouts_per_branch=2,
        top_k=2,
        teacher_top_k=1,
        max_nodes_per_rollout=2,
        bootstrap_samples=50,
        seed=0,
    )
    base.update(kw)
    return oc.RolloutSettings(**base)


def distillation_config(output_dir: str, **kw):
    from trl import DistillationConfig

    from opd_callback.toy import CPU_TRAINER_ARGS

    base = dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=2,
        max_completion_length=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        seed=0,
        **CPU_TRAINER_ARGS,
    )
    base.update(kw)
    return DistillationConfig(**base)


def run_worker(out_dir: str, model_dir: str) -> dict:
    """A DistillationTrainer run with the callback (learning rate 0, so every diagnostic sees the same weights in a 1-
    and a 2-process run); early stopping with threshold 1.01 fires at the second diagnostic (step 1) on every rank."""
    from transformers import AutoModelForCausalLM
    from trl import DistillationTrainer

    import opd_callback as oc

    tok = build_tokenizer()
    student = AutoModelForCausalLM.from_pretrained(os.path.join(model_dir, "student"))
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(model_dir, "teacher"))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=distillation_config(out_dir, per_device_train_batch_size=1, max_steps=3, learning_rate=0.0),
        train_dataset=build_dataset(8),
        processing_class=tok,
    )
    cb = oc.GradientAlignmentCallback(
        trainer,
        reward_fn=accuracy_reward,
        probe_dataset=build_dataset(5),  # odd size: ranks get 3 and 2 prompts
        every_n_steps=1,
        run_at_start=True,
        configs=[oc.TeacherConfig("self+solution", oc.ContextTeacher("{solution}\n{prompt}"))],
        settings=tiny_settings(),
        early_stopping=oc.AlignmentEarlyStopping(metric="alignment", threshold=1.01, patience=2, min_questions=1),
    )
    trainer.add_callback(cb)
    trainer.train()
    return {
        "world": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "global_step": trainer.state.global_step,
        "stopped_step": cb.early_stopping.stopped_step,
        "bad_count": cb.early_stopping.bad_count,
        "errors": cb.errors,
        "opd_steps": [r["step"] for r in trainer.state.log_history if "opd/errors" in r],
    }


def main() -> None:
    import json

    out_dir, model_dir = sys.argv[1], sys.argv[2]
    info = run_worker(out_dir, model_dir)
    with open(os.path.join(out_dir, f"rank{info['rank']}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
