"""On-policy distillation on GSM8K with the gradient-alignment callback watching the teacher.

A Qwen2.5 student (default ``Qwen/Qwen2.5-0.5B-Instruct``) is distilled on-policy from a larger teacher with the same
tokenizer (default ``Qwen/Qwen2.5-7B-Instruct``) by ``trl.DistillationTrainer``. Every ``--every-n-steps`` optimizer
steps :class:`opd_callback.GradientAlignmentCallback` pauses training and scores, on a fixed probe set taken from the
GSM8K *test* split, how well three teacher configurations' distillation directions line up with the ideal per-token
gradient of the student's success (reward: ``math-verify`` via ``trl.rewards.accuracy_reward``):

* ``current``        the trainer's own teacher and loss (7B teacher, TRL ``beta`` / ``temperature``);
* ``self+answer``    the student itself, shown the final answer in its prompt (self-distillation);
* ``self+solution``  the student itself, shown the worked GSM8K solution.

:class:`opd_callback.AlignmentEarlyStopping` stops the run when ``current``'s ``teacher_gain`` (the decision metric:
the success gained by adopting the teacher where it differs from the student, as a fraction of what the best token
would gain) stays below 0, or when ``self+answer`` / ``self+solution`` beats it significantly, for
``--early-stopping-patience`` consecutive diagnostics. Scalars go to wandb (``train/opd/...``), together
with per-token tables, histograms and an HTML heatmap; per-token records go to ``<output_dir>/opd_alignment/``.

Launch (one process per GPU; each process holds a bf16 copy of the teacher, ~15 GB for 7B)::

    pip install "opd-callback[trl,wandb,examples]"        # math-verify for the reward
    accelerate launch --num_processes 8 examples/gsm8k_distill.py --output-dir runs/gsm8k-opd

Settings to start from (the defaults of this script):

================================  ======================  ===============================================
knob                              default                 note
================================  ======================  ===============================================
``--max-steps``                   1000                    optimizer steps
``--per-device-train-batch-size`` 4                       x ``--gradient-accumulation-steps`` 2 x N GPUs
``--learning-rate``               1e-6                    TRL's default for DistillationTrainer
``--beta`` / ``--temperature``    1.0 / 1.0               reverse KL (TRL's default), ``current`` mirrors it
``--max-completion-length``       512                     GSM8K answers of Qwen2.5-0.5B are ~150-300 tokens
``--every-n-steps``               50                      a diagnostic every 50 steps (and after the last)
``--probe-size``                  16                      GSM8K test questions, fixed for the whole run
``--num-rollouts``                2                       base rollouts per probe question
``--max-nodes-per-rollout``       4                       scored positions per rollout (depth windows)
``--top-k`` / ``--teacher-top-k`` 4 / 1                   candidates per node: ``|C| <= 4 + 3 x 1 + 1 = 8``
``--rollouts-per-branch``         4                       continuations per candidate
================================  ======================  ===============================================

Expected cost per diagnostic with these settings (printed at start-up by
``opd_callback.core.nodes.estimate_continuations``): at most 16 x 2 x 4 x 8 x 4 = **4,096 continuations** of the
student (each at most ``max_completion_length`` tokens, on average roughly half of what is left after its node),
plus 32 base rollouts and one forward of each teacher per rollout, split evenly over the N processes. The library's
own defaults (``num_rollouts=4``, ``max_nodes_per_rollout=8``, ``teacher_top_k=2``, ``rollouts_per_branch=8``) cost
16 x 4 x 8 x 11 x 8 = 45,056 continuations for the same probe set: use them for a final, tighter reading. The actual
wall time is logged as ``opd/seconds``; pass ``--run-at-start`` to read it before the first step and adjust
``--every-n-steps`` (aim for a diagnostic costing no more than ~5-10% of the steps between two of them). On the
offline toy lab (2-core CPU, ``benchmarks/bench_overhead.py``) one diagnostic cost ~24 training steps with these
settings and ~110 with the library defaults; GPU costs were not measured (see examples/README.md).

Offline smoke test (CPU, no Hub, well under a minute): ``--tiny`` swaps in the toy lab of ``opd_callback.toy`` (a
character-level 3-digit-addition task, tiny Qwen2 models, ``toy.reward_fn``) with a few steps::

    WANDB_MODE=offline python examples/gsm8k_distill.py --tiny --output-dir /tmp/opd-tiny
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

STUDENT = "Qwen/Qwen2.5-0.5B-Instruct"
TEACHER = "Qwen/Qwen2.5-7B-Instruct"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Privileged contexts for the self-distillation alternatives. For chat prompts, ``{prompt}`` is the content of the
# last user message, and the formatted text replaces it (the chat template is applied afterwards).
ANSWER_CONTEXT = "{prompt}\n\n(For reference only: the correct final answer is {answer}.)"
SOLUTION_CONTEXT = "{prompt}\n\n(For reference only, a correct worked solution:\n{solution})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="On-policy distillation on GSM8K (trl.DistillationTrainer) with GradientAlignmentCallback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("models and data")
    g.add_argument("--student", default=STUDENT, help="student model id or path")
    g.add_argument("--teacher", default=TEACHER, help="teacher model id or path (same tokenizer as the student)")
    g.add_argument("--dataset", default="openai/gsm8k", help="dataset id (config 'main', splits train/test)")
    g.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training questions")
    g.add_argument("--output-dir", default="runs/gsm8k-opd")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tiny", action="store_true", help="offline CPU smoke test on the toy lab (opd_callback.toy)")
    g.add_argument("--cpu", action="store_true", help="train on CPU in fp32 (debugging; implied by --tiny)")

    g = p.add_argument_group("training (trl.DistillationConfig)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 1000; --tiny: 4)")
    g.add_argument("--per-device-train-batch-size", type=int, default=None, help="default 4 (--tiny: 4)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=None, help="default 2 (--tiny: 1)")
    g.add_argument("--learning-rate", type=float, default=None, help="default 1e-6 (--tiny: 1e-4)")
    g.add_argument("--beta", type=float, default=1.0, help="TRL: 0 forward KL, 1 reverse KL, else generalized JSD")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling and loss temperature")
    g.add_argument("--max-completion-length", type=int, default=None, help="default 512 (--tiny: 32)")
    g.add_argument("--logging-steps", type=int, default=None, help="default 10 (--tiny: 1)")
    g.add_argument("--save-steps", type=int, default=250, help="checkpoint every N steps (--tiny: no checkpoints)")
    g.add_argument("--report-to", default="wandb", help="'wandb', 'none', 'tensorboard', ... (comma-separated)")
    g.add_argument("--wandb-project", default="opd-gsm8k", help="sets WANDB_PROJECT unless already set")
    g.add_argument("--run-name", default=None)

    g = p.add_argument_group("diagnostic (GradientAlignmentCallback / RolloutSettings)")
    g.add_argument("--every-n-steps", type=int, default=None, help="diagnose every N steps (default 50; --tiny: 2)")
    g.add_argument("--probe-size", type=int, default=None, help="probe questions (default 16; --tiny: 4)")
    g.add_argument("--num-rollouts", type=int, default=2, help="base rollouts per probe question")
    g.add_argument("--max-nodes-per-rollout", type=int, default=None, help="default 4 (--tiny: 2)")
    g.add_argument("--top-k", type=int, default=None, help="student candidates per node (default 4; --tiny: 2)")
    g.add_argument("--teacher-top-k", type=int, default=1, help="each configuration's top-k added to the candidates")
    g.add_argument("--rollouts-per-branch", type=int, default=None,
                   help="continuations per candidate (default 4; --tiny: 2)")
    g.add_argument("--diag-max-new-tokens", type=int, default=None, help="default: --max-completion-length")
    g.add_argument("--diag-batch-size", type=int, default=None, help="sequences per forward (default 128; --tiny: 64)")
    g.add_argument("--run-at-start", action="store_true", help="also diagnose before the first step")
    g.add_argument("--no-self-contexts", action="store_true", help="score only 'current' (no self+answer/solution)")

    g = p.add_argument_group("early stopping (AlignmentEarlyStopping)")
    g.add_argument("--early-stopping-metric", default="teacher_gain", help="default: the decision metric")
    g.add_argument("--early-stopping-threshold", type=float, default=0.0)
    g.add_argument("--early-stopping-patience", type=int, default=2)
    g.add_argument("--early-stopping-min-step", type=int, default=0)
    g.add_argument("--no-early-stopping", action="store_true")
    args = p.parse_args(argv)

    # settings that differ between a real run and the offline smoke test
    real = dict(max_steps=1000, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-6,
                max_completion_length=512, logging_steps=10, every_n_steps=50, probe_size=16,
                max_nodes_per_rollout=4, top_k=4, rollouts_per_branch=4, diag_batch_size=128)
    tiny = dict(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-4,
                max_completion_length=32, logging_steps=1, every_n_steps=2, probe_size=4,
                max_nodes_per_rollout=2, top_k=2, rollouts_per_branch=2, diag_batch_size=64)
    for k, v in (tiny if args.tiny else real).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.diag_max_new_tokens is None:
        args.diag_max_new_tokens = args.max_completion_length
    return args


# ---------------------------------------------------------------------------------------------------- GSM8K
_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_row(example: dict) -> dict:
    """GSM8K row -> ``prompt`` (chat messages), ``answer`` (the number after '####'), ``solution`` (the worked
    solution without its calculator annotations ``<<48/2=24>>`` and without the '#### N' line)."""
    worked, _, final = example["answer"].rpartition("####")
    return {
        "prompt": [{"role": "user", "content": f"{example['question'].strip()}\n{INSTRUCTION}"}],
        "answer": final.strip().replace(",", ""),
        "solution": _CALC.sub("", worked).strip(),
    }


def gsm8k_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """math-verify reward with the TRL signature: 1.0 when the completion's ``\\boxed{}`` answer equals ``answer``.

    Wraps ``trl.rewards.accuracy_reward`` (which reads the gold answer from a ``solution`` column: here ``solution``
    is the worked solution used as a privileged context, so the gold is passed from ``answer``). Unparseable gold
    (``None`` in TRL) scores 0.0, since the diagnostic needs a finite reward for every completion.
    """
    from trl.import_utils import is_math_verify_available

    if not is_math_verify_available():
        raise ImportError("the GSM8K reward needs math-verify: pip install 'math-verify[antlr4_13_2]'")
    from trl.rewards import accuracy_reward

    msgs = [c if isinstance(c, list) else [{"role": "assistant", "content": str(c)}] for c in completions]
    gold = [f"${a}$" for a in answer]
    return [0.0 if r is None else float(r) for r in accuracy_reward(msgs, solution=gold)]


def load_gsm8k(args):
    from datasets import load_dataset

    ds = load_dataset(args.dataset, "main")
    train = ds["train"]
    if args.max_train_examples:
        train = train.select(range(min(args.max_train_examples, len(train))))
    train = train.map(gsm8k_row, remove_columns=train.column_names)
    test = ds["test"].shuffle(seed=args.seed).select(range(args.probe_size))
    probe = [gsm8k_row(r) for r in test]  # held out: the probe questions are never trained on
    return train, probe


# ---------------------------------------------------------------------------------------------------- toy lab
def load_tiny(args):
    """Toy-lab stand-ins: plain-string prompts ('367+485='), answer and worked solution, tiny Qwen2 models."""
    from datasets import Dataset

    from opd_callback import toy

    lab = toy.build_lab(seed=0, verbose=False)
    student = lab.load_model("student")  # a fresh copy: training it leaves the cached lab untouched
    teacher = lab.strong_teacher
    cols = ("prompt", "answer", "solution")
    train = Dataset.from_list([{k: e[k] for k in cols} for e in lab.train_examples[:256]])
    probe = [{k: e[k] for k in cols} for e in lab.probe_examples[: args.probe_size]]
    contexts = {"self+answer": toy.ANSWER_TEMPLATE, "self+solution": toy.SOLUTION_TEMPLATE}
    return student, teacher, lab.tokenizer, train, probe, toy.reward_fn, contexts


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    report_to = [s.strip() for s in args.report_to.split(",") if s.strip() and s.strip() != "none"]
    if args.tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(Path(args.output_dir).resolve()))
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_PROJECT", args.wandb_project)

    import torch
    from trl import DistillationConfig, DistillationTrainer

    import opd_callback as oc
    from opd_callback.core.nodes import estimate_continuations
    from opd_callback.training.trainers import divergence_for_beta

    if args.tiny:
        torch.set_num_threads(1)  # tiny models: one thread beats two on a shared 2-core machine
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("opd_callback").setLevel(logging.INFO)

    cpu = args.tiny or args.cpu
    t0 = time.perf_counter()
    if args.tiny:
        student, teacher, tokenizer, train, probe, reward_fn, contexts = load_tiny(args)
        model_kwargs = {}
    else:
        from trl.import_utils import is_math_verify_available

        if not is_math_verify_available():  # fail before downloading or loading any model
            raise SystemExit("the GSM8K reward needs math-verify: pip install 'math-verify[antlr4_13_2]' (or --tiny)")
        student, teacher, tokenizer = args.student, args.teacher, None  # loaded by the trainer
        train, probe = load_gsm8k(args)
        reward_fn = gsm8k_reward
        contexts = {"self+answer": ANSWER_CONTEXT, "self+solution": SOLUTION_CONTEXT}
        model_kwargs = dict(
            model_init_kwargs={"dtype": "float32"},  # fp32 master weights; bf16 autocast via bf16=True
            teacher_model_init_kwargs={"dtype": "float32" if cpu else "bfloat16"},  # frozen: bf16 halves its memory
        )

    config = DistillationConfig(
        output_dir=args.output_dir,
        run_name=args.run_name,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        beta=args.beta,
        temperature=args.temperature,
        max_completion_length=args.max_completion_length,
        logging_steps=args.logging_steps,
        save_strategy="no" if args.tiny else "steps",
        save_steps=args.save_steps,
        report_to=report_to or "none",
        seed=args.seed,
        # TRL defaults (bf16=True, gradient_checkpointing=True) suit GPUs; the smoke test runs in fp32 on CPU
        bf16=not cpu,
        use_cpu=cpu,
        gradient_checkpointing=not args.tiny,
        disable_tqdm=args.tiny,
        dataloader_num_workers=0,
        **model_kwargs,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=train, processing_class=tokenizer
    )

    # the alternatives use the same loss as the trainer (TRL beta / temperature), so only the teacher differs
    div, beta = divergence_for_beta(args.beta)
    alternatives = [] if args.no_self_contexts else [
        oc.TeacherConfig(name, oc.ContextTeacher(template), divergence=div, beta=beta, temperature=args.temperature)
        for name, template in contexts.items()
    ]
    settings = oc.RolloutSettings(
        node_selection="entropy",  # the student's forking tokens (the callback's default; docs/method.md)
        num_rollouts=args.num_rollouts,
        max_new_tokens=args.diag_max_new_tokens,
        temperature=args.temperature,
        max_nodes_per_rollout=args.max_nodes_per_rollout,
        top_k=args.top_k,
        teacher_top_k=args.teacher_top_k,
        rollouts_per_branch=args.rollouts_per_branch,
        batch_size=args.diag_batch_size,
        seed=args.seed,
    )
    stopper = None if args.no_early_stopping else oc.AlignmentEarlyStopping(
        metric=args.early_stopping_metric,
        threshold=args.early_stopping_threshold,
        patience=args.early_stopping_patience,
        min_step=args.early_stopping_min_step,
    )
    cb = oc.GradientAlignmentCallback(
        trainer,
        reward_fn=reward_fn,
        probe_dataset=probe,
        every_n_steps=args.every_n_steps,
        configs=alternatives,
        settings=settings,
        early_stopping=stopper,
        run_at_start=args.run_at_start,
    )
    trainer.add_callback(cb)

    acc = trainer.accelerator
    if acc.is_main_process:
        n_cfg = len(cb.config_names)
        bound = estimate_continuations(settings, len(probe), n_cfg)
        world = acc.num_processes
        print(
            f"[gsm8k_distill] {'toy lab (--tiny)' if args.tiny else f'{args.student} <- {args.teacher}'}: "
            f"{len(train)} training prompts, {world} process(es), set up in {time.perf_counter() - t0:.1f}s\n"
            f"[gsm8k_distill] diagnostic every {args.every_n_steps} steps on {len(probe)} probe prompts, "
            f"configurations {cb.config_names}\n"
            f"[gsm8k_distill] cost per diagnostic: at most {bound:,} continuations of <= {settings.max_new_tokens} "
            f"tokens (~{-(-bound // world):,} per process) + {len(probe) * settings.num_rollouts} base rollouts",
            flush=True,
        )

    trainer.train()

    if acc.is_main_process:
        for h in cb.history:
            m = h["metrics"]
            row = "  ".join(
                f"{c}={m[f'opd/{c}/alignment']:+.3f}" for c in cb.config_names if f"opd/{c}/alignment" in m
            ) or "undefined (every node degenerate)"
            success = m.get("opd/student/success_rate", float("nan"))
            print(
                f"[gsm8k_distill] step {h['step']:>5}: alignment {row}  success={success:.2f}"
                f"  ({m.get('opd/continuations', 0):.0f} continuations, {m.get('opd/seconds', 0):.1f}s)"
            )
        if stopper is not None and stopper.stopped_step is not None:
            print(f"[gsm8k_distill] early stopping at step {stopper.stopped_step}: {stopper.reason}")
        records = Path(args.output_dir) / "opd_alignment"
        print(f"[gsm8k_distill] records in {records}; done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
