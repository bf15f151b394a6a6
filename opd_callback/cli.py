"""``opd-diagnose``: the training-free diagnostic, the HTML report and run comparison from the command line.

    opd-diagnose run --student PATH --teacher NAME=PATH --context NAME=TEMPLATE ... --data FILE --reward MOD:FN --out DIR
    opd-diagnose report DIR
    opd-diagnose compare DIR_A DIR_B
    opd-diagnose demo

``docs/cli.md`` is the manual. Every :class:`~opd_callback.core.settings.RolloutSettings` field is a flag of ``run``
(``--num-rollouts 8``, ``--space params``, ...); ``--config FILE.yaml|.toml`` holds the same keys. ``run`` works prompt by
prompt, saves the report every ``--save-every`` prompts, and on Ctrl-C saves the prompts finished so far (a consistent
partial report) before exiting with status 130; ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "parse_divergence", "load_examples", "load_reward", "load_config_file"]

PROG = "opd-diagnose"
RUN_KEYS = ("student", "tokenizer", "data", "split", "limit", "reward", "out", "device", "dtype", "save_every",
            "max_questions", "trust_remote_code", "backend")
_RUN_KEY_TYPES = {"limit": int, "save_every": int, "max_questions": int, "trust_remote_code": bool}


class CliError(ValueError):
    """A bad argument; the message says what to change (printed as one line, exit status 2)."""


# --------------------------------------------------------------------------------------------------------------------
# settings flags from the RolloutSettings dataclass


def _settings_fields() -> list[tuple[dataclasses.Field, Any]]:
    from opd_callback.core.settings import RolloutSettings

    hints = typing.get_type_hints(RolloutSettings)
    return [(f, hints[f.name]) for f in dataclasses.fields(RolloutSettings) if f.init]


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return tp, False


def _none_or(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null") else conv(s)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _add_settings_flags(group: argparse._ArgumentGroup) -> None:
    for f, tp in _settings_fields():
        flag = "--" + f.name.replace("_", "-")
        base, optional = _strip_optional(tp)
        names = [flag] if "_" not in f.name or base is bool else [flag, "--" + f.name]
        help_ = (f.metadata.get("help", "") + f" (default: {f.default!r})").replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        if base is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        origin = typing.get_origin(base)
        if origin is typing.Literal:
            kw["choices"] = list(typing.get_args(base))
            kw["type"] = str
        elif origin in (list, Sequence) or base is list:
            inner = (typing.get_args(base) or (str,))[0]
            kw["nargs"] = "+"
            kw["type"] = inner
            kw["metavar"] = inner.__name__.upper()
        elif base in (int, float, str):
            kw["type"] = _none_or(base) if optional else base
            kw["metavar"] = base.__name__.upper()
        else:
            kw["type"] = str
        group.add_argument(*names, **kw)


# --------------------------------------------------------------------------------------------------------------------
# parser


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
    p = _Parser(
        prog=PROG,
        description="Per-token gradient-alignment diagnostics for on-policy distillation (arXiv 2605.10889).",
        allow_abbrev=False,
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also after the command)")
    sub = p.add_subparsers(dest="command", metavar="{run,report,compare,demo}")
    sub.required = True

    r = sub.add_parser(
        "run",
        help="score teacher configurations on saved checkpoints (training-free)",
        description="Score teacher configurations side by side on a saved student's own rollouts. Writes "
        "records.parquet, rollouts.parquet, summary.json, meta.json and report.html into --out.",
        allow_abbrev=False,
    )
    r.add_argument("--config", metavar="FILE", help="YAML or TOML file with the same keys (flags override it)")
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
    r.add_argument("--data", metavar="FILE", help="prompts: .jsonl, .json, .parquet, .csv, or a datasets directory "
                   "(save_to_disk); each row needs a 'prompt' column")
    r.add_argument("--split", help="split of a DatasetDict directory (default: 'train' or the only one)")
    r.add_argument("--limit", type=int, metavar="N", help="use only the first N prompts")
    r.add_argument("--reward", metavar="MODULE:FUNCTION", help="the verifier, TRL signature "
                   "reward_fn(prompts, completions, **columns) -> list[float]; MODULE may be a .py file path")
    r.add_argument("--out", metavar="DIR", help="output directory")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    r.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights dtype (default: float32 on CPU, auto on GPU)")
    r.add_argument("--trust-remote-code", action="store_true", default=None, help="passed to from_pretrained")
    # issue 9: the vLLM rollout backend (opd_callback/rollout_vllm.py, docs/backends.md)
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
    r.add_argument("--resume", action="store_true", help="skip prompts already scored in --out (same settings)")
    r.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="save the report every N prompts (default 10; 0: only at the end or on Ctrl-C)")
    r.add_argument("--no-html", action="store_true", help="do not write report.html")
    r.add_argument("--max-questions", type=int, default=None, metavar="N",
                   help="questions shown token by token in report.html (default 30)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    _add_settings_flags(r.add_argument_group("rollout settings (RolloutSettings fields)"))

    rp = sub.add_parser("report", help="(re)build the HTML report of a run directory", allow_abbrev=False,
                        description="Rebuild report.html from a run directory's saved records (also a training "
                        "run's <output_dir>/opd_alignment directory of diagnostics).")
    rp.add_argument("dir", metavar="DIR")
    rp.add_argument("--out", metavar="FILE", help="HTML file (default: DIR/report.html)")
    rp.add_argument("--tokenizer", metavar="PATH", help="decode tokens with this tokenizer (default: the run's)")
    rp.add_argument("--max-questions", type=int, default=30, metavar="N")
    rp.add_argument("--color-config", metavar="NAME", help="configuration that colours the tokens first")
    rp.add_argument("--title", help="page title")
    rp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")

    cp = sub.add_parser("compare", help="two runs side by side (e.g. two checkpoints)", allow_abbrev=False,
                        description="Compare two run directories: mean alignment per configuration in each and the "
                        "difference B - A with a question-bootstrap interval.")
    cp.add_argument("dir_a", metavar="DIR_A")
    cp.add_argument("dir_b", metavar="DIR_B")
    cp.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels of the two runs (default: directory names)")
    cp.add_argument("--out", metavar="FILE", default="compare.html", help="HTML file (default: compare.html)")
    cp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")

    sub.add_parser("demo", help="the toy-lab demo (flags are passed to python -m opd_callback.demo)", add_help=False)
    return p


# --------------------------------------------------------------------------------------------------------------------
# loading


def load_config_file(path: str | Path) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) run configuration into a dict."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover
                raise CliError("--config: reading YAML needs PyYAML (pip install pyyaml); or use a .toml file") from None
            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # pragma: no cover - Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ImportError:
                    raise CliError("--config: reading TOML needs Python 3.11+ or tomli (pip install tomli)") from None
            data = tomllib.loads(text)
        else:
            raise CliError(f"--config {path}: use a .yaml, .yml or .toml file")
    except CliError:
        raise
    except Exception as exc:  # noqa: BLE001 - parse errors of either format
        raise CliError(f"--config {path}: cannot parse it ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CliError(f"--config {path}: the file must hold a mapping of keys (student, teachers, settings, ...)")
    return data


def _to_py(x: Any) -> Any:
    """numpy arrays / scalars from parquet -> plain lists / scalars (chat prompts must be lists of dicts)."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _to_py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_py(v) for v in x]
    return x


