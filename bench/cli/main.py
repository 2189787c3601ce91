"""`run_bench.py`: run a YAML sweep, or hand `compare` / `history` to their own modules.

Exit codes: 0 every cell ok (or --dry-run), 1 some cell failed or timed out, 2 a config or
usage error or a run folder that cannot be used (one line per problem on stderr, no traceback),
3 the results stopped being writable mid-run, 130 interrupted (Ctrl-C, SIGTERM, SIGUSR1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from bench.config.checks import probe_host
from bench.config.limits import MAX_CELLS
from bench.config.matrix import BenchConfig, Cell, load_config
from bench.config.schema import ConfigError
from bench.metrics import roofline
from bench.results import report
from bench.results.records import RecordError, load_records
from bench.sweep import runner
from bench.sweep import nodes
from bench.sweep.launch import DEFAULT_WORKER, LaunchOptions, Outcome
from bench.sweep.nodes import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_RDZV_TIMEOUT_S

# Imported only when used: they are someone else's modules and a sweep must not depend on them.
SUBCOMMANDS = {"compare": "bench.cli.compare", "history": "bench.cli.history", "nightly": "bench.cli.nightly",
               "plan": "bench.cli.plan", "export": "bench.cli.export", "dashboard": "bench.cli.dashboard"}
WORKER_ENV = "ISP_BENCH_WORKER"  # module run by torchrun per cell; tests point it at a stand-in


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_bench.py",
        description="Run an ISP Bench sweep: one torchrun job per cell of a YAML matrix. "
                    "Also: run_bench.py compare ..., run_bench.py history ..., run_bench.py nightly ..., "
                    "run_bench.py plan ... (docs/plan.md), run_bench.py export ... (docs/export.md), "
                    "run_bench.py dashboard ... (docs/dashboard.md)",
        epilog="Keys are documented in docs/config.md, runs and --resume in docs/runs.md. Exit: 0 ok, "
               "1 a cell failed, 2 config error or run folder in use, 3 results unwritable, 130 interrupted.")
    p.add_argument("config", nargs="?", type=Path, help="YAML sweep (default: the embedded bench/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cell key in every cell (parallel.world_size=1), a matrix axis "
                        "(matrix.model.checkpoint=[0,1]; [] drops it) or name=...; VALUE is YAML")
    p.add_argument("--filter", metavar="REGEX", help="keep cells whose id matches (regex, or substring)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and exit (skips GPU/NVML checks)")
    p.add_argument("--max-cells", type=_positive_int, default=MAX_CELLS, metavar="N",
                   help="refuse a sweep of more than N cells before expanding it (default %(default)s)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="run the cells of RUN_DIR that have no ok record, with its saved config")
    p.add_argument("--retry", type=_statuses, default=RETRYABLE, metavar="STATUS[,STATUS]",
                   help="with --resume: re-run cells whose newest status is one of these "
                        f"(default {','.join(RETRYABLE)}); cells never run always run")
    p.add_argument("--grace-s", type=float, default=GRACE_S, metavar="S",
                   help="on SIGTERM, stop the running cell and exit within S seconds (default 30)")
    p.add_argument("--results-dir", type=Path, default=Path("results"), help="where run folders go (results/)")
    p.add_argument("--run-name", metavar="NAME",
                   help="the run folder is RESULTS_DIR/NAME, not <UTC time>_<config name> (a Slurm job's id: "
                        "requeued, the job resumes it, configs/slurm/nightly.sbatch)")
    p.add_argument("--link-profile", type=Path, metavar="RUN_DIR",
                   help="a run with collectives cells (docs/collectives.md): training cells record their "
                        "communication roofline from its tables")
    p.add_argument("--hardware", type=Path, metavar="FILE",
                   help="hardware file each record's metrics.plan predicts on (docs/plan.md; default: the shipped "
                        "configs/hardware file matching the recorded GPU, else metrics.plan says why it is missing)")
    p.add_argument("--torchrun-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG to torchrun, e.g. --torchrun-arg=--nnodes=2 "
                        "--torchrun-arg=--rdzv-endpoint=host:29500 (default: --standalone)")
    several = p.add_argument_group("several nodes (docs/nodes.md; inside a Slurm step none of these is needed)")
    several.add_argument("--nnodes", type=int, help="how many nodes run this same command")
    several.add_argument("--node-rank", type=int, help="this node's rank, 0..nnodes-1; node 0 owns the run folder")
    several.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                         help="node 0's address and a free port: its runner hosts torch's c10d store there")
    several.add_argument("--rdzv-timeout", type=float, default=DEFAULT_RDZV_TIMEOUT_S, metavar="S",
                         help="how long a cell waits for every node before it fails (default %(default)gs)")
    several.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="S",
                         help="a node not heard from for S seconds is lost: its cell fails, or the runner "
                              "that lost node 0 exits (default %(default)gs)")
    return p


RETRYABLE = ("failed", "timeout", "interrupted")
GRACE_S = 30.0  # default --grace-s: what a scheduler usually leaves between SIGTERM and SIGKILL


def _max_cells(args: argparse.Namespace) -> int:
    # Callers that build their own Namespace (run_bench.py nightly) may not carry --max-cells.
    return int(getattr(args, "max_cells", MAX_CELLS))


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int >= 1")
    return int(text)


def _statuses(text: str) -> tuple[str, ...]:
    wanted = tuple(s.strip() for s in text.split(",") if s.strip())
    if not wanted or any(s not in RETRYABLE for s in wanted):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(RETRYABLE)}")
    return wanted


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return int(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]))
    args = _parser().parse_args(argv)
    try:
        return _run(args, [sys.executable, sys.argv[0], *argv])
    except ConfigError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        return 2
    except runner.RunRefused as exc:
        print(exc, file=sys.stderr)
        return 2


def _options(args: argparse.Namespace) -> LaunchOptions:
    if args.grace_s <= 0:
        raise ConfigError([f"--grace-s {args.grace_s:g}: expected a number of seconds > 0"])
    if args.retry != RETRYABLE and args.resume is None:
        raise ConfigError(["--retry: only with --resume RUN_DIR"])
    if getattr(args, "run_name", None) is not None and args.resume is not None:
        raise ConfigError(["--run-name: names a new run folder; --resume RUN_DIR continues one, drop one of them"])
    for flag, value in (("--rdzv-timeout", args.rdzv_timeout), ("--heartbeat-timeout", _heartbeat_timeout(args))):
        if not value > 0:
            raise ConfigError([f"{flag} {value:g}: expected a number of seconds > 0"])
    try:
        # Half the grace period for the job to stop on SIGTERM, the rest for the summary.
        return LaunchOptions(torchrun_args=tuple(args.torchrun_arg),
                             worker_module=os.environ.get(WORKER_ENV, DEFAULT_WORKER),
                             kill_grace_s=min(LaunchOptions.kill_grace_s, args.grace_s / 2))
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


def _heartbeat_timeout(args: argparse.Namespace) -> float:
    # `nightly` builds its own Namespace of sweep options, without the several-node ones.
    return getattr(args, "heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT_S)


def _run(args: argparse.Namespace, command_line: list[str]) -> int:
    return run_sweep(args, command_line)[0]


def run_sweep(args: argparse.Namespace, command_line: list[str]) -> tuple[int, Path | None]:
    """Run (or resume) the sweep the parsed arguments name: (exit code, run folder; None on --dry-run)."""
    opts = _options(args)
    spec = None if args.dry_run else nodes.resolve(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_timeout,
                                                   _heartbeat_timeout(args))
    if spec is not None:
        nodes.check_options(opts.torchrun_args)
        opts = dataclasses.replace(opts, torchrun_args=(f"--nnodes={spec.nnodes}", *opts.torchrun_args))
    if args.link_profile is not None and (spec is None or spec.is_head) and not roofline.load_curves(args.link_profile):
        why = (f"--link-profile {args.link_profile}: no ok collectives cell in {args.link_profile / 'results.jsonl'}"
               "; allowed: a run folder of a collectives config")
        raise ConfigError([why])
    if args.hardware is not None:  # a bad file is refused before any cell runs
        from bench.plan.hardware import load_hardware

        try:
            load_hardware(args.hardware)
        except ValueError as exc:
            raise ConfigError([f"--hardware: {line}" for line in str(exc).splitlines()]) from None
    host = None if args.dry_run else probe_host(opts.nnodes)
    if spec is not None:
        return _run_on_nodes(args, spec, opts, host, command_line)
    if args.resume is not None:
        return _resume(args, host, opts)
    bench = load_config(args.config, args.set, args.filter, host, _max_cells(args))
    if args.dry_run:
        _print_cells(bench, list(bench.cells))
        return 0, None
    run_dir = _new_run_dir(args, bench)
    with runner.claimed(run_dir) as claim:
        runner.prepare(run_dir, bench, command_line, nnodes=opts.nnodes)
        return _sweep(args, run_dir, bench, list(bench.cells), replace(opts, run_token=claim.token))


def _new_run_dir(args: argparse.Namespace, bench: BenchConfig) -> Path:
    if getattr(args, "run_name", None) is not None:  # `nightly` builds its own Namespace, without it
        return runner.named_run_dir(args.results_dir, args.run_name)
    try:
        return runner.new_run_dir(args.results_dir, bench.name)
    except OSError as exc:
        raise runner.RunRefused(f"{args.results_dir}: cannot create a run folder there ({exc.strerror or exc})") from None


def _resume(args: argparse.Namespace, host: object, opts: LaunchOptions) -> tuple[int, Path | None]:
    run_dir: Path = args.resume
    bench = _resumed_config(args, host)
    if args.dry_run:  # reads only: the lock, the torn tail and the leftovers are left alone
        _print_cells(bench, _to_rerun(args, bench, None))
        return 0, None
    with runner.claimed(run_dir) as claim:
        cells = _to_rerun(args, bench, claim.torn_cell)
        return _sweep(args, run_dir, bench, cells, replace(opts, run_token=claim.token))


def _sweep(args: argparse.Namespace, run_dir: Path, bench: BenchConfig, cells: list[Cell],
           opts: LaunchOptions) -> tuple[int, Path]:
    print(f"{bench.name}: {len(cells)} cell(s) -> {run_dir}", flush=True)
    code = runner.run_cells(run_dir, cells, opts, link_profile=args.link_profile, grace_s=args.grace_s,
                            plan_hardware=args.hardware)
    try:
        print(report.write_summary(run_dir))
    except OSError as exc:
        print(f"summary not written: {exc}", file=sys.stderr)
        return code or runner.EXIT_UNWRITABLE, run_dir
    print(f"results: {run_dir}  (summary.md, results.csv, results.jsonl)", flush=True)
    return code, run_dir


def _run_on_nodes(args: argparse.Namespace, spec: nodes.NodeSpec, opts: LaunchOptions, host: object,
                  command_line: list[str]) -> tuple[int, Path | None]:
    """Node 0 plans and claims the folder, as one node would; the others take its plan (multinode.py)."""
    held = contextlib.ExitStack()

    def head_plan() -> tuple[Path, list[Cell]]:
        nonlocal opts
        if args.resume is not None:
            bench = _resumed_config(args, host)
            claim = held.enter_context(runner.claimed(args.resume))  # lock, leftovers, torn tail, probe
            opts = replace(opts, run_token=claim.token)
            return args.resume, _to_rerun(args, bench, claim.torn_cell)
        bench = load_config(args.config, args.set, args.filter, host, _max_cells(args))  # type: ignore[arg-type]
        try:
            run_dir = _new_run_dir(args, bench)
        except runner.RunRefused as exc:  # as a config error, so the other nodes hear of it too
            raise ConfigError([str(exc)]) from None
        opts = replace(opts, run_token=held.enter_context(runner.claimed(run_dir)).token)
        runner.prepare(run_dir, bench, command_line, nnodes=spec.nnodes)
        return run_dir, list(bench.cells)

    def sweep(run_dir: Path, cells: list[Cell], launcher: Callable[..., Outcome]) -> int:
        link = args.link_profile if spec.is_head else None
        return runner.run_cells(run_dir, cells, opts, link_profile=link, grace_s=args.grace_s, launcher=launcher,
                                plan_hardware=args.hardware)

    def summarize(run_dir: Path) -> None:
        print(report.write_summary(run_dir))
        print(f"results: {run_dir}  (summary.md, results.csv, results.jsonl)", flush=True)

    from bench.sweep import multinode, roll_call  # torch.distributed's store: only a several-node sweep needs it

    saved = args.resume / "config.yaml" if args.resume is not None else args.config
    config_id = roll_call.config_identity(saved, args.set, args.filter)
    with held:
        return multinode.run(spec, args.results_dir, head_plan, sweep, summarize, config_id), None


def _resumed_config(args: argparse.Namespace, host: object) -> BenchConfig:
    run_dir: Path = args.resume
    if args.config is not None or args.set:
        raise ConfigError([f"--resume {run_dir}: re-uses the run's saved config.yaml; drop CONFIG and --set"])
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / "cells.json").is_file():
        raise ConfigError([f"--resume {run_dir}: not a run folder (no config.yaml / cells.json)"])
    return load_config(saved, None, args.filter, host, _max_cells(args))  # type: ignore[arg-type]


def _to_rerun(args: argparse.Namespace, bench: BenchConfig, torn_cell: str | None) -> list[Cell]:
    """The run's cells never run, those whose newest status is in --retry, and a torn one."""
    run_dir: Path = args.resume
    results = run_dir / runner.RESULTS
    try:  # the strict reader: a bad line in the middle is an error naming FILE:LINE
        newest = {c: r.get("status") for c, r in load_records(results).items()} if results.exists() else {}
    except RecordError as exc:
        raise ConfigError([f"--resume: {exc}"]) from None
    wanted = set(runner.saved_cell_ids(run_dir))
    cells = [c for c in bench.cells if c.id in wanted and
             (c.id not in newest or newest[c.id] in args.retry or c.id == torn_cell)]
    counts: dict[str, int] = {}
    for cell, status in newest.items():
        if cell in wanted:
            counts[str(status)] = counts.get(str(status), 0) + 1
    held = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"resume {run_dir}: {counts.get('ok', 0)} cell(s) ok, {len(cells)} to run"
          + (f" (recorded: {held}; retrying {','.join(args.retry)})" if held else ""), flush=True)
    return cells


def _print_cells(bench: BenchConfig, cells: list[Cell]) -> None:
    def show(value: object) -> str:  # as YAML writes it: false, not False
        return json.dumps(value) if isinstance(value, bool) or value is None else str(value)

    rows = [[c.id, *(show(c.swept.get(k, "-")) for k in bench.swept_keys), c.config.parallel.world_size] for c in cells]
    print(tabulate(rows, headers=["cell", *bench.swept_keys, "ranks"], disable_numparse=True))
    print(f"{len(cells)} cell(s) from {bench.source}; dry run: GPU count and NVML were not checked", flush=True)
