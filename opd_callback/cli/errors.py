"""The command's name and its one kind of bad-argument error."""

from __future__ import annotations

PROG = "opd-diagnose"


class CliError(ValueError):
    """A bad argument; the message says what to change (printed as one line, exit status 2)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message ('' when it has none): what a one-line error shows of it."""
    text = str(exc)
    return text.splitlines()[0] if text else ""
