"""The argument parser: one function per subcommand, and a flag for every :class:`RolloutSettings` field."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Sequence

from opd_callback.cli.errors import PROG

__all__ = ["build_parser"]

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``opd-diagnose run: error: <what to change> (see opd-diagnose run --help)``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Ordered(argparse.Action):
    """Collect --teacher / --context in command-line order into one list of (kind, value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def build_parser() -> argparse.ArgumentParser:
    """The ``opd-diagnose`` parser: subcommands run, report, compare and demo (demo's flags go to the demo itself).

    Each subcommand's parser is its namespace's ``command_parser``, the parser whose one-line errors it raises."""
    p = _Parser(
        prog=PROG,
        description="Per-token gradient-alignment diagnostics for on-policy distillation (arXiv 2605.10889).",
        allow_abbrev=False,
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also after the command)")
    sub = p.add_subparsers(dest="command", metavar="{run,report,compare,demo}")
    sub.required = True
    for add in (_add_run, _add_report, _add_compare):
        sp = add(sub)
        sp.set_defaults(command_parser=sp)
    sub.add_parser("demo", help="the toy-lab demo (flags are passed to python -m opd_callback.demo)", add_help=False)
    return p


# --------------------------------------------------------------------------------------------------------------------
# run


def _add_run(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``run``: what to score (student, configurations, data, reward), where to write it, and how."""
    r = sub.add_parser(
        "run",
        help="score teacher configurations on saved checkpoints (training-free)",
        description="Score teacher configurations side by side on a saved student's own rollouts. Writes "
        "records.parquet, rollouts.parquet, summary.json, meta.json and report.html into --out.",
        allow_abbrev=False,
    )
    r.add_argument("--config", metavar="FILE", help="YAML or TOML file with the same keys (flags override it)")
    _add_run_models(r)
    _add_run_data(r)
    _add_run_backend(r)
    _add_run_output(r)
    _add_debug(r)
    _add_settings_flags(r.add_argument_group("rollout settings (RolloutSettings fields)"))
    return r


def _add_run_models(r: argparse.ArgumentParser) -> None:
    """The student, its tokenizer and the teacher configurations with their divergences."""
    r.add_argument("--student", metavar="PATH", help="the student: any from_pretrained path (a local directory)")
    r.add_argument("--tokenizer", metavar="PATH", help="tokenizer path (default: the student's)")
    r.add_argument("--teacher", metavar="NAME=PATH", dest="configs", action=_Ordered, const="teacher",
                   help="an external teacher model (same vocabulary); repeat for several")
    r.add_argument("--context", metavar="NAME=TEMPLATE", dest="configs", action=_Ordered, const="context",
                   help="the student itself given a privileged context: a str.format template over the data's "
                   "columns, e.g. 'self+sol={prompt} Solution: {solution}'; NAME=@FILE reads the template from FILE")
    r.add_argument("--context-model", metavar="NAME=PATH", action="append", default=None,
                   help="run context configuration NAME on this model instead of the student's own weights")
    r.add_argument("--divergence", metavar="[NAME=]DIV[,beta=B][,temperature=T][,top_k=K]", action="append",
                   default=None, help="divergence of configuration NAME (or of every configuration without one): "
                   "reverse_kl (default), forward_kl, jsd, sampled_token, topk, or MODULE:FUNCTION for a callable loss")


def _add_run_data(r: argparse.ArgumentParser) -> None:
    """The prompts and the verifier."""
    r.add_argument("--data", metavar="FILE", help="prompts: .jsonl, .json, .parquet, .csv, or a datasets directory "
                   "(save_to_disk); each row needs a 'prompt' column")
    r.add_argument("--split", help="split of a DatasetDict directory (default: 'train' or the only one)")
    r.add_argument("--limit", type=int, metavar="N", help="use only the first N prompts")
    r.add_argument("--reward", metavar="MODULE:FUNCTION", help="the verifier, TRL signature "
                   "reward_fn(prompts, completions, **columns) -> list[float]; MODULE may be a .py file path")
    r.add_argument("--out", metavar="DIR", help="output directory")


def _add_run_backend(r: argparse.ArgumentParser) -> None:
    """Where the models run and which engine samples the rollouts (the vLLM backend: docs/backends.md)."""
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    r.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights dtype (default: float32 on CPU, auto on GPU)")
    r.add_argument("--trust-remote-code", action="store_true", default=None, help="passed to from_pretrained")
    r.add_argument("--backend", default=None, choices=["transformers", "vllm"],
                   help="engine that samples the student's rollouts (default transformers; vllm needs vLLM installed; "
                   "--dtype also sets its dtype)")
    r.add_argument("--vllm-tensor-parallel-size", type=int, default=None, metavar="N", help="vllm: GPUs per engine")
    r.add_argument("--vllm-gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="vllm: fraction of GPU memory the engine may use (default 0.9)")
    r.add_argument("--vllm-max-model-len", type=int, default=None, metavar="N",
                   help="vllm: context length, prompt + completion (default: the model's)")
    r.add_argument("--vllm-max-num-seqs", type=int, default=None, metavar="N",
                   help="vllm: sequences decoded concurrently (default: vLLM's)")


def _add_run_output(r: argparse.ArgumentParser) -> None:
    """Resuming, saving, the HTML report and the progress bar."""
    r.add_argument("--resume", action="store_true", help="skip prompts already scored in --out (same settings)")
    r.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="save the report every N prompts (default 10; 0: only at the end or on Ctrl-C)")
    r.add_argument("--no-html", action="store_true", help="do not write report.html")
    r.add_argument("--max-questions", type=int, default=None, metavar="N",
                   help="questions shown token by token in report.html (default 30)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------------------------
# report, compare


def _add_report(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``report``: rebuild a run directory's HTML report."""
    rp = sub.add_parser("report", help="(re)build the HTML report of a run directory", allow_abbrev=False,
                        description="Rebuild report.html from a run directory's saved records (also a training "
                        "run's <output_dir>/opd_alignment directory of diagnostics).")
    rp.add_argument("dir", metavar="DIR")
    rp.add_argument("--out", metavar="FILE", help="HTML file (default: DIR/report.html)")
    rp.add_argument("--tokenizer", metavar="PATH", help="decode tokens with this tokenizer (default: the run's)")
    rp.add_argument("--max-questions", type=int, default=30, metavar="N")
    rp.add_argument("--color-config", metavar="NAME", help="configuration that colours the tokens first")
    rp.add_argument("--title", help="page title")
    _add_debug(rp)
    return rp


def _add_compare(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``compare``: two run directories side by side."""
    cp = sub.add_parser("compare", help="two runs side by side (e.g. two checkpoints)", allow_abbrev=False,
                        description="Compare two run directories: mean alignment per configuration in each and the "
                        "difference B - A with a question-bootstrap interval.")
    cp.add_argument("dir_a", metavar="DIR_A")
    cp.add_argument("dir_b", metavar="DIR_B")
    cp.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels of the two runs (default: directory names)")
    cp.add_argument("--out", metavar="FILE", default="compare.html", help="HTML file (default: compare.html)")
    _add_debug(cp)
    return cp


def _add_debug(sp: argparse.ArgumentParser) -> None:
    """``--debug`` after the subcommand too (:func:`opd_callback.cli.main` looks for it anywhere)."""
    sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")


# --------------------------------------------------------------------------------------------------------------------
# settings flags from the RolloutSettings dataclass


def _settings_fields() -> list[tuple[dataclasses.Field, Any]]:
    """Every ``RolloutSettings`` constructor field with its resolved type."""
    from opd_callback.core.settings import RolloutSettings

    hints = typing.get_type_hints(RolloutSettings)
    return [(f, hints[f.name]) for f in dataclasses.fields(RolloutSettings) if f.init]


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None`` (``str`` for a union of several), else ``(tp, False)``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return tp, False


def _none_or(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    """``conv``, except that ``none`` / ``null`` (any case) give None."""
    def parse(s: str):
        return None if s.lower() in ("none", "null") else conv(s)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _settings_flag_options(base: Any, optional: bool) -> dict[str, Any]:
    """``add_argument`` options that parse a value of type ``base`` (``optional``: also none/null)."""
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(base)), "type": str}
    if origin in (list, Sequence) or base is list:
        inner = (typing.get_args(base) or (str,))[0]
        return {"nargs": "+", "type": inner, "metavar": inner.__name__.upper()}
    if base in (int, float, str):
        return {"type": _none_or(base) if optional else base, "metavar": base.__name__.upper()}
    return {"type": str}


def _add_settings_flags(group: argparse._ArgumentGroup) -> None:
    """``--num-rollouts`` (also ``--num_rollouts``), ``--adaptive/--no-adaptive``, ...: absent flags leave no value."""
    for f, tp in _settings_fields():
        flag = "--" + f.name.replace("_", "-")
        base, optional = _strip_optional(tp)
        names = [flag] if "_" not in f.name or base is bool else [flag, "--" + f.name]
        help_ = (f.metadata.get("help", "") + f" (default: {f.default!r})").replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        if base is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(*names, **kw, **_settings_flag_options(base, optional))