def load_examples(path: str | Path, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL / JSON / Parquet / CSV file or a ``datasets.save_to_disk`` directory, as a list of dicts."""
    path = Path(path)
    if not path.exists():
        raise CliError(f"--data {path}: no such file or directory")
    suffix = path.suffix.lower()
    if path.is_dir():
        try:
            import datasets
        except ImportError:  # pragma: no cover
            raise CliError("--data: a directory needs the datasets package (pip install datasets)") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001
            raise CliError(f"--data {path}: not a datasets directory saved with save_to_disk ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds.keys())
            if split is None:
                split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
            if split not in names:
                raise CliError(f"--data {path} has splits {names}: choose one with --split")
            ds = ds[split]
        rows = [dict(r) for r in ds]
    elif suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CliError(f"--data {path}: line {i + 1} is not valid JSON ({exc.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CliError(f"--data {path}: not valid JSON ({exc.msg}); for one object per line use .jsonl") from None
        rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise CliError(f"--data {path}: expected a JSON list of objects (or {{'data': [...]}})")
    elif suffix in (".parquet", ".csv"):
        import pandas as pd

        df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        rows = [_to_py(r) for r in df.to_dict("records")]
    else:
        raise CliError(f"--data {path}: use a .jsonl, .json, .parquet or .csv file or a datasets directory")
    if limit is not None:
        rows = rows[: int(limit)]
    if not rows:
        raise CliError(f"--data {path}: no rows")
    from opd_callback.core.settings import messages_to_prompt_row

    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise CliError(f"--data {path}: row {i} is a {type(r).__name__}, not an object with a 'prompt' column")
        if "prompt" not in r and "messages" in r:
            try:
                r = messages_to_prompt_row(r)  # TRL's conversational format: the final assistant turn is dropped
            except (TypeError, ValueError) as exc:
                raise CliError(f"--data {path}: row {i}: {exc}") from None
        if "prompt" not in r:
            raise CliError(f"--data {path}: row {i} has no 'prompt' column (it has {sorted(r)}); rename the prompt "
                           "column to 'prompt', or give chat rows a 'messages' column (TRL's conversational format)")
        out.append(r)
    return out


def _import_object(spec: str, what: str) -> Any:
    if ":" not in spec:
        raise CliError(f"{what} {spec!r}: give MODULE:FUNCTION, e.g. my_rewards:accuracy or path/to/file.py:accuracy")
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            file = Path(mod_name)
            if not file.is_file():
                raise CliError(f"{what} {spec!r}: file {file} does not exist")
            mspec = importlib.util.spec_from_file_location(f"_opd_user_{file.stem}", file)
            module = importlib.util.module_from_spec(mspec)  # type: ignore[arg-type]
            mspec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except CliError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CliError(f"{what} {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc}); make it importable "
                       "(PYTHONPATH) or give a .py file path") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise CliError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise CliError(f"{what} {spec!r}: {attr!r} is not callable")
    return obj


def load_reward(spec: str) -> Any:
    """``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) -> the reward function."""
    return _import_object(spec, "--reward")


def parse_divergence(spec: str) -> tuple[str | None, dict]:
    """``[NAME=]DIV[,beta=B][,temperature=T][,top_k=K]`` -> ``(NAME or None, TeacherConfig keyword arguments)``."""
    name = None
    body = spec
    head = spec.split(",", 1)[0]
    if "=" in head:
        name, _, body = spec.partition("=")
        name = name.strip() or None
        if name == "*":
            name = None
    parts = [s.strip() for s in body.split(",") if s.strip()]
    if not parts:
        raise CliError(f"--divergence {spec!r}: give a divergence, e.g. 'jsd,beta=0.5' or 'big=forward_kl'")
    div: Any = parts[0]
    if ":" in div:
        div = _import_object(div, "--divergence")
    else:
        from opd_callback.core.divergences import available_divergences

        if div not in available_divergences():
            raise CliError(f"--divergence {spec!r}: unknown divergence {div!r}; use one of {available_divergences()} "
                           "or MODULE:FUNCTION for a callable loss(student_logits, teacher_logits)")
    kw: dict[str, Any] = {"divergence": div}
    conv = {"beta": float, "temperature": float, "top_k": int}
    for opt in parts[1:]:
        k, eq, v = opt.partition("=")
        k = k.strip()
        if not eq or k not in conv:
            raise CliError(f"--divergence {spec!r}: unknown option {opt!r}; use beta=B, temperature=T or top_k=K")
        try:
            kw[k] = conv[k](v)
        except ValueError:
            raise CliError(f"--divergence {spec!r}: {k} must be a number, got {v!r}") from None
    return name, kw


def _split_named(value: str, flag: str, example: str) -> tuple[str, str]:
    name, eq, rest = value.partition("=")
    if not eq or not name.strip() or not rest:
        raise CliError(f"{flag} {value!r}: use NAME=VALUE, e.g. {flag} {example}")
    return name.strip(), rest


# --------------------------------------------------------------------------------------------------------------------
# run


@dataclasses.dataclass
class _ConfigSpec:
    name: str
    kind: str  # "teacher" | "context"
    model: str | None = None
    template: str | None = None
    options: dict = dataclasses.field(default_factory=dict)


_OPTION_TYPES = {"beta": float | None, "temperature": float, "top_k": int | None}


def _specs_from_file(data: dict) -> list[_ConfigSpec]:
    from opd_callback.core.settings import parse_setting

    out: list[_ConfigSpec] = []
    for key, kind in (("teachers", "teacher"), ("contexts", "context")):
        block = data.get(key)
        if block is None:
            continue
        shape = ("NAME: PATH or NAME: {model: PATH, divergence: ...}" if kind == "teacher"
                 else "NAME: TEMPLATE or NAME: {template: TEMPLATE, divergence: ...}")
        if isinstance(block, dict):
            items = list(block.items())
        elif isinstance(block, list) and all(isinstance(b, dict) for b in block):
            items = [(b.get("name"), b) for b in block]
        else:
            raise CliError(f"--config: '{key}' must be a mapping ({shape}) or a list of mappings with 'name', got "
                           f"{type(block).__name__} {block!r:.60}")
        for name, v in items:
            if not name or not isinstance(name, (str, int)) or isinstance(name, bool):
                raise CliError(f"--config: every entry of '{key}' needs a name (a string), got {name!r}")
            if isinstance(v, str):
                v = {"model": v} if kind == "teacher" else {"template": v}
            if not isinstance(v, dict):
                raise CliError(f"--config: {key}.{name} must be a string or a mapping ({shape}), got "
                               f"{type(v).__name__} {v!r:.60}")
            v = dict(v)
            v.pop("name", None)
            model = v.pop("model", v.pop("path", None))
            template = v.pop("template", None)
            if kind == "teacher" and not model:
                raise CliError(f"--config: teachers.{name} needs 'model' (a from_pretrained path)")
            if kind == "context" and not template:
                raise CliError(f"--config: contexts.{name} needs 'template'")
            if model is not None and not isinstance(model, str):
                raise CliError(f"--config: {key}.{name}.model must be a path (a string), got {model!r}")
            if template is not None and not isinstance(template, str):
                raise CliError(f"--config: contexts.{name}.template must be a string, got {template!r}")
            unknown = sorted(set(v) - {"divergence", *_OPTION_TYPES})
            if unknown:
                raise CliError(f"--config: {key}.{name} has unknown keys {unknown}; allowed: model/template, "
                               "divergence, beta, temperature, top_k")
            for opt, tp in _OPTION_TYPES.items():
                if opt in v:
                    try:
                        v[opt] = parse_setting("--config", f"{key}.{name}.{opt}", v[opt], tp)
                    except (TypeError, ValueError) as exc:
                        raise CliError(str(exc)) from None
            if "divergence" in v:
                if not isinstance(v["divergence"], str):
                    raise CliError(f"--config: {key}.{name}.divergence must be a name such as reverse_kl or "
                                   f"MODULE:FUNCTION, got {v['divergence']!r}")
                if ":" in v["divergence"]:
                    v["divergence"] = _import_object(v["divergence"], f"--config {key}.{name}.divergence")
            out.append(_ConfigSpec(str(name), kind, model, template, v))
    return out


def _read_template(t: str) -> str:
    if t.startswith("@"):
        f = Path(t[1:])
        if not f.is_file():
            raise CliError(f"--context template file {f} does not exist")
        return f.read_text(encoding="utf-8")
    return t


def _resolve(args: argparse.Namespace) -> dict:
    """Merge the config file and the flags into one plain description of the run (raises CliError)."""
    file: dict = load_config_file(args.config) if args.config else {}
    known = set(RUN_KEYS) | {"teachers", "contexts", "settings", "divergence", "context_models"}
    from opd_callback.core.settings import RolloutSettings

    field_names = {f.name for f in dataclasses.fields(RolloutSettings)}
    unknown = sorted(k for k in file if k not in known and k not in field_names)
    if unknown:
        raise CliError(f"--config: unknown keys {unknown}; allowed: {sorted(known)} and RolloutSettings fields")
    from opd_callback.core.settings import parse_setting

    run: dict[str, Any] = {}
    for k in RUN_KEYS:
        v = getattr(args, k, None)
        if v is None and file.get(k) is not None:
            try:
                v = parse_setting("--config", k, file[k], _RUN_KEY_TYPES.get(k, str))
            except (TypeError, ValueError) as exc:
                raise CliError(str(exc)) from None
        run[k] = v
    if run["save_every"] is None:
        run["save_every"] = 10
    if run["max_questions"] is None:
        run["max_questions"] = 30
    for k, lo in (("limit", 1), ("save_every", 0), ("max_questions", 0)):
        if run[k] is not None and run[k] < lo:
            raise CliError(f"--{k.replace('_', '-')} must be >= {lo}, got {run[k]}")
    for k in ("student", "data", "reward", "out"):
        if not run[k]:
            raise CliError(f"--{k} is required (or put '{k}:' in the --config file)")
    # settings: file 'settings:' block and top-level fields, then flags; strings from the file are parsed or refused
    block = file.get("settings")
    if block is not None and not isinstance(block, dict):
        raise CliError(f"--config: 'settings' must be a mapping of RolloutSettings fields (e.g. settings: "
                       f"{{num_rollouts: 4}}), got {type(block).__name__} {block!r:.60}")
    s_file = dict(block or {})
    s_file.update({k: v for k, v in file.items() if k in field_names})
    bad = sorted(set(s_file) - field_names)
    if bad:
        raise CliError(f"--config settings: unknown keys {bad}; see opd-diagnose run --help for the settings")
    hints = typing.get_type_hints(RolloutSettings)
    for k, v in list(s_file.items()):
        if k == "param_filter" and isinstance(v, list):
            continue
        try:
            s_file[k] = parse_setting("--config settings", k, v, hints[k])
        except (TypeError, ValueError) as exc:
            raise CliError(str(exc)) from None
    s_cli = {k: getattr(args, k) for k in field_names if hasattr(args, k)}
    run["settings"] = {**s_file, **s_cli}
    # configurations, in order: file first, then flags (a flag with the same name replaces the file's entry)
    specs = _specs_from_file(file)
    from_flags: list[str] = []
    for kind, value in getattr(args, "configs", None) or []:
        if kind == "teacher":
            name, path = _split_named(value, "--teacher", "big=/models/teacher")
            spec = _ConfigSpec(name, "teacher", model=path)
        else:
            name, tpl = _split_named(value, "--context", "'self+answer={prompt} (answer: {answer})'")
            spec = _ConfigSpec(name, "context", template=_read_template(tpl))
        if name in from_flags:
            raise CliError(f"configuration names must be unique; {name!r} is given twice (--teacher/--context)")
        from_flags.append(name)
        specs = [s for s in specs if s.name != name] + [spec]  # a flag replaces the config file's entry
    cm_block = file.get("context_models")
    if cm_block is not None and (not isinstance(cm_block, dict)
                                 or not all(isinstance(p, str) for p in cm_block.values())):
        raise CliError(f"--config: 'context_models' must map context names to model paths (NAME: PATH), got "
                       f"{cm_block!r:.60}")
    cm = dict(cm_block or {})
    for v in args.context_model or []:
        n, p = _split_named(v, "--context-model", "self+answer=/models/frozen-copy")
        cm[n] = p
    for n, p in cm.items():
        hit = [s for s in specs if s.name == n and s.kind == "context"]
        if not hit:
            raise CliError(f"--context-model {n}={p}: there is no --context named {n!r}")
        hit[0].model = p
    if not specs:
        raise CliError("no teacher configuration: add --teacher NAME=PATH and/or --context NAME=TEMPLATE")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CliError(f"configuration names must be unique; repeated: {dup}")
    divs = file.get("divergence") or []
    divs = [divs] if isinstance(divs, str) else divs  # 'divergence: reverse_kl' (one) or a list of specs
    if not isinstance(divs, list) or not all(isinstance(d, str) for d in divs):
        raise CliError(f"--config: 'divergence' must be a divergence spec such as reverse_kl or 'big=jsd,beta=0.5', "
                       f"or a list of them, got {divs!r:.60}")
    default_kw: dict = {}
    for d in divs + list(args.divergence or []):
        n, kw = parse_divergence(d)
        if n is None:
            default_kw = kw
            continue
        hit = [s for s in specs if s.name == n]
        if not hit:
            raise CliError(f"--divergence {d!r}: no configuration named {n!r} (have {names})")
        hit[0].options.update(kw)
    from opd_callback.core.settings import ContextTeacher, TeacherConfig, template_fields

    for s in specs:
        s.options = {**default_kw, **s.options}
        try:  # every check of a configuration that needs no model, before any model is loaded
            if s.kind == "context":
                template_fields(s.template)
            TeacherConfig(s.name, ContextTeacher("{prompt}"), **s.options)
        except (TypeError, ValueError) as exc:
            raise CliError(f"configuration {s.name!r}: {exc}") from None
    run["specs"] = specs
    return run


def _check_data(examples: list[dict], specs: list[_ConfigSpec], data: str) -> None:
    """The rows' prompts and every context template against every row, before any model is loaded."""
    from opd_callback.core.settings import format_template
    from opd_callback.core.engine import _check_examples

    try:
        rows = _check_examples(examples)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--data {data}: {exc}") from None
    examples[:] = rows
    for s in specs:
        if s.kind != "context":
            continue
        for i, r in enumerate(rows):
            p = r["prompt"]
            if not isinstance(p, str):  # chat prompt: {prompt} is the last user message's content
                user = [m for m in p if m.get("role") == "user"]
                if not user:
                    raise CliError(f"--data {data}: row {i} is a chat prompt without a 'user' message, which context "
                                   f"configuration {s.name!r} rewrites")
                r = {**r, "prompt": user[-1]["content"]}
            try:
                format_template(s.template, r, f"context configuration {s.name!r}, row {i} of {data}")
            except ValueError as exc:
                raise CliError(str(exc)) from None


