"""`run_bench.py nightly`: run a sweep (or take a finished run), record it, judge it against history.

Writes nightly.md and nightly.json into the run folder and prints one of them.
Exit codes: 0 nothing regressed and everything judged, 1 a code regression (open until fixed
or acknowledged with `history ack`), 2 bad input, 3 no code regression but the night is not
judged complete (too little history, interrupted or missing cells, a change the machine or a
straggler explains). See docs/compare.md.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

from bench.config.schema import ConfigError
from bench.results.changepoint import DetectorSettings
from bench.results.history import DEFAULT_DB, record_run
from bench.results.nightly import EXIT_BAD_INPUT, NightlyResult, NightlySettings, judge_run
from bench.results.nightly_render import render_md
from bench.results.records import RecordError, load_run


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _alpha(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"alpha must be in (0, 1), got {text}")
    return value


def _percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value / 100.0


def add_detector_options(p: argparse.ArgumentParser) -> None:
    d = DetectorSettings()
    p.add_argument("--alpha", type=_alpha, default=d.alpha,
                   help=f"largest corrected p-value of a change point (default {d.alpha:g})")
    p.add_argument("--min-effect", type=_percent, default=d.min_effect, metavar="PCT",
                   help=f"smallest relative change reported, in percent (default {d.min_effect * 100:g})")


def detector_settings(args: argparse.Namespace) -> DetectorSettings:
    return DetectorSettings(alpha=args.alpha, min_effect=args.min_effect)


def _parser() -> argparse.ArgumentParser:
    s = NightlySettings()
    p = argparse.ArgumentParser(prog="run_bench.py nightly", description=__doc__,
                                usage="%(prog)s CONFIG [sweep options] [options] | %(prog)s --run RUN_DIR [options]")
    p.add_argument("config", nargs="?", type=Path, help="YAML sweep to run (default: the embedded default)")
    p.add_argument("--run", type=Path, metavar="RUN_DIR", help="judge this finished run instead of running one")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"history DB (default {DEFAULT_DB})")
    p.add_argument("--format", choices=("md", "json"), default="md", help="what to print (both are written)")
    p.add_argument("--dashboard", type=Path, metavar="DIR",
                   help="then refresh the static dashboard in DIR from the DB (docs/dashboard.md)")
    p.add_argument("--min-history", type=_positive, default=s.min_history, metavar="K",
                   help=f"earlier runs a series needs to be judged; fewer exits 3 (default {s.min_history})")
    p.add_argument("--recent", type=_positive, default=s.recent, metavar="N",
                   help=f"an improvement is shown for N runs from its start (default {s.recent}); "
                        "a regression stays open until fixed or acknowledged")
    add_detector_options(p)
    sweep = p.add_argument_group("sweep options (as for run_bench.py CONFIG)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--filter", metavar="REGEX")
    sweep.add_argument("--results-dir", type=Path, default=Path("results"))
    sweep.add_argument("--link-profile", type=Path, metavar="RUN_DIR")
    sweep.add_argument("--hardware", type=Path, metavar="FILE", help="for metrics.plan (docs/plan.md)")
    sweep.add_argument("--torchrun-arg", action="append", default=[], metavar="ARG")
    return p


def _sweep(args: argparse.Namespace) -> Path:
    from bench.cli.main import GRACE_S, RETRYABLE, run_sweep  # the same run path as `run_bench.py CONFIG`
    from bench.sweep.nodes import DEFAULT_RDZV_TIMEOUT_S

    sweep_args = argparse.Namespace(config=args.config, set=args.set, filter=args.filter, dry_run=False,
                                    resume=None, results_dir=args.results_dir, link_profile=args.link_profile,
                                    torchrun_arg=args.torchrun_arg, grace_s=GRACE_S, retry=RETRYABLE,
                                    hardware=args.hardware,
                                    nnodes=None, node_rank=None, rdzv_endpoint=None,
                                    rdzv_timeout=DEFAULT_RDZV_TIMEOUT_S)
    _, run_dir = run_sweep(sweep_args, [sys.executable, sys.argv[0], "nightly", *sys.argv[2:]])
    assert run_dir is not None  # one node, not a dry run
    return run_dir  # failed cells are judged below, against their history


def _write(run_dir: Path, result: NightlyResult, fmt: str) -> None:
    md, doc = render_md(result), json.dumps(result.to_json(), indent=1) + "\n"
    (run_dir / "nightly.md").write_text(md + "\n")
    (run_dir / "nightly.json").write_text(doc)
    print(md if fmt == "md" else doc, end="\n" if fmt == "md" else "")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.run is not None and (args.config is not None or args.set or args.filter):
            parser.error("--run judges a finished run: drop CONFIG, --set and --filter")
        settings = NightlySettings(detector_settings(args), args.min_history, args.recent)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        if args.dashboard is not None and (refused := _dashboard_refused(args.dashboard)):
            print(f"--dashboard: {refused}", file=sys.stderr)  # before the sweep, not after it
            return EXIT_BAD_INPUT
        run_dir = args.run if args.run is not None else _sweep(args)
        record_run(args.db, run_dir)
        run = load_run(run_dir)
        result = judge_run(args.db, run, settings)
    except ConfigError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        return EXIT_BAD_INPUT
    except RecordError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    except sqlite3.DatabaseError as exc:
        print(f"{args.db}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _write(Path(run_dir), result, args.format)
    if args.dashboard is not None:
        _refresh(args)
    return result.exit_code


def _dashboard_refused(out: Path) -> str | None:
    from bench.dashboard.build import DashboardError, check_out  # bokeh only when a dashboard is asked for

    try:
        check_out(out)
    except DashboardError as exc:
        return str(exc)
    return None


def _refresh(args: argparse.Namespace) -> None:
    """The verdict stands whatever happens here: a failed refresh is reported, not fatal."""
    from bench.dashboard.build import DashboardError, build

    try:
        built = build(args.db, args.dashboard, detector_settings(args))
        print(f"dashboard: {built.out / 'index.html'}", file=sys.stderr)
    except (DashboardError, OSError, sqlite3.DatabaseError) as exc:
        print(f"--dashboard: not refreshed: {exc}", file=sys.stderr)
