"""`run_bench.py history list|record|detect|plot|ack|acks`: the SQLite history of runs (bench/results/history.py).

`detect` lists the change points of every recorded series (bench/results/changepoint.py);
`plot` marks them on the trend plots; `ack CELL METRIC --note TEXT` accepts the new level of
open regressions (who, when and why go into the DB's acks table), `acks` lists them.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from bench.results.history import (DEFAULT_DB, cells_and_metrics, history_points, list_runs, record_run)
from bench.cli.nightly import add_detector_options, detector_settings
from bench.results.changepoint import DetectorSettings
from bench.results.records import RecordError
from bench.results.verdict import METRICS, METRICS_BY_NAME


def _plot(db: Path, out: Path, cell: str | None, metric: str | None, config: str | None,
          settings: DetectorSettings) -> list[Path]:
    from bench.results.nightly import detect_all
    from bench.results.plots import plot_trend  # matplotlib only when plotting

    wanted = [metric] if metric else [m.name for m in METRICS]
    changes: dict[tuple[str, str], list[tuple[int, str]]] = {}
    if config is not None:  # change points are per configuration; without one the series mix them
        for f in detect_all(db, settings):
            if f["config_name"] == config:
                changes.setdefault((f["cell"], f["metric"]), []).append((f["index"], f["kind"]))
    written = []
    for c, m in cells_and_metrics(db):
        if (cell is None or c == cell) and m in wanted:
            points = list(reversed(history_points(db, c, m, config_name=config)))
            lo = {p.run_id: p.value for p in history_points(db, c, f"{m}.p10", config_name=config)}
            hi = {p.run_id: p.value for p in history_points(db, c, f"{m}.p90", config_name=config)}
            if not points:
                continue
            spec = METRICS_BY_NAME.get(m)
            written.append(plot_trend(points, lo, hi, c, m, out, spec.unit if spec else "", changes.get((c, m), [])))
    return written


def _parser() -> argparse.ArgumentParser:
    # --db may come before or after the action; the subparsers' copy must not reset it,
    # so it defaults to SUPPRESS there (parents share action objects, hence two parsers).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", type=Path, default=argparse.SUPPRESS, help=f"history DB (default {DEFAULT_DB})")
    parser = argparse.ArgumentParser(prog="run_bench.py history", description=__doc__)
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"history DB (default {DEFAULT_DB})")
    sub = parser.add_subparsers(dest="action")
    sub.add_parser("list", parents=[common], help="list recorded runs")
    rec = sub.add_parser("record", parents=[common], help="record run folders (idempotent)")
    rec.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    det = sub.add_parser("detect", parents=[common], help="change points of every recorded series")
    det.add_argument("--format", choices=("table", "json"), default="table")
    add_detector_options(det)
    plot = sub.add_parser("plot", parents=[common], help="trend plot per cell and metric, change points marked")
    add_detector_options(plot)
    plot.add_argument("--cell")
    plot.add_argument("--metric", help="default: the compared metrics")
    plot.add_argument("--config", help="only runs of this config name (cell ids can repeat across configs); "
                      "change points are marked only with it")
    plot.add_argument("--out", type=Path, required=True)
    ack = sub.add_parser("ack", parents=[common], help="acknowledge open regressions: their level becomes the baseline")
    ack.add_argument("cell", help="cell id (a shell pattern such as '*' matches several)")
    ack.add_argument("metric", help="metric (step_time_s, loss, ...; a pattern too)")
    ack.add_argument("--note", required=True, help="why: kept with who and when")
    ack.add_argument("--config", help="config name, when the cell is recorded under several")
    ack.add_argument("--by", help="who (default $USER)")
    listing = sub.add_parser("acks", parents=[common], help="list acknowledgements")
    listing.add_argument("--config")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    return parser


def _ack(args: argparse.Namespace) -> int:
    from bench.results.nightly import AckError, acknowledge

    if not args.note.strip():
        print("history ack: --note must say why", file=sys.stderr)
        return 2
    try:
        made = acknowledge(args.db, args.cell, args.metric, args.note, args.config, args.by)
    except AckError as exc:
        print(f"history ack: {exc}", file=sys.stderr)
        return 2
    for a in made:
        print(f"acknowledged {a.config_name} {a.cell} {a.metric} at run {a.run_name} by {a.by}: "
              f"{a.before:.6g} -> {a.level:.6g} is the baseline now ({a.note})")
    return 0


def _print_acks(db: Path, config: str | None, fmt: str) -> None:
    from tabulate import tabulate

    from bench.results.acks import acks

    found = acks(db, config_name=config)
    if fmt == "json":
        print(json.dumps([a.to_json() for a in found], indent=1))
        return
    rows = [[a.utc, a.by, a.config_name, a.cell, a.metric, a.run_name, f"{a.level:.6g}", a.note] for a in found]
    print(tabulate(rows, headers=["when", "by", "config", "cell", "metric", "at run", "level", "why"],
                   disable_numparse=True) if rows else "no acknowledgements")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    args.action = args.action or "list"
    if args.action != "record" and not Path(args.db).is_file():
        print(f"no history DB at {args.db} (record a run first: run_bench.py history record RUN_DIR)")
        return 0 if args.action == "list" else 2
    try:
        if args.action == "record":
            for run_dir in args.run_dirs:
                run_id = record_run(args.db, run_dir)
                print(f"recorded {run_dir} as run {run_id} in {args.db}")
        elif args.action == "detect":
            from bench.results.nightly import detect_all
            from bench.results.nightly_render import render_detect_table

            found = detect_all(args.db, detector_settings(args))
            print(json.dumps(found, indent=1) if args.format == "json" else render_detect_table(found))
        elif args.action == "ack":
            return _ack(args)
        elif args.action == "acks":
            _print_acks(args.db, args.config, args.format)
        elif args.action == "plot":
            paths = _plot(args.db, args.out, args.cell, args.metric, args.config, detector_settings(args))
            print("\n".join(str(p) for p in paths) if paths else "nothing to plot")
        else:
            _print_runs(list_runs(args.db))
    except RecordError as exc:
        print(exc, file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        print(f"{args.db}: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_runs(runs: list[dict[str, Any]]) -> None:
    from tabulate import tabulate

    if not runs:
        print("no runs recorded")
        return
    cols = ("id", "name", "utc", "config_name", "git_commit", "hostname", "gpu", "nnodes", "torch", "cuda", "nccl",
            "driver", "cells")
    rows = [[(str(r[c])[:12] if c == "git_commit" and r[c] else r[c]) for c in cols] for r in runs]
    print(tabulate(rows, headers=cols))
