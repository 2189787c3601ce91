"""`run_bench.py dashboard [--db results/history.sqlite] --out DIR`: a static site of the history.

Opens from file:// with no server and no network (docs/dashboard.md): an index of every
configuration and cell with its latest status and verdict and the open regressions, a page per
cell with an interactive trend chart per metric (change points marked), and a page per run.
Exit codes: 0 written, 2 bad input (no DB, a DIR that is not a dashboard).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from bench.cli.nightly import add_detector_options, detector_settings
from bench.dashboard.build import DashboardError, build
from bench.results.history import DEFAULT_DB


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_bench.py dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"history DB (default {DEFAULT_DB})")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder of the site (replaced whole)")
    add_detector_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        built = build(args.db, args.out, detector_settings(args))
    except DashboardError as exc:
        print(f"dashboard: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        print(f"dashboard: {args.db}: {exc}", file=sys.stderr)
        return 2
    print(f"dashboard: {built.out / 'index.html'} ({built.configs} configuration(s), {built.cells} cell(s), "
          f"{built.runs} run(s), {built.pages} page(s))")
    return 0