def _device(name: str | None):
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r}: use cpu, cuda or cuda:N") from None


def _load_model(path: str, device, dtype: str | None, trust: bool, what: str):
    import torch
    from transformers import AutoModelForCausalLM

    if not Path(path).exists():
        raise CliError(f"{what} {path}: no such directory (offline: give a local from_pretrained directory)")
    if dtype in (None, ""):
        dtype = "float32" if device.type == "cpu" else "auto"
    dt = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, trust_remote_code=bool(trust))
    except Exception as exc:  # noqa: BLE001
        raise CliError(f"{what} {path}: cannot load a causal LM with from_pretrained ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model.to(device).eval()


def _save_atomic(report: Any, out: Path) -> None:
    """:meth:`AlignmentReport.save` writes into a temporary directory and renames the files into place (a failure or a
    kill mid-save leaves the previous snapshot intact)."""
    report.save(out)


def _print_ranking(report: Any, settings: Any, nodes: int) -> None:
    """The paired ranking, or one line saying why there is none (no node scored, every node degenerate)."""
    from opd_callback.core.engine import no_nodes_message

    if nodes == 0 or report.records.empty:
        print(f"\n{PROG}: {no_nodes_message(settings, report.rollouts.to_dict('records'))}", file=sys.stderr)
        return
    usable = int((~report.records["degenerate"].astype(bool)).sum())
    if usable == 0:
        print(f"\n{PROG}: no usable nodes: all {report.n_nodes} scored nodes are degenerate (|g| or |d| below "
              f"degenerate_eps={settings.degenerate_eps:g}: every continuation of a node got the same reward, or the "
              "teacher agrees with the student there), so no alignment is defined; use more rollouts_per_branch, "
              "more prompts, or a reward with partial credit", file=sys.stderr)
        return
    if len(report.configs) < 2:
        return
    rk = report.ranking()
    ref = rk["reference"].iloc[0] if "reference" in rk.columns else None
    print(f"\nranking by {rk['metric'].iloc[0]} (the decision metric; paired difference vs {ref}, "
          f"{int(100 * settings.ci_level)}% CI over questions):")
    for _, r in rk.iterrows():
        if r["config"] == ref:
            d = "reference"
        elif not math.isfinite(float(r.get("diff", float("nan")))):
            d = "n/a (undefined: no node where both it and the reference have something at stake)"
        else:
            ci = ("" if not math.isfinite(float(r["diff_ci_low"]))
                  else f" [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]")
            d = f"{r['diff']:+.3f}{ci}" + (" *" if r["significant"] else "")
        print(f"  {int(r['rank'])}. {r['config']:<22} {d}")


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return list(tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False)) if len(ids) else []


