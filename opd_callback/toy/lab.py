"""The toy lab: its models, tokenizer and data (:class:`ToyLab`), loaded from the package (seed 0), from the on-disk
cache, or trained into it (:mod:`opd_callback.toy.build`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from .build import train_all
from .spec import LAB_VERSION, MODEL_NAMES, quiet_hf, split_examples
from .task import TEMPLATES, format_prompt
from .train import sample_accuracy

__all__ = ["ToyLab", "build_lab", "load_lab", "shipped_lab_dir", "default_cache_dir", "LAB_VERSION", "MODEL_NAMES"]

# Trained labs shipped inside the package (``<SHIPPED_ROOT>/<LAB_VERSION>-seed<N>/``): identical models on every
# machine. Training is seeded, but float order differs between CPUs and thread counts and training amplifies it, so a
# lab rebuilt elsewhere is a different (equally valid) lab.
SHIPPED_ROOT = Path(__file__).resolve().parent / "data"


def default_cache_dir() -> Path:
    """``$OPD_TOY_CACHE`` if set, else ``~/.cache/opd_callback/toy``."""
    env = os.environ.get("OPD_TOY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opd_callback" / "toy"


@dataclass
class ToyLab:
    """The trained toy models, their tokenizer and data. Models are in eval mode."""

    tokenizer: PreTrainedTokenizerFast
    student: Qwen2ForCausalLM
    strong_teacher: Qwen2ForCausalLM
    wrong_teacher: Qwen2ForCausalLM
    hard_wrong_teacher: Qwen2ForCausalLM
    train_examples: list[dict]
    probe_examples: list[dict]
    path: Path
    accuracy: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    # -- models -------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, Qwen2ForCausalLM]:
        """The four models by name (``MODEL_NAMES``)."""
        return {name: getattr(self, name) for name in MODEL_NAMES}

    def model_path(self, name: str) -> Path:
        """Local directory of a saved model (usable as ``from_pretrained``/``name_or_path``)."""
        if name not in MODEL_NAMES:
            raise KeyError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
        return self.path / name

    def load_model(self, name: str) -> Qwen2ForCausalLM:
        """A fresh copy of a model from disk (eval mode), e.g. to train without touching the lab's."""
        with quiet_hf():
            model = Qwen2ForCausalLM.from_pretrained(self.model_path(name))
        return model.eval()

    # -- prompts ------------------------------------------------------------------------
    @staticmethod
    def template(context: str | None) -> str | None:
        """Template for a context name (``"answer"``, ``"solution"``, ``"misleading"``,
        ``"misleading_solution"``), a template string (returned as is), or None (plain)."""
        if context is None or "{" in context:
            return context
        return TEMPLATES[context]

    def prompts(self, examples: Sequence[dict] | None = None, context: str | None = None) -> list[str]:
        """Prompt texts of ``examples`` (default: the probe set), optionally with a privileged context."""
        examples = self.probe_examples if examples is None else examples
        tpl = self.template(context)
        return [format_prompt(e, tpl) for e in examples]

    # -- evaluation ---------------------------------------------------------------------
    def sample_accuracy(
        self, model: str | torch.nn.Module, n: int | None = None, context: str | None = None, **kwargs
    ) -> float:
        """Sampled accuracy of a model (or model name) on the probe set."""
        if isinstance(model, str):
            model = getattr(self, model)
        return sample_accuracy(
            model, self.tokenizer, self.probe_examples, n=n, template=self.template(context), **kwargs
        )

    def accuracy_table(self) -> str:
        """The lab's sampled accuracies as a two-column text table."""
        width = max(len(k) for k in self.accuracy)
        lines = [f"{'model':<{width}}  sampled acc (T=1, n={self.meta.get('n_probe', len(self.probe_examples))})"]
        lines += [f"{k:<{width}}  {v:.3f}" for k, v in self.accuracy.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:  # the default dataclass repr would print whole models and datasets
        acc = ", ".join(f"{k}={v:.2f}" for k, v in self.accuracy.items())
        return f"ToyLab(path={str(self.path)!r}, accuracy={{{acc}}})"


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(d: Path) -> bool:
    return (d / "lab.json").is_file() and all((d / n / "config.json").is_file() for n in MODEL_NAMES)


def _lab_key(seed: int, threads: int = 1) -> str:
    return f"{LAB_VERSION}-seed{seed}" + (f"-threads{threads}" if threads != 1 else "")


def shipped_lab_dir(seed: int = 0) -> Path | None:
    """The lab of ``seed`` shipped inside the package, if there is one (seed 0 is)."""
    d = SHIPPED_ROOT / _lab_key(seed)
    return d if _is_complete(d) else None


def load_lab(path: str | os.PathLike) -> ToyLab:
    """Load a built lab from its directory (the shipped one, a cache entry, or a copy)."""
    d = Path(path).expanduser().resolve()
    if not _is_complete(d):
        raise FileNotFoundError(
            f"{d} is not a toy lab (expected lab.json and {', '.join(MODEL_NAMES)}/); build one with "
            "`python -m opd_callback.toy --rebuild --seed N`"
        )
    with open(d / "lab.json") as f:
        info = json.load(f)
    meta = info["meta"]
    if meta.get("version") != LAB_VERSION:
        raise ValueError(f"{d} holds lab version {meta.get('version')!r}; this package needs {LAB_VERSION!r}")
    seed = int(meta["seed"])
    with quiet_hf():
        tok = PreTrainedTokenizerFast.from_pretrained(d / "student")
        models = {n: Qwen2ForCausalLM.from_pretrained(d / n).eval() for n in MODEL_NAMES}
    train, _, probe = split_examples(seed)
    return ToyLab(
        tokenizer=tok,
        train_examples=train,
        probe_examples=probe,
        path=d,
        accuracy=info["accuracy"],
        meta=meta,
        **models,
    )


def build_lab(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    force: bool = False,
    verbose: bool = True,
    threads: int = 1,
) -> ToyLab:
    """The toy lab: the shipped one when the package has it, else trained (2-5 min on 2 CPU cores) and cached.

    Seed 0 is shipped with the package (``opd_callback/toy/data/``): every machine loads the same weights, so results
    on it reproduce across machines. Other seeds, other ``threads`` and ``force=True`` train the lab into
    ``<cache_dir>/<LAB_VERSION>-seed<seed>[-threads<T>]/`` (``cache_dir`` defaults to ``$OPD_TOY_CACHE`` or
    ``~/.cache/opd_callback/toy``): subfolders ``student/``, ``strong_teacher/``, ``wrong_teacher/``,
    ``hard_wrong_teacher/`` (model + tokenizer, ``save_pretrained`` format) and ``lab.json`` (accuracies and
    metadata: seed, threads, CPU, versions). A lab trained on another CPU or with another thread count is a different
    lab: training amplifies float-order differences. Building is serialised across processes with a file lock and
    written to a temporary folder that is renamed into place. ``force=True`` retrains even if cached (never touches
    the shipped lab).
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"build_lab: threads must be an int >= 1, got {threads!r}")
    if not force and threads == 1:
        shipped = shipped_lab_dir(seed)
        if shipped is not None:
            return load_lab(shipped)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = root.resolve()
    key = _lab_key(seed, threads)
    final = root / key
    if not force and _is_complete(final):
        return load_lab(final)
    with _locked(root / f"{key}.lock"):
        if force or not _is_complete(final):
            tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                train_all(tmp, seed, verbose, threads)
                if final.exists():
                    trash = root / f".{key}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                    os.rename(final, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        elif verbose:
            print(f"[opd_callback.toy] loading lab from {final}", file=sys.stderr, flush=True)
        return load_lab(final)
