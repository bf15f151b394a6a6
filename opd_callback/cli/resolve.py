"""``run``'s config file and flags merged into one plain description of the run (:class:`RunRequest`), checked before
anything is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypedDict

from opd_callback.cli.errors import CliError
from opd_callback.cli.inputs import load_config_file
from opd_callback.cli.specs import ConfigSpec, config_specs

__all__ = ["RUN_KEYS", "RunRequest", "resolve"]

RUN_KEYS = ("student", "tokenizer", "data", "split", "limit", "reward", "out", "device", "dtype", "save_every",
            "max_questions", "trust_remote_code", "backend")
_RUN_KEY_TYPES = {"limit": int, "save_every": int, "max_questions": int, "trust_remote_code": bool}
_DEFAULTS = {"save_every": 10, "max_questions": 30}
_MINIMA = {"limit": 1, "save_every": 0, "max_questions": 0}
_REQUIRED = ("student", "data", "reward", "out")


class RunRequest(TypedDict):
    """What ``run`` was asked to do, flags over the config file: paths and options as given (no model, no file read
    but the config file), ``settings`` as ``RolloutSettings`` keyword arguments, ``specs`` the configurations."""

    student: str
    tokenizer: str | None
    data: str
    split: str | None
    limit: int | None
    reward: str
    out: str
    device: str | None
    dtype: str | None
    save_every: int
    max_questions: int
    trust_remote_code: bool | None
    backend: str | None
    settings: dict[str, Any]
    specs: list[ConfigSpec]


def resolve(args: argparse.Namespace) -> RunRequest:
    """Merge the config file and the flags into one plain description of the run (raises CliError)."""
    file: dict = load_config_file(args.config) if args.config else {}
    _check_file_keys(file)
    run: dict[str, Any] = _run_keys(file, args)
    run["settings"] = _settings_kwargs(file, args)
    run["specs"] = config_specs(file, args)
    return typing.cast(RunRequest, run)


def _settings_field_names() -> set[str]:
    """The names of the ``RolloutSettings`` fields."""
    from opd_callback.core.settings import RolloutSettings

    return {f.name for f in dataclasses.fields(RolloutSettings)}


def _check_file_keys(file: dict) -> None:
    """Refuse a config file key that is neither a run key, a configuration block nor a settings field."""
    known = set(RUN_KEYS) | {"teachers", "contexts", "settings", "divergence", "context_models"}
    field_names = _settings_field_names()
    unknown = sorted(k for k in file if k not in known and k not in field_names)
    if unknown:
        raise CliError(f"--config: unknown keys {unknown}; allowed: {sorted(known)} and RolloutSettings fields")


def _run_keys(file: dict, args: argparse.Namespace) -> dict[str, Any]:
    """:data:`RUN_KEYS` from the flags, else from the file (parsed to their types), with defaults and bounds."""
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
    for k, default in _DEFAULTS.items():
        if run[k] is None:
            run[k] = default
    for k, lo in _MINIMA.items():
        if run[k] is not None and run[k] < lo:
            raise CliError(f"--{k.replace('_', '-')} must be >= {lo}, got {run[k]}")
    for k in _REQUIRED:
        if not run[k]:
            raise CliError(f"--{k} is required (or put '{k}:' in the --config file)")
    return run


def _settings_kwargs(file: dict, args: argparse.Namespace) -> dict[str, Any]:
    """``RolloutSettings`` keyword arguments: the file's ``settings:`` block and top-level fields (strings parsed or
    refused), then the flags."""
    from opd_callback.core.settings import RolloutSettings, parse_setting

    field_names = _settings_field_names()
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
    return {**s_file, **s_cli}
