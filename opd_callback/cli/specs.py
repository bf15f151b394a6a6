"""Teacher configurations as the config file and the flags describe them, merged and checked before any model loads."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from opd_callback.cli.errors import CliError
from opd_callback.cli.inputs import import_object, parse_divergence, read_template, split_named

__all__ = ["ConfigSpec", "config_specs"]

_OPTION_TYPES = {"beta": float | None, "temperature": float, "top_k": int | None}


@dataclasses.dataclass
class ConfigSpec:
    """One teacher configuration before its model is loaded: an external teacher (``model``) or a privileged context
    (``template``, optionally on another ``model``), with its ``TeacherConfig`` keyword ``options``."""

    name: str
    kind: str  # "teacher" | "context"
    model: str | None = None
    template: str | None = None
    options: dict = dataclasses.field(default_factory=dict)


def config_specs(file: dict, args: argparse.Namespace) -> list[ConfigSpec]:
    """The run's configurations in order: the file's, then the flags' (a flag with the same name replaces the file's
    entry); context models and divergences applied; each checked as far as it can be without a model."""
    specs = _with_flag_specs(_specs_from_file(file), getattr(args, "configs", None) or [])
    _apply_context_models(specs, file.get("context_models"), args.context_model or [])
    if not specs:
        raise CliError("no teacher configuration: add --teacher NAME=PATH and/or --context NAME=TEMPLATE")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CliError(f"configuration names must be unique; repeated: {dup}")
    _apply_divergences(specs, file.get("divergence") or [], list(args.divergence or []))
    _check_without_models(specs)
    return specs


# --------------------------------------------------------------------------------------------------------------------
# the config file's 'teachers:' and 'contexts:'


def _specs_from_file(data: dict) -> list[ConfigSpec]:
    """The file's ``teachers`` then ``contexts`` entries."""
    out: list[ConfigSpec] = []
    for key, kind in (("teachers", "teacher"), ("contexts", "context")):
        for name, v in _entries(data.get(key), key, kind):
            out.append(_spec_from_entry(key, kind, name, v))
    return out


def _shape(kind: str) -> str:
    """The forms an entry of a ``kind`` block may take, as errors show them."""
    return ("NAME: PATH or NAME: {model: PATH, divergence: ...}" if kind == "teacher"
            else "NAME: TEMPLATE or NAME: {template: TEMPLATE, divergence: ...}")


def _entries(block: Any, key: str, kind: str) -> list[tuple[Any, Any]]:
    """``(name, entry)`` of a block that is a mapping ``NAME: entry`` or a list of mappings with ``name``."""
    if block is None:
        return []
    if isinstance(block, dict):
        return list(block.items())
    if isinstance(block, list) and all(isinstance(b, dict) for b in block):
        return [(b.get("name"), b) for b in block]
    raise CliError(f"--config: '{key}' must be a mapping ({_shape(kind)}) or a list of mappings with 'name', got "
                   f"{type(block).__name__} {block!r:.60}")


def _spec_from_entry(key: str, kind: str, name: Any, v: Any) -> ConfigSpec:
    """One entry: a string (the model path or the template) or a mapping with it and the divergence options."""
    if not name or not isinstance(name, (str, int)) or isinstance(name, bool):
        raise CliError(f"--config: every entry of '{key}' needs a name (a string), got {name!r}")
    if isinstance(v, str):
        v = {"model": v} if kind == "teacher" else {"template": v}
    if not isinstance(v, dict):
        raise CliError(f"--config: {key}.{name} must be a string or a mapping ({_shape(kind)}), got "
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
    return ConfigSpec(str(name), kind, model, template, _entry_options(key, name, v))


def _entry_options(key: str, name: Any, v: dict) -> dict:
    """An entry's remaining keys as ``TeacherConfig`` options: numbers parsed, a ``MODULE:FUNCTION`` divergence
    imported, anything else refused."""
    from opd_callback.core.settings import parse_setting

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
            v["divergence"] = import_object(v["divergence"], f"--config {key}.{name}.divergence")
    return v


# --------------------------------------------------------------------------------------------------------------------
# flags, context models, divergences, checks


def _with_flag_specs(specs: list[ConfigSpec], flags: list[tuple[str, str]]) -> list[ConfigSpec]:
    """``specs`` with each ``--teacher`` / ``--context`` (in command-line order) appended, replacing a file entry of
    the same name; a name given twice on the command line is refused."""
    from_flags: list[str] = []
    for kind, value in flags:
        if kind == "teacher":
            name, path = split_named(value, "--teacher", "big=/models/teacher")
            spec = ConfigSpec(name, "teacher", model=path)
        else:
            name, tpl = split_named(value, "--context", "'self+answer={prompt} (answer: {answer})'")
            spec = ConfigSpec(name, "context", template=read_template(tpl))
        if name in from_flags:
            raise CliError(f"configuration names must be unique; {name!r} is given twice (--teacher/--context)")
        from_flags.append(name)
        specs = [s for s in specs if s.name != name] + [spec]
    return specs


def _apply_context_models(specs: list[ConfigSpec], block: Any, flags: list[str]) -> None:
    """The file's ``context_models`` and the ``--context-model NAME=PATH`` flags set the model of context NAME."""
    if block is not None and (not isinstance(block, dict) or not all(isinstance(p, str) for p in block.values())):
        raise CliError(f"--config: 'context_models' must map context names to model paths (NAME: PATH), got "
                       f"{block!r:.60}")
    cm = dict(block or {})
    for v in flags:
        n, p = split_named(v, "--context-model", "self+answer=/models/frozen-copy")
        cm[n] = p
    for n, p in cm.items():
        hit = [s for s in specs if s.name == n and s.kind == "context"]
        if not hit:
            raise CliError(f"--context-model {n}={p}: there is no --context named {n!r}")
        hit[0].model = p


def _apply_divergences(specs: list[ConfigSpec], file_divs: Any, flag_divs: list[str]) -> None:
    """The file's ``divergence`` (one spec or a list) then the ``--divergence`` flags: a named one sets that
    configuration's options, an unnamed one the default of every configuration that sets none."""
    divs = [file_divs] if isinstance(file_divs, str) else file_divs
    if not isinstance(divs, list) or not all(isinstance(d, str) for d in divs):
        raise CliError(f"--config: 'divergence' must be a divergence spec such as reverse_kl or 'big=jsd,beta=0.5', "
                       f"or a list of them, got {divs!r:.60}")
    names = [s.name for s in specs]
    default_kw: dict = {}
    for d in divs + flag_divs:
        n, kw = parse_divergence(d)
        if n is None:
            default_kw = kw
            continue
        hit = [s for s in specs if s.name == n]
        if not hit:
            raise CliError(f"--divergence {d!r}: no configuration named {n!r} (have {names})")
        hit[0].options.update(kw)
    for s in specs:
        s.options = {**default_kw, **s.options}


def _check_without_models(specs: list[ConfigSpec]) -> None:
    """Every check of a configuration that needs no model (its template, its options), before any model is loaded."""
    from opd_callback.core.settings import ContextTeacher, TeacherConfig, template_fields

    for s in specs:
        try:
            if s.kind == "context":
                template_fields(s.template)
            TeacherConfig(s.name, ContextTeacher("{prompt}"), **s.options)
        except (TypeError, ValueError) as exc:
            raise CliError(f"configuration {s.name!r}: {exc}") from None
