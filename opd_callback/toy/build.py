"""Training the toy lab's models: recipes, the student's two phases, the teachers, and the worker processes that
train them side by side; :func:`train_all` writes a lab folder (models and ``lab.json``)."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from transformers import Qwen2ForCausalLM

from .models import tiny_random_model
from .spec import DIGITS, LAB_VERSION, MODEL_NAMES, N_PROBE, N_TRAIN, N_VAL, quiet_hf, split_examples
from .task import ANSWER_TEMPLATE, MISLEADING_TEMPLATE, SOLUTION_TEMPLATE, format_prompt, solve
from .tokenizer import build_tokenizer
from .train import TrainRecipe, encode_items, num_threads, sample_accuracy, train_lm

__all__ = ["RECIPES", "WORKER_JOBS", "train_and_save", "train_all"]

# Model sizes and training recipes. Step counts are upper bounds: training stops early once
# the sampled accuracy on the validation set crosses a threshold (checked every few steps).
RECIPES: dict[str, dict[str, Any]] = {
    # Weak student, two phases from scratch:
    #  1. "copy" phase: only prompts with a privileged context (answer / solution prepended),
    #     until it reliably copies the solution from its context;
    #  2. "mix" phase: add plain prompts, and stop once plain accuracy reaches the target band.
    # Without phase 1 the plain and the in-context skills grow together, and the student is
    # either too good on plain prompts or too bad with context.
    "student": dict(
        hidden_size=64, num_layers=2, lr=3e-3, batch_size=64,
        copy=dict(mix={"answer": 0.0, "solution": 1.0}, max_steps=700, total_steps=700,
                  check_from=150, check_every=25, stop_solution=0.9),
        mix=dict(mix={"answer": 0.15, "solution": 0.3}, max_steps=800, total_steps=800, warmup=10,
                 check_from=150, check_every=20, stop_plain=0.45, stop_plain_hard=0.62, stop_solution=0.9),
    ),
    "strong_teacher": dict(
        hidden_size=64, num_layers=2, lr=3e-3, batch_size=64, total_steps=900, max_steps=1400,
        check_from=450, check_every=50, stop_acc=0.97,
    ),
    # The wrong teacher is trained from scratch on the corrupted (no-carry) rule, like the strong teacher on the
    # right one: a fine-tuned copy of the strong teacher agrees with it so closely outside carry tokens that its
    # mean alignment is indistinguishable from the strong teacher's (measured: 0.73 vs 0.70 on the demo).
    "wrong_teacher": dict(
        hidden_size=64, num_layers=2, lr=3e-3, batch_size=64, total_steps=800, max_steps=1200,
        check_from=350, check_every=50, stop_acc=0.95,
    ),
    # The *hard* wrong teacher: the strong teacher fine-tuned on the no-carry rule. It agrees with the strong teacher
    # everywhere except at the tokens that depend on a carry -- the tokens that decide the answer. A mean of per-token
    # cosines weighs it like the strong teacher; the decision metric must not.
    "hard_wrong_teacher": dict(
        init_from="strong_teacher", hidden_size=64, num_layers=2, lr=1e-3, batch_size=64, total_steps=300,
        max_steps=400, warmup=10, check_from=50, check_every=25, stop_acc=0.9,
    ),
}
# Which models each worker process trains (two processes on two cores, about equal work; a model with ``init_from``
# is trained in the same process as its initialisation).
WORKER_JOBS = (("student", "wrong_teacher"), ("strong_teacher", "hard_wrong_teacher"))


def _with_wrong_rule(examples: Sequence[dict]) -> list[dict]:
    """Copies of ``examples`` whose ``solution``/``answer`` follow the no-carry rule."""
    out = []
    for e in examples:
        sol = solve(e["a"], e["b"], carries=False)
        out.append({**e, "solution": sol, "answer": sol.rsplit(">", 1)[1]})
    return out


def _recipe(model_recipe: dict, phase: dict, seed: int) -> TrainRecipe:
    """The :class:`TrainRecipe` of one training phase of a model (``phase`` is the model's recipe itself for a
    one-phase model): steps and schedule from ``phase``, batch size and learning rate from ``model_recipe``."""
    return TrainRecipe(steps=phase["max_steps"], total_steps=phase["total_steps"], warmup=phase.get("warmup", 50),
                       batch_size=model_recipe["batch_size"], lr=model_recipe["lr"], seed=seed)


def _mixture_items(tok, examples: Sequence[dict], mix: dict[str, float], seed: str):
    """Items whose prompt is plain or has the answer/solution context, drawn per example."""
    rng = random.Random(seed)
    fa, fs = mix.get("answer", 0.0), mix.get("solution", 0.0)
    prompts = []
    for e in examples:
        u = rng.random()
        tpl = ANSWER_TEMPLATE if u < fa else SOLUTION_TEMPLATE if u < fa + fs else None
        prompts.append(format_prompt(e, tpl))
    return encode_items(tok, prompts, [e["solution"] for e in examples])


def _train_student(tok, train, val, seed: int, log) -> tuple[Qwen2ForCausalLM, dict]:
    r = RECIPES["student"]
    model_seed = seed * 1000 + 1
    model = tiny_random_model(tok, model_seed, hidden_size=r["hidden_size"], num_layers=r["num_layers"])
    info: dict[str, Any] = {"checks": []}

    def note(entry):
        info["checks"].append(entry)
        if log:
            log(f"  [student/{entry['phase']}] step {entry['step']} loss {entry['loss']:.4f} "
                + " ".join(f"{k}={v:.3f}" for k, v in entry.items() if k.startswith("acc")))

    c = r["copy"]

    def check_copy(step, loss):
        if step < c["check_from"]:
            return False
        sol = sample_accuracy(model, tok, val, template=SOLUTION_TEMPLATE, seed=seed + step)
        note({"phase": "copy", "step": step, "loss": round(loss, 5), "acc+solution": sol})
        return sol >= c["stop_solution"]

    opt, n_copy = train_lm(
        model, _mixture_items(tok, train, c["mix"], f"opd-toy-mix:copy:{seed}"), tok.pad_token_id,
        _recipe(r, c, model_seed), callback=check_copy, callback_every=c["check_every"],
    )
    m = r["mix"]

    last = {"acc": 0.0}

    def check_mix(step, loss):
        if step < m["check_from"] or (last["acc"] < 0.15 and step % (2 * m["check_every"])):
            return False  # check half as often while far from the target
        acc = last["acc"] = sample_accuracy(model, tok, val, seed=seed + 100000 + step)
        entry = {"phase": "mix", "step": step, "loss": round(loss, 5), "acc": acc}
        stop = False
        if acc >= m["stop_plain"]:
            entry["acc+solution"] = sol = sample_accuracy(model, tok, val, template=SOLUTION_TEMPLATE, seed=seed + step)
            stop = sol >= m["stop_solution"] or acc >= m["stop_plain_hard"]
        note(entry)
        return stop

    _, n_mix = train_lm(
        model, _mixture_items(tok, train, m["mix"], f"opd-toy-mix:mix:{seed}"), tok.pad_token_id,
        _recipe(r, m, model_seed + 500), optimizer=opt, callback=check_mix, callback_every=m["check_every"],
    )
    info["steps"] = {"copy": n_copy, "mix": n_mix}
    return model, info


def _train_teacher(name: str, tok, train, val, seed: int, log, init=None) -> tuple[Qwen2ForCausalLM, dict]:
    r = RECIPES[name]
    model_seed = seed * 1000 + MODEL_NAMES.index(name) + 1
    if init is not None:
        model = copy.deepcopy(init)
    else:
        model = tiny_random_model(tok, model_seed, hidden_size=r["hidden_size"], num_layers=r["num_layers"])
    info: dict[str, Any] = {"checks": []}

    def check(step, loss):
        if step < r["check_from"]:
            return False
        acc = sample_accuracy(model, tok, val, seed=seed + step)
        info["checks"].append({"step": step, "loss": round(loss, 5), "acc": acc})
        if log:
            log(f"  [{name}] step {step} loss {loss:.4f} acc={acc:.3f}")
        return acc >= r["stop_acc"]

    _, info["steps"] = train_lm(
        model, encode_items(tok, [e["prompt"] for e in train], [e["solution"] for e in train]), tok.pad_token_id,
        _recipe(r, r, model_seed), callback=check, callback_every=r["check_every"],
    )
    return model, info


def train_and_save(names: Sequence[str], out_dir: str, seed: int, verbose: bool, threads: int = 1) -> dict[str, Any]:
    """Train ``names``, measure their probe accuracies and save them under ``out_dir``.

    Runs with ``threads`` intra-op threads (default one, so results do not depend on the machine's core count; used
    both in worker processes and, as a fallback, in the calling process).
    """
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if verbose else None
    with num_threads(threads), quiet_hf():
        tok = build_tokenizer()
        train, val, probe = split_examples(seed)
        acc_seed = seed + 12345
        result: dict[str, Any] = {"accuracy": {}, "models": {}}
        trained: dict[str, Qwen2ForCausalLM] = {}
        for name in names:
            t0 = time.perf_counter()
            if log:
                log(f"[opd_callback.toy] training {name} ...")
            if name == "student":
                model, info = _train_student(tok, train, val, seed, log)
            elif name == "strong_teacher":
                model, info = _train_teacher(name, tok, train, val, seed, log)
            else:
                init = RECIPES[name].get("init_from")
                if init is not None and init not in trained:
                    trained[init] = Qwen2ForCausalLM.from_pretrained(Path(out_dir) / init)
                model, info = _train_teacher(
                    name, tok, _with_wrong_rule(train), _with_wrong_rule(val), seed, log,
                    init=trained[init] if init is not None else None,
                )
            trained[name] = model
            info["train_seconds"] = round(time.perf_counter() - t0, 2)
            info["params"] = sum(p.numel() for p in model.parameters())
            acc = result["accuracy"]
            acc[name] = sample_accuracy(model, tok, probe, seed=acc_seed)
            if name == "student":
                acc["student+answer"] = sample_accuracy(model, tok, probe, template=ANSWER_TEMPLATE, seed=acc_seed)
                acc["student+solution"] = sample_accuracy(model, tok, probe, template=SOLUTION_TEMPLATE, seed=acc_seed)
                # how often the student follows a misleading answer given in its context
                acc["student+misleading->misleading"] = sample_accuracy(
                    model, tok, probe, template=MISLEADING_TEMPLATE, seed=acc_seed, answer_key="misleading_answer"
                )
            if name in ("wrong_teacher", "hard_wrong_teacher"):
                # the wrong teachers' accuracy under their own (no-carry) rule
                acc[f"{name}@no_carry_rule"] = sample_accuracy(model, tok, _with_wrong_rule(probe), seed=acc_seed)
            info["seconds"] = round(time.perf_counter() - t0, 2)
            model.save_pretrained(Path(out_dir) / name)
            tok.save_pretrained(Path(out_dir) / name)
            result["models"][name] = info
            if log:
                log(f"[opd_callback.toy] {name} done in {info['seconds']:.1f}s: acc={acc[name]:.3f}")
    return result


def _num_workers() -> int:
    try:
        return max(1, int(os.environ.get("OPD_TOY_WORKERS", "2")))
    except ValueError:
        return 2


def _run_workers(out_dir: Path, seed: int, verbose: bool, threads: int = 1) -> list[dict] | None:
    """Run ``train_and_save`` for each of ``WORKER_JOBS`` in fresh Python processes
    (``python -m opd_callback.toy._worker``; a fresh interpreter, so nothing of the caller's
    ``__main__`` is re-run). Returns None if the processes cannot be started."""
    pkg_root = str(Path(__file__).resolve().parents[2])  # the folder containing opd_callback/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env["OMP_NUM_THREADS"] = str(threads)
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i, job in enumerate(WORKER_JOBS):
            result_path = out_dir / f".worker{i}.json"
            args = json.dumps({"names": list(job), "out_dir": str(out_dir), "seed": seed, "verbose": verbose,
                               "threads": threads, "result_path": str(result_path)})
            cmd = [sys.executable, "-m", "opd_callback.toy._worker", args]
            procs.append((subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL), result_path))
    except OSError as e:
        if verbose:
            print(f"[opd_callback.toy] cannot start worker processes ({e!r}); training in-process", file=sys.stderr)
        for proc, _ in procs:
            proc.kill()
            proc.wait()
        return None
    results = []
    try:
        for proc, result_path in procs:
            rc = proc.wait()
            if rc != 0 or not result_path.is_file():
                raise RuntimeError(
                    f"opd_callback.toy training worker failed with exit code {rc} (see its stderr above)"
                )
            results.append(json.loads(result_path.read_text()))
            result_path.unlink()
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def train_all(out_dir: Path, seed: int, verbose: bool, threads: int = 1) -> None:
    """Train all models into ``out_dir``: two worker processes (one per core, ``threads`` threads each)
    unless ``OPD_TOY_WORKERS=1``, in which case everything runs in this process (same result)."""
    t_start = time.perf_counter()
    workers = min(_num_workers(), len(WORKER_JOBS))
    results = _run_workers(out_dir, seed, verbose, threads) if workers > 1 else None
    if results is None:
        workers = 1
        results = [train_and_save(job, str(out_dir), seed, verbose, threads) for job in WORKER_JOBS]
    t_total = time.perf_counter() - t_start

    accuracy = {}
    infos = {}
    for r in results:
        accuracy.update(r["accuracy"])
        infos.update(r["models"])
    order = ["student", "strong_teacher", "wrong_teacher", "hard_wrong_teacher", "student+answer", "student+solution",
             "student+misleading->misleading", "wrong_teacher@no_carry_rule", "hard_wrong_teacher@no_carry_rule"]
    accuracy = {k: accuracy[k] for k in order if k in accuracy}
    meta = {
        "version": LAB_VERSION,
        "seed": seed,
        "digits": DIGITS,
        "n_train": N_TRAIN,
        "n_val": N_VAL,
        "n_probe": N_PROBE,
        "build_seconds": round(t_total, 2),
        "workers": workers,
        "threads": threads,
        "cpu": _cpu_name(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "models": {name: {**infos[name], "recipe": RECIPES[name]} for name in MODEL_NAMES},
    }
    with open(out_dir / "lab.json", "w") as f:
        json.dump({"accuracy": accuracy, "meta": meta}, f, indent=2)
    if verbose:
        print(f"[opd_callback.toy] built in {t_total:.1f}s", file=sys.stderr, flush=True)


def _cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where available): float order, and so the trained lab, depends on it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
