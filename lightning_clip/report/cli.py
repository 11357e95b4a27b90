"""The ``lightning-clip`` console script. Thin: argument parsing only, the work is in
``lightning_clip.report`` (loading, summary, figures).

It imports neither torch nor Lightning: ``lightning_clip/__init__.py`` loads the callbacks lazily, so
reading a run's files starts in a fraction of a second and works where torch is not installed.

Usage::

    lightning-clip report RUN_DIR [--out DIR] [--no-figures]

Exit status: 0 on success, 2 for a missing or malformed directory or file (the message names the path
and the problem), or when figures are asked for and matplotlib is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lightning_clip import __version__
from lightning_clip.report.load import ReportError, load_run
from lightning_clip.report.plot import write_figures
from lightning_clip.report.summary import format_summary, summarize

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-clip", description="Tools for runs trained with lightning-clip's callbacks."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rep = sub.add_parser(
        "report",
        help="summarise a run and write its figures",
        description=(
            "Read a run's log directory (CSVLogger metrics.csv, TensorBoard event files, and"
            " lightning_clip_events.jsonl), print a summary (steps, clip rate, gradient-norm percentiles,"
            " events by kind, rollbacks) and write the figures."
        ),
    )
    rep.add_argument("run_dir", metavar="RUN_DIR", help="the logger's log_dir, e.g. lightning_logs/version_0")
    rep.add_argument(
        "--out", metavar="DIR", default=None, help="where to write the figures (default: RUN_DIR)"
    )
    rep.add_argument("--no-figures", action="store_true", help="print the summary only")
    return parser


def _report(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir)
    print(format_summary(summarize(run)))
    if not args.no_figures:
        written = write_figures(run, args.out if args.out is not None else args.run_dir)
        for path in written:
            print(f"figure: {path}")
        if not written:
            print("figures: none (no gradient norm or event logged)")
        flow = os.path.join(args.run_dir, "gradient_flow.png")
        if os.path.exists(flow):
            print(f"figure: {flow} (saved by VanishingGradientMonitor)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-clip``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _report(args)
    except ReportError as err:
        print(f"lightning-clip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RecursionError, ValueError, OverflowError) as err:  # content no check above foresaw
        print(
            f"lightning-clip {args.command}: error: {args.run_dir}: cannot be summarised ({type(err).__name__}: {err}).",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
