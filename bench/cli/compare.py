"""`run_bench.py compare`: judge a run against another run, or against its recorded history.

Exit codes are the contract for CI: 0 nothing regressed, 1 some cell regressed
(worse on any metric, or ok before and failed now), 2 bad input.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from bench.results.compare import compare, side_from_history, side_from_run
from bench.results.history import DEFAULT_DB
from bench.results.records import RecordError, load_run
from bench.results.render import render
from bench.results.verdict import METRICS_BY_NAME


def parse_threshold(text: str) -> tuple[str, float]:
    name, sep, pct = text.partition("=")
    if not sep or name not in METRICS_BY_NAME:
        known = ", ".join(METRICS_BY_NAME)
        raise argparse.ArgumentTypeError(f"expected METRIC=PCT with METRIC one of {known}, got {text!r}")
    try:
        value = float(pct.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold for {name} is not a number: {pct!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"threshold for {name} must be >= 0, got {value}")
    return name, value


def _alpha(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"alpha must be in (0, 1), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_bench.py compare",
        usage="%(prog)s BASE_RUN NEW_RUN [options] | %(prog)s --against-history N NEW_RUN [options]",
        description=__doc__,
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="BASE_RUN NEW_RUN, or NEW_RUN with --against-history")
    parser.add_argument("--threshold", type=parse_threshold, action="append", default=[], metavar="METRIC=PCT",
                        help="relative change a verdict needs, per metric (default 5%%; exposed_comm_s, overlap_pct 10%%)")
    parser.add_argument("--alpha", type=_alpha, default=0.05, help="Mann-Whitney U significance level (default 0.05)")
    parser.add_argument("--format", choices=("table", "md", "json"), default="table")
    parser.add_argument("--against-history", type=int, metavar="N", help="compare NEW_RUN with the last N recorded runs")
    parser.add_argument("--db", type=Path, default=None, help="history DB (default results/history.sqlite)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        want = 1 if args.against_history is not None else 2
        if len(args.runs) != want:
            parser.error(f"expected {want} run folder(s), got {len(args.runs)}")
        if args.against_history is not None and args.against_history < 1:
            parser.error("--against-history N needs N >= 1")
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        if args.against_history is None:
            base, new = side_from_run(load_run(args.runs[0])), side_from_run(load_run(args.runs[1]))
        else:
            db = args.db or DEFAULT_DB
            if not db.is_file():
                print(f"{db}: history DB not found (record runs with: run_bench.py history record RUN_DIR)", file=sys.stderr)
                return 2
            run = load_run(args.runs[0])
            base, new = side_from_history(db, run, args.against_history), side_from_run(run)
    except RecordError as exc:
        print(exc, file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        print(f"{args.db or 'results/history.sqlite'}: {exc}", file=sys.stderr)
        return 2
    result = compare(base, new, args.alpha, dict(args.threshold))
    if args.against_history is not None and not base.cells:
        result.notes.append("no recorded history for these cells: nothing to compare against")
    print(render(result, args.format, args.alpha))
    return 1 if result.regressed else 0
