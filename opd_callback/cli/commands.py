"""``opd-diagnose report``, ``compare`` and ``demo``: commands over saved run directories."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from opd_callback.cli.errors import PROG, CliError, first_line
from opd_callback.cli.models import load_tokenizer
from opd_callback.cli.output import print_comparison, write_compare_html, write_html

__all__ = ["cmd_report", "cmd_compare", "cmd_demo"]


def _load_run(path: str, parser: argparse.ArgumentParser, what: str, debug: bool) -> Any:
    """The report saved in run directory ``path`` (``what``: DIR, DIR_A or DIR_B); one-line errors, exit 2 (with
    ``debug``, an unreadable directory raises its own error)."""
    from opd_callback.report import AlignmentReport

    p = Path(path)
    if not p.is_dir():
        parser.error(f"{what} {path}: no such directory (give a directory written by opd-diagnose run)")
    try:
        return AlignmentReport.load(p)
    except Exception as exc:  # noqa: BLE001 - unreadable parquet / JSON, foreign columns: one line, exit 2
        if debug:
            raise
        kind = "" if isinstance(exc, (FileNotFoundError, ValueError)) else f"{type(exc).__name__}: "
        parser.error(f"{what} {path}: cannot read a run from it ({kind}{first_line(exc)})")


def cmd_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``opd-diagnose report DIR``: rebuild DIR's HTML report and print its table."""
    report = _load_run(args.dir, parser, "DIR", args.debug)
    tok = None
    if args.tokenizer:
        try:
            tok = load_tokenizer(args.tokenizer)
        except CliError as exc:
            parser.error(str(exc))
    if args.color_config and args.color_config not in report.configs:
        parser.error(f"--color-config {args.color_config!r}: not a configuration of this run; use one of "
                     f"{report.configs}")
    out = Path(args.out) if args.out else Path(args.dir) / "report.html"
    write_html(report, out, tokenizer=tok, max_questions=args.max_questions, color_config=args.color_config,
               title=args.title)
    print(report.format_table())
    print(f"\n{PROG}: wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``opd-diagnose compare DIR_A DIR_B``: print the per-configuration comparison and write its HTML page."""
    from opd_callback.report.stats import compare_reports

    a = _load_run(args.dir_a, parser, "DIR_A", args.debug)
    b = _load_run(args.dir_b, parser, "DIR_B", args.debug)
    names = tuple(args.names) if args.names else (Path(args.dir_a).name or "A", Path(args.dir_b).name or "B")
    if names[0] == names[1]:
        names = (names[0] + " (A)", names[1] + " (B)")
    print_comparison(compare_reports(a, b, names), a, b, names)
    write_compare_html(a, b, args.out, names=names)
    print(f"\n{PROG}: wrote {args.out}")
    return 0


def cmd_demo(rest: list[str]) -> int:
    """``opd-diagnose demo ...``: the toy-lab demo with these flags, then its HTML report (unless ``--no-html``)."""
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
        from opd_callback.report import AlignmentReport

        write_html(AlignmentReport.load(out), Path(out) / "report.html", tokenizer=_toy_tokenizer(),
                   title="OPD gradient alignment: toy-lab demo")
        print(f"[demo] HTML report: {Path(out) / 'report.html'}")
    return rc


def _toy_tokenizer() -> Any:
    """The toy lab's tokenizer, or None (the report renders without token strings)."""
    try:
        from opd_callback.toy.tokenizer import build_tokenizer

        return build_tokenizer()
    except Exception:  # noqa: BLE001
        return None
