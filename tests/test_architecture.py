"""The package's layout rules, checked on its source: dependencies point inward, no function is longer than a screen,
and importing the package (the core, the report, the rollout backends) loads neither TRL nor wandb nor vLLM."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opd_callback"
MAX_FUNCTION_LINES = 60

# subpackage -> what it must not import (other subpackages of opd_callback, or third-party top-level packages)
FORBIDDEN = {
    "core": {"training", "cli", "demo", "toy", "trl", "wandb", "accelerate", "vllm"},
    "report": {"core", "rollout", "training", "cli", "demo", "toy", "trl", "wandb", "accelerate", "vllm", "torch"},
    "rollout": {"core", "report", "training", "cli", "demo", "toy", "trl", "wandb", "accelerate"},
    "training": {"cli", "demo", "toy"},
    "toy": {"core", "report", "rollout", "training", "cli", "demo", "trl", "wandb", "vllm"},
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "data" not in p.relative_to(PACKAGE).parts)


def _imports(source: str, sub: str) -> set[str]:
    """What a module of subpackage ``sub`` imports, as subpackage names of opd_callback (``core``, ...) or
    third-party top-level names (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"opd_callback.{sub}"] if node.level else [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            out.add(parts[1] if parts[0] == "opd_callback" and len(parts) > 1 else parts[0])
    return out


def test_the_rules_see_every_subpackage():
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(FORBIDDEN) <= subpackages
    assert {"core", "report", "rollout", "training", "cli", "demo", "toy"} == subpackages


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_dependencies_point_inward(sub):
    bad = {}
    for path in (PACKAGE / sub).rglob("*.py"):
        found = _imports(path.read_text(), sub) & FORBIDDEN[sub]
        if found:
            bad[str(path.relative_to(PACKAGE))] = sorted(found)
    assert bad == {}


def test_the_import_scanner_sees_imports():
    # the check above is only as good as _imports: feed it each import form
    source = ("import wandb\nfrom trl import X\nfrom opd_callback.training import y\nfrom . import z\n"
              "def f():\n    import vllm.sampling\n")
    assert _imports(source, "core") == {"wandb", "trl", "training", "core", "vllm"}


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_a_screen():
    long = {}
    for path in _modules():
        for fn in _functions(ast.parse(path.read_text())):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name}"] = lines
    assert long == {}


def test_importing_the_package_loads_no_trainer_logger_or_engine():
    code = ("import sys, opd_callback, opd_callback.core.engine, opd_callback.report.html, opd_callback.rollout\n"
            "print(sorted(m for m in ('trl', 'wandb', 'vllm', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