def _cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import pandas as pd

    try:
        run = _resolve(args)
        from opd_callback.core.settings import ContextTeacher, ExternalTeacher, RolloutSettings, TeacherConfig

        try:
            settings = RolloutSettings(**run["settings"])
        except (ValueError, TypeError) as exc:
            raise CliError(str(exc)) from None
        reward_fn = load_reward(run["reward"])
        examples = load_examples(run["data"], run["split"], run["limit"])
        _check_data(examples, run["specs"], run["data"])
        out = Path(run["out"])
        if out.exists() and not out.is_dir():
            raise CliError(f"--out {out}: exists and is not a directory")
        done_rec = done_rol = None
        meta_prev: dict = {}
        if args.resume and (out / "records.parquet").exists():
            from opd_callback.report import AlignmentReport

            prev = AlignmentReport.load(out)
            meta_prev = prev.meta
            old = prev.meta.get("settings") or {}
            new = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
            diff = sorted(k for k in new if k in old and old[k] != new[k])
            if diff:
                raise CliError(f"--resume: settings differ from the saved run in {diff}; use the same settings or a "
                               "new --out")
            done_rec, done_rol = prev.records, prev.rollouts
        elif not args.resume and (out / "records.parquet").exists():
            raise CliError(f"--out {out} already holds a run: pass --resume to continue it, or choose a new --out")
        device = _device(run["device"])
        from transformers import AutoTokenizer

        tok_path = run["tokenizer"] or run["student"]
        if not Path(tok_path).exists():
            raise CliError(f"--tokenizer {tok_path}: no such directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=bool(run["trust_remote_code"]))
        except Exception as exc:  # noqa: BLE001
            raise CliError(f"--tokenizer {tok_path}: cannot load a tokenizer ({type(exc).__name__})") from None
        models: dict[str, Any] = {}

        def model(path: str, what: str):
            key = str(Path(path).resolve())
            if key not in models:
                models[key] = _load_model(path, device, run["dtype"], run["trust_remote_code"], what)
            return models[key]

        student = model(run["student"], "--student")
        configs = []
        for s in run["specs"]:
            teacher = (ExternalTeacher(model(s.model, f"--teacher {s.name}")) if s.kind == "teacher"
                       else ContextTeacher(s.template, model(s.model, f"--context-model {s.name}") if s.model else None))
            try:
                configs.append(TeacherConfig(s.name, teacher, **s.options))
            except (ValueError, TypeError) as exc:
                raise CliError(f"configuration {s.name!r}: {exc}") from None
        from opd_callback.core.engine import AlignmentEngine

        try:
            engine = AlignmentEngine(student, tokenizer, configs, reward_fn, settings)
            if settings.space == "params":
                from opd_callback.core.param_space import select_parameters

                select_parameters(student, settings.param_filter)
            prepared = engine.prepare(examples)
            if run["backend"] == "vllm":
                from opd_callback.rollout.vllm_backend import make_backend

                vopts = {k: getattr(args, "vllm_" + k) for k in ("tensor_parallel_size", "gpu_memory_utilization",
                         "max_model_len", "max_num_seqs") if getattr(args, "vllm_" + k, None) is not None}
                engine.backend = make_backend("vllm", student, eos_ids=engine.eos_ids, pad_id=engine.pad_id,
                                              temperature=settings.temperature, batch_size=settings.batch_size,
                                              model_path=run["student"], options=vopts)
        except (ValueError, TypeError, ImportError) as exc:
            raise CliError(str(exc)) from None
    except CliError as exc:
        if _DEBUG:
            raise
        parser.error(str(exc))
        return 2  # pragma: no cover - parser.error exits

    done_idx = set(done_rol["prompt_index"].tolist()) if done_rol is not None and len(done_rol) else set()
    todo = [p for p in prepared if p.index not in done_idx]
    records: list[dict] = [] if done_rec is None else done_rec.to_dict("records")
    rollouts: list[dict] = [] if done_rol is None else done_rol.to_dict("records")
    totals = {k: int(meta_prev.get(k, 0) or 0) for k in ("rollouts", "nodes", "continuations", "tokens")}
    seconds_prev = float(meta_prev.get("seconds", 0.0) or 0.0)
    meta_base = {
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
        "configs": [
            {"name": c.name, "teacher": c.teacher.kind, "template": getattr(c.teacher, "template", None),
             "model": next((s.model for s in run["specs"] if s.name == c.name), None),
             "divergence": c.divergence_name, "beta": c.beta, "temperature": c.temperature, "top_k": c.top_k}
            for c in configs
        ],
        "student": str(run["student"]),
        "tokenizer": str(tok_path),
        "data": str(run["data"]),
        "reward": str(run["reward"]),
        "device": str(device),
        "backend": run["backend"] or "transformers",
        "command": " ".join([PROG] + list(getattr(args, "_argv", []) or [])),
        "total_prompts": len(prepared),
    }
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    completed = len(prepared) - len(todo)

    def snapshot(interrupted: bool) -> Any:
        from opd_callback.report import AlignmentReport

        meta = {**meta_base, **totals, "seconds": seconds_prev + time.perf_counter() - t0,
                "completed_prompts": completed, "interrupted": interrupted}
        rep = AlignmentReport(pd.DataFrame(records) if records else [], pd.DataFrame(rollouts) if rollouts else [],
                              meta)
        _save_atomic(rep, out)
        return rep

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prepared), initial=completed, desc=PROG, unit="prompt", dynamic_ncols=True)
    from opd_callback.rollout.base import eval_mode

    modes = eval_mode(student, *engine.teacher_models())
    modes.__enter__()
    interrupted = False
    n_correct = sum(bool(r["correct"]) for r in rollouts)
    try:
        for i, prep in enumerate(todo):
            rec, rol, st = engine.run_prompt(prep)
            for r in rec:
                r["candidate_tokens"] = _token_strings(tokenizer, r["candidate_ids"])
            for r in rol:
                r["completion_tokens"] = _token_strings(tokenizer, r["completion_ids"])
            records.extend(rec)
            rollouts.extend(rol)
            n_correct += sum(bool(r["correct"]) for r in rol)
            for k in totals:
                totals[k] += int(st.get(k, 0))
            completed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(nodes=totals["nodes"], success=f"{n_correct / max(len(rollouts), 1):.0%}")
            if run["save_every"] and (i + 1) % int(run["save_every"]) == 0 and i + 1 < len(todo):
                snapshot(False)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as exc:  # noqa: BLE001 - e.g. RewardFunctionError: save what is done, then report it
        if bar is not None:
            bar.close()
        if records or rollouts:
            snapshot(True)
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if records or rollouts:
            print(f"{PROG}: the {completed} prompts finished before the error are saved in {out} (--resume continues)",
                  file=sys.stderr)
        return 1
    finally:
        modes.__exit__(None, None, None)
    if bar is not None:
        bar.close()
    report = snapshot(interrupted)
    if not args.no_html:
        from opd_callback.report.html import build_html

        build_html(report, out / "report.html", max_questions=int(run["max_questions"]))
    print(report.format_table())
    _print_ranking(report, settings, totals["nodes"])
    where = f"{out}" + ("" if args.no_html else f" (open {out / 'report.html'})")
    if interrupted:
        print(f"\n{PROG}: interrupted: {completed} of {len(prepared)} prompts scored; partial report saved to {where}; "
              "rerun with --resume to continue", file=sys.stderr)
        return 130
    print(f"\n{PROG}: {completed} prompts scored; report saved to {where}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# report, compare, demo


def _load_report(path: str, parser: argparse.ArgumentParser, what: str):
    from opd_callback.report import AlignmentReport

    p = Path(path)
    if not p.is_dir():
        parser.error(f"{what} {path}: no such directory (give a directory written by opd-diagnose run)")
    try:
        return AlignmentReport.load(p)
    except Exception as exc:  # noqa: BLE001 - unreadable parquet / JSON, foreign columns: one line, exit 2
        if _DEBUG:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        kind = "" if isinstance(exc, (FileNotFoundError, ValueError)) else f"{type(exc).__name__}: "
        parser.error(f"{what} {path}: cannot read a run from it ({kind}{first})")


def _cmd_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from opd_callback.report.html import build_html

    report = _load_report(args.dir, parser, "DIR")
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        except Exception as exc:  # noqa: BLE001
            parser.error(f"--tokenizer {args.tokenizer}: cannot load a tokenizer ({type(exc).__name__})")
    if args.color_config and args.color_config not in report.configs:
        parser.error(f"--color-config {args.color_config!r}: not a configuration of this run; use one of "
                     f"{report.configs}")
    out = Path(args.out) if args.out else Path(args.dir) / "report.html"
    build_html(report, out, tokenizer=tok, max_questions=args.max_questions, color_config=args.color_config,
               title=args.title)
    print(report.format_table())
    print(f"\n{PROG}: wrote {out}")
    return 0


def _cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from opd_callback.report.html import build_compare_html
    from opd_callback.report.stats import compare_reports

    a = _load_report(args.dir_a, parser, "DIR_A")
    b = _load_report(args.dir_b, parser, "DIR_B")
    names = tuple(args.names) if args.names else (Path(args.dir_a).name or "A", Path(args.dir_b).name or "B")
    if names[0] == names[1]:
        names = (names[0] + " (A)", names[1] + " (B)")
    cmp_ = compare_reports(a, b, names)
    na, nb = names
    w = max([len(str(c)) for c in cmp_["config"]] + [13])
    print(f"{'configuration':<{w}} {na[:12]:>12} {nb[:12]:>12} {'B - A':>8} {'CI':>19}")
    for _, r in cmp_.iterrows():
        ci = "[nan, nan]" if not math.isfinite(r["diff_ci_low"]) else f"[{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]"
        print(f"{r['config']:<{w}} {r[f'mean_{na}']:>12.3f} {r[f'mean_{nb}']:>12.3f} {r['diff']:>+8.3f} {ci:>19}"
              + (" *" if r["significant"] else ""))
    print(f"success rate: {na} {a.success_rate:.1%}, {nb} {b.success_rate:.1%}")
    build_compare_html(a, b, args.out, names=names)
    print(f"\n{PROG}: wrote {args.out}")
    return 0


def _cmd_demo(rest: list[str]) -> int:
    from opd_callback import demo

    if any(x in ("-h", "--help") for x in rest):
        return int(demo.main(["--help"]) or 0)
    out = "runs/demo"
    for i, x in enumerate(rest):
        if x == "--out" and i + 1 < len(rest):
            out = rest[i + 1]
        elif x.startswith("--out="):
            out = x.split("=", 1)[1]
    no_html = "--no-html" in rest
    rc = int(demo.main([x for x in rest if x != "--no-html"]) or 0)
    if rc == 0 and not no_html and (Path(out) / "records.parquet").exists():
        from opd_callback.report.html import build_html
        from opd_callback.report import AlignmentReport

        tok = None
        try:
            from opd_callback.toy.tokenizer import build_tokenizer

            tok = build_tokenizer()
        except Exception:  # noqa: BLE001 - the report renders without token strings
            pass
        build_html(AlignmentReport.load(out), Path(out) / "report.html", tokenizer=tok,
                   title="OPD gradient alignment: toy-lab demo")
        print(f"[demo] HTML report: {Path(out) / 'report.html'}")
    return rc


_DEBUG = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opd-diagnose`` and ``python -m opd_callback``; returns the exit status.

    Bad input ends the command with one line on stderr and status 2; an unexpected error with one line and status 1.
    ``--debug`` (anywhere on the command line) shows the traceback instead."""
    global _DEBUG
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _DEBUG = "--debug" in argv
    if argv and argv[0] == "demo":
        return _cmd_demo(argv[1:])
    args = parser.parse_args(argv)
    args._argv = argv
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    cmd = {"run": _cmd_run, "report": _cmd_report, "compare": _cmd_compare}.get(args.command)
    if cmd is None:  # pragma: no cover
        parser.error(f"unknown command {args.command!r}")
    try:
        return cmd(args, sub)
    except CliError as exc:
        if _DEBUG:
            raise
        sub.error(str(exc))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one line, the traceback with --debug
        if _DEBUG:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"{sub.prog}: error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
