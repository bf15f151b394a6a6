"""Loading the device, tokenizer and models a command names, each failure one :class:`CliError` naming the flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opd_callback.cli.errors import CliError, first_line

__all__ = ["pick_device", "load_model", "load_tokenizer", "ModelCache"]


def pick_device(name: str | None) -> Any:
    """``--device`` as a ``torch.device`` (None or ``auto``: cuda when available, else cpu)."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r}: use cpu, cuda or cuda:N") from None


def load_tokenizer(path: str, trust_remote_code: bool | None = None) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` (``trust_remote_code`` passed on unless None); a failure names
    ``--tokenizer``."""
    from transformers import AutoTokenizer

    kw = {} if trust_remote_code is None else {"trust_remote_code": bool(trust_remote_code)}
    try:
        return AutoTokenizer.from_pretrained(path, **kw)
    except Exception as exc:  # noqa: BLE001
        raise CliError(f"--tokenizer {path}: cannot load a tokenizer ({type(exc).__name__})") from None


def load_model(path: str, device: Any, dtype: str | None, trust: bool, what: str) -> Any:
    """A causal LM from a local ``from_pretrained`` directory, on ``device`` in eval mode (``dtype`` None: float32 on
    CPU, the checkpoint's own on GPU); ``what`` is the flag that named it."""
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
                       f"{first_line(exc)})") from None
    return model.to(device).eval()


class ModelCache:
    """The models of one run, each directory loaded once (a teacher path equal to the student's shares its weights)."""

    def __init__(self, device: Any, dtype: str | None, trust_remote_code: bool | None) -> None:
        self.device, self.dtype, self.trust = device, dtype, trust_remote_code
        self._models: dict[str, Any] = {}

    def get(self, path: str, what: str) -> Any:
        """The model at ``path``, loaded by :func:`load_model` on first use."""
        key = str(Path(path).resolve())
        if key not in self._models:
            self._models[key] = load_model(path, self.device, self.dtype, self.trust, what)
        return self._models[key]
