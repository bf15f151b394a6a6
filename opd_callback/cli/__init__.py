"""``opd-diagnose``: the training-free diagnostic, the HTML report and run comparison from the command line.

    opd-diagnose run --student PATH --teacher NAME=PATH --context NAME=TEMPLATE ... --data FILE --reward MOD:FN \
        --out DIR
    opd-diagnose report DIR
    opd-diagnose compare DIR_A DIR_B
    opd-diagnose demo

``docs/cli.md`` is the manual. Every :class:`~opd_callback.core.settings.RolloutSettings` field is a flag of ``run``
(``--num-rollouts 8``, ``--space params``, ...); ``--config FILE.yaml|.toml`` holds the same keys. ``run`` works
prompt by prompt, saves the report every ``--save-every`` prompts, and on Ctrl-C saves the prompts finished so far
(a consistent partial report) before exiting with status 130; ``--resume`` continues it.

Modules: :mod:`.parser` (flags), :mod:`.inputs` (config file, prompts, reward and divergence callables),
:mod:`.specs` and :mod:`.resolve` (flags and config file merged into a :class:`~.resolve.RunRequest`), :mod:`.models`,
:mod:`.plan` (the loaded :class:`~.plan.RunPlan`), :mod:`.run` (scoring, saving, resuming), :mod:`.commands` (report,
compare, demo), :mod:`.output` (tables and HTML pages).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from opd_callback.cli.commands import cmd_compare, cmd_demo, cmd_report
from opd_callback.cli.errors import PROG, CliError, first_line
from opd_callback.cli.inputs import load_config_file, load_examples, load_reward, parse_divergence
from opd_callback.cli.parser import build_parser

# run's flags and config file as one RunRequest
from opd_callback.cli.resolve import resolve as _resolve  # noqa: F401
from opd_callback.cli.run import cmd_run

__all__ = ["main", "build_parser", "parse_divergence", "load_examples", "load_reward", "load_config_file", "CliError",
           "PROG"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opd-diagnose`` and ``python -m opd_callback``; returns the exit status.

    Bad input ends the command with one line on stderr and status 2; an unexpected error with one line and status 1.
    ``--debug`` (anywhere on the command line) shows the traceback instead."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    args = parser.parse_args(argv)
    args._argv, args.debug = argv, debug
    sub = getattr(args, "command_parser", parser)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "report":
            return cmd_report(args, sub)
        if args.command == "compare":
            return cmd_compare(args, sub)
        parser.error(f"unknown command {args.command!r}")
    except CliError as exc:
        if debug:
            raise
        sub.error(str(exc))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one line, the traceback with --debug
        if debug:
            raise
        print(f"{sub.prog}: error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
