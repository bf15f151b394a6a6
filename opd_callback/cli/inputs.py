"""Reading what a run is given: the config file, the prompts, user callables (reward, divergence) and option values.

Every failure is a :class:`~opd_callback.cli.errors.CliError` naming the flag to change."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from opd_callback.cli.errors import CliError, first_line

__all__ = ["load_config_file", "load_examples", "load_reward", "parse_divergence", "import_object", "split_named",
           "read_template"]


# --------------------------------------------------------------------------------------------------------------------
# the config file


def load_config_file(path: str | Path) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) run configuration into a dict."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise CliError(f"--config {path}: use a .yaml, .yml or .toml file")
    parse = _toml_parser() if suffix == ".toml" else _yaml_parser()
    try:
        data = parse(text)
    except Exception as exc:  # noqa: BLE001 - parse errors of either format
        raise CliError(f"--config {path}: cannot parse it ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CliError(f"--config {path}: the file must hold a mapping of keys (student, teachers, settings, ...)")
    return data


def _yaml_parser() -> Callable[[str], Any]:
    """PyYAML's ``safe_load`` (an empty file is an empty mapping)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover
        raise CliError("--config: reading YAML needs PyYAML (pip install pyyaml); or use a .toml file") from None
    return lambda text: yaml.safe_load(text) or {}


def _toml_parser() -> Callable[[str], Any]:
    """``tomllib.loads`` (``tomli`` on Python 3.10)."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise CliError("--config: reading TOML needs Python 3.11+ or tomli (pip install tomli)") from None
    return tomllib.loads


# --------------------------------------------------------------------------------------------------------------------
# the prompts


def load_examples(path: str | Path, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL / JSON / Parquet / CSV file or a ``datasets.save_to_disk`` directory, as a list of dicts."""
    path = Path(path)
    if not path.exists():
        raise CliError(f"--data {path}: no such file or directory")
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _rows_of_dataset(path, split)
    elif suffix == ".jsonl":
        rows = _rows_of_jsonl(path)
    elif suffix == ".json":
        rows = _rows_of_json(path)
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
    return [_prompt_row(r, i, path) for i, r in enumerate(rows)]


def _rows_of_dataset(path: Path, split: str | None) -> list[dict]:
    """A ``save_to_disk`` directory: a Dataset, or one split of a DatasetDict (``train`` or the only one by default)."""
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
    return [dict(r) for r in ds]


def _rows_of_jsonl(path: Path) -> list:
    """One JSON value per non-blank line."""
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CliError(f"--data {path}: line {i + 1} is not valid JSON ({exc.msg})") from None
    return rows


def _rows_of_json(path: Path) -> list:
    """A JSON list of rows, or an object holding it under ``data`` (or ``rows``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CliError(f"--data {path}: not valid JSON ({exc.msg}); for one object per line use .jsonl") from None
    rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise CliError(f"--data {path}: expected a JSON list of objects (or {{'data': [...]}})")
    return rows


def _to_py(x: Any) -> Any:
    """numpy arrays / scalars from parquet -> plain lists / scalars (chat prompts must be lists of dicts)."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _to_py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_py(v) for v in x]
    return x


def _prompt_row(r: Any, i: int, path: Path) -> dict:
    """Row ``i`` as an object with a ``prompt`` column (TRL's ``messages`` rows lose their final assistant turn)."""
    from opd_callback.core.settings import messages_to_prompt_row

    if not isinstance(r, dict):
        raise CliError(f"--data {path}: row {i} is a {type(r).__name__}, not an object with a 'prompt' column")
    if "prompt" not in r and "messages" in r:
        try:
            r = messages_to_prompt_row(r)
        except (TypeError, ValueError) as exc:
            raise CliError(f"--data {path}: row {i}: {exc}") from None
    if "prompt" not in r:
        raise CliError(f"--data {path}: row {i} has no 'prompt' column (it has {sorted(r)}); rename the prompt "
                       "column to 'prompt', or give chat rows a 'messages' column (TRL's conversational format)")
    return r


# --------------------------------------------------------------------------------------------------------------------
# user callables


def import_object(spec: str, what: str) -> Any:
    """``MODULE:NAME`` or ``path/to/file.py:NAME`` -> that callable (``what``: the flag or key named in errors)."""
    if ":" not in spec:
        raise CliError(f"{what} {spec!r}: give MODULE:FUNCTION, e.g. my_rewards:accuracy or path/to/file.py:accuracy")
    mod_name, _, attr = spec.rpartition(":")
    module = _import_module(mod_name, spec, what)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise CliError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise CliError(f"{what} {spec!r}: {attr!r} is not callable")
    return obj


def _import_module(mod_name: str, spec: str, what: str) -> Any:
    """A module by import name (the working directory importable too) or from a ``.py`` file path."""
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            file = Path(mod_name)
            if not file.is_file():
                raise CliError(f"{what} {spec!r}: file {file} does not exist")
            mspec = importlib.util.spec_from_file_location(f"_opd_user_{file.stem}", file)
            module = importlib.util.module_from_spec(mspec)  # type: ignore[arg-type]
            mspec.loader.exec_module(module)  # type: ignore[union-attr]
            return module
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(mod_name)
    except CliError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CliError(f"{what} {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc}); make it importable "
                       "(PYTHONPATH) or give a .py file path") from None


def load_reward(spec: str) -> Any:
    """``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) -> the reward function."""
    return import_object(spec, "--reward")


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
    kw: dict[str, Any] = {"divergence": _divergence(parts[0], spec)}
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


def _divergence(div: str, spec: str) -> Any:
    """A registered divergence name, or the callable a ``MODULE:FUNCTION`` names."""
    if ":" in div:
        return import_object(div, "--divergence")
    from opd_callback.core.divergences import available_divergences

    if div not in available_divergences():
        raise CliError(f"--divergence {spec!r}: unknown divergence {div!r}; use one of {available_divergences()} "
                       "or MODULE:FUNCTION for a callable loss(student_logits, teacher_logits)")
    return div


# --------------------------------------------------------------------------------------------------------------------
# option values


def split_named(value: str, flag: str, example: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> ``(NAME, VALUE)``; ``example`` shows the form in the error."""
    name, eq, rest = value.partition("=")
    if not eq or not name.strip() or not rest:
        raise CliError(f"{flag} {value!r}: use NAME=VALUE, e.g. {flag} {example}")
    return name.strip(), rest


def read_template(t: str) -> str:
    """A ``--context`` template, or the contents of the file ``@FILE`` names."""
    if t.startswith("@"):
        f = Path(t[1:])
        if not f.is_file():
            raise CliError(f"--context template file {f} does not exist")
        return f.read_text(encoding="utf-8")
    return t
