"""The sweep: one torchrun job per cell, one record per cell the moment it ends, progress as it goes.

A results folder is complete at every instant: config.yaml, cells.json and env.json are written
before the first cell starts and results.jsonl gains an fsync'ed line per finished cell, so a
crash or Ctrl-C loses at most the cell that was running, and --resume picks up from there.

A runner claims its folder first (claimed(): the lock, what a dead runner left, a torn tail, a
probe write); SIGTERM (a scheduler's time limit) or SIGUSR1 (Slurm's warning before it) stops the running
cell's job, records the cell as interrupted and writes the summary within --grace-s. docs/runs.md tells the story.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from bench.config.matrix import BenchConfig, Cell
from bench.metrics import phases, roofline
from bench.metrics.collectives_spec import table_of
from bench.plan import record as plan_record
from bench.results.records import SCHEMA_VERSION, append_record
from bench.results.torn import set_torn_tail_aside
from bench.sweep import env_info, lock, references
from bench.sweep.pool import WorkerPool, grouped
from bench.sweep.launch import REPO_ROOT, CellPaths, Interrupted, LaunchOptions, Outcome, launch
from bench.sweep.processes import RUN_ENV, end_leftovers, kill_me_after
from bench.sweep.zygote import Zygote

EXIT_OK, EXIT_FAILED_CELLS, EXIT_UNWRITABLE, EXIT_INTERRUPTED = 0, 1, 3, 130
PROBE_BYTES = 64 << 10  # room for a few records and logs, or the run refuses to start
RESULTS = "results.jsonl"


class RunRefused(Exception):
    """The run folder cannot be used (held by another runner, not writable); str() says why."""


@dataclass(frozen=True)
class Claim:
    token: str  # goes into every job's environment (bench/sweep/processes.py)
    torn_cell: str | None  # the cell whose record a crash cut short: run it again


def new_run_dir(results_dir: Path, name: str, now: datetime | None = None) -> Path:
    """results/<UTC YYYYmmdd-HHMMSS>_<name>/, with -2, -3... if two runs start in one second."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    base = results_dir / f"{stamp}_{name}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def named_run_dir(results_dir: Path, name: str) -> Path:
    """results/<name>/ exactly (--run-name: a Slurm job names its folder after its id, so the job,
    requeued, finds it again); refused when it already holds a run, which --resume continues."""
    if not name or "/" in name or name.startswith(".") or name in ("..", "."):
        raise RunRefused(f"--run-name {name!r}: expected a folder name (no '/', not starting with '.')")
    path = results_dir / name
    if (path / "cells.json").exists():
        raise RunRefused(f"{path}: already holds a run; continue it with --resume {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)  # an empty one is a start cut short before prepare()
    except OSError as exc:
        raise RunRefused(f"{results_dir}: cannot create a run folder there ({exc.strerror or exc})") from None
    return path


def prepare(run_dir: Path, bench: BenchConfig, command_line: list[str], nnodes: int = 1) -> None:
    """What --resume and the reports need, written before any cell runs."""
    doc = {"name": bench.name, **bench.doc}
    (run_dir / "config.yaml").write_text(f"# from {bench.source}\n" + yaml.safe_dump(doc, sort_keys=False))
    cells = [{"cell": c.id, "swept": c.swept, "config": c.config.to_dict()} for c in bench.cells]
    (run_dir / "cells.json").write_text(json.dumps(cells, indent=1) + "\n")
    env = {**env_info.collect(command_line), "nnodes": nnodes}  # the history keeps the node count per run
    (run_dir / "env.json").write_text(json.dumps(env, indent=1) + "\n")


def saved_cell_ids(run_dir: Path) -> list[str]:
    return [c["cell"] for c in json.loads((run_dir / "cells.json").read_text())]


def probe_write(run_dir: Path) -> None:
    """Fail now, not after the first cell, when the folder is read-only or the disk is full."""
    probe = run_dir / ".write-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
        os.close(os.open(run_dir / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    except OSError as exc:
        raise RunRefused(f"{run_dir}: results cannot be written there ({exc.strerror or exc}); "
                         f"free some space or choose another --results-dir") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


@contextlib.contextmanager
def claimed(run_dir: Path, out: TextIO = sys.stdout) -> Iterator[Claim]:
    """Hold the run folder for one runner: take its lock, end what a dead runner of it left on
    this host, set a torn last record aside, and check that it can be written."""
    try:
        held, previous = lock.acquire(run_dir)
    except lock.RunLocked as exc:
        raise RunRefused(str(exc)) from None
    except OSError as exc:
        raise RunRefused(f"{run_dir}: results cannot be written there ({exc.strerror or exc})") from None
    try:
        if ended := end_leftovers(run_dir, held.token):
            print(f"ended {len(ended)} process(es) left by runner pid {previous.get('pid', '?')}: "
                  f"{' '.join(map(str, ended))}", file=out, flush=True)
        torn = None
        try:
            if moved := set_torn_tail_aside(run_dir / RESULTS):
                torn = moved[0]
                print(f"{torn.path}:{torn.line}: torn tail ({len(torn.data)} bytes) moved to {moved[1].name}; "
                      f"cell {torn.cell or '(unreadable)'} runs again", file=out, flush=True)
        except OSError as exc:
            raise RunRefused(f"{run_dir}: cannot set the torn tail of {RESULTS} aside ({exc})") from None
        probe_write(run_dir)
        yield Claim(held.token, torn.cell if torn else None)
    finally:
        held.release()


def make_record(run_dir: Path, cell: Cell, started_utc: str, outcome: Outcome) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "run": run_dir.name, "cell": cell.id, "status": outcome.status,
            "swept": cell.swept, "config": cell.config.to_dict(), "metrics": outcome.metrics,
            "error": outcome.error, "warnings": list(outcome.warnings), "started_utc": started_utc,
            "wall_s": round(outcome.wall_s, 3)}


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress(outcome: Outcome, elapsed: float, durations: list[float], left: int) -> str:
    """'ok 12.3s (elapsed 1m02s, ~2m10s left)'; the ETA is the mean cell time so far."""
    eta = f", ~{fmt_duration(sum(durations) / len(durations) * left)} left" if left else ""
    reason = f": {outcome.error['reason']}" if outcome.error else ""
    reason += "".join(f" (warning: {w})" for w in outcome.warnings)
    return f"{outcome.status} {outcome.wall_s:.1f}s{reason} (elapsed {fmt_duration(elapsed)}{eta})"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: Slurm's --signal warning before the time limit


@contextlib.contextmanager
def _sigterm_as_interrupt(grace_s: float) -> Iterator[None]:
    """A batch scheduler cancels with SIGTERM (or warns with SIGUSR1 before the time limit,
    configs/slurm/nightly.sbatch), then SIGKILLs after its own grace period: stop the cell
    (launch turns this into an interrupted record) and leave within `grace_s`. A watchdog
    makes the deadline hard (SIGKILL, exit 137); what it cuts short, --resume repairs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        kill_me_after(grace_s)
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def write_cell_inputs(paths: CellPaths, cell: Cell, curves: list[roofline.Curve],
                      shared: dict[str, Any] | None = None) -> None:
    """The worker's inputs: the cell's config, the loss reference it computes or reuses
    (bench/sweep/references.py) and, for a training cell, the link curves its metrics.roofline
    is computed from (this run's collectives cells, then --link-profile's)."""
    paths.config.parent.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(json.dumps(cell.config.to_dict(), indent=1) + "\n")
    references.write_input(paths.config.parent, shared)
    links = paths.config.parent / roofline.LINKS_FILE
    if cell.config.run.kind == "training" and curves:
        links.write_text(json.dumps(roofline.curves_to_json(curves)) + "\n")
    else:
        links.unlink(missing_ok=True)


def run_cells(run_dir: Path, cells: list[Cell], opts: LaunchOptions, out: TextIO = sys.stdout,
              link_profile: Path | None = None, grace_s: float = 30.0,
              launcher: Callable[..., Outcome] = launch, plan_hardware: Path | None = None) -> int:
    """Run each cell in turn, whatever happens to the others; return the exit code of the sweep.
    `launcher` runs one cell: launch() on one node, bench/sweep/lockstep.py's on several.
    `plan_hardware`: the hardware file each record's metrics.plan predicts on (bench/plan/record.py)."""
    linked = roofline.load_curves(link_profile) if link_profile is not None else []
    plan = plan_record.choose(run_dir, plan_hardware)
    # Collectives cells first, so the training cells after them get a roofline from this run.
    # Then each reference's host cell ahead of its key (references.py), with reused workers one
    # world size after another (pool.py).
    cells = references.hosts_first(grouped(sorted(cells, key=lambda c: c.config.run.kind != "collectives")))
    start, durations, failed = time.monotonic(), [], 0
    # Each job's torchrun a fork of one launcher (zygote.py), which carries the run's token too.
    starter = Zygote(run_dir.resolve(), dict(os.environ, **({RUN_ENV: opts.run_token} if opts.run_token else {})),
                     REPO_ROOT)
    opts = replace(opts, starter=starter)
    pool = WorkerPool(run_dir, opts)
    with _sigterm_as_interrupt(grace_s), contextlib.closing(starter), contextlib.closing(pool):
        try:
            for k, cell in enumerate(cells, 1):
                print(f"[{k}/{len(cells)}] {cell.id} ...", end=" ", file=out, flush=True)
                reuse = cell.config.run.reuse_workers and launcher is launch  # one node only
                outcome = _run_one(run_dir, cell, opts, linked, pool.launch if reuse else launcher, plan)
                durations.append(outcome.wall_s)
                failed += outcome.status != "ok"
                print(progress(outcome, time.monotonic() - start, durations, len(cells) - k), file=out, flush=True)
                if (table := table_of(outcome.metrics)) is not None:
                    print(table, file=out, flush=True)
                if outcome.interrupted:
                    return EXIT_INTERRUPTED
        except KeyboardInterrupt:  # between cells, when no job is running to kill
            print("interrupted", file=out, flush=True)
            return EXIT_INTERRUPTED
        except OSError as exc:  # the disk filled up, the folder went read-only
            print(f"\nstopped: cannot write to {run_dir} ({exc}); the records before this cell are intact",
                  file=out, flush=True)
            return EXIT_UNWRITABLE
    return EXIT_FAILED_CELLS if failed else EXIT_OK


def _run_one(run_dir: Path, cell: Cell, opts: LaunchOptions, linked: list[roofline.Curve],
             launcher: Callable[..., Outcome], plan: plan_record.Choice) -> Outcome:
    begun = time.monotonic()
    paths = CellPaths.under(run_dir, cell.id)
    shared = references.instruction(run_dir, cell)
    write_cell_inputs(paths, cell, roofline.load_curves(run_dir, canaries=False) + linked, shared)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    outcome = launcher(cell.config, paths, opts)
    references.keep(run_dir, shared, outcome.metrics)
    phases.complete(outcome.metrics, outcome.job_s if outcome.job_s is not None else outcome.wall_s)
    record = make_record(run_dir, cell, started, outcome)
    if isinstance(record["metrics"], dict):  # after the outcome, outside the worker's timed path
        record["metrics"]["plan"] = plan_record.entry(cell.config, record["metrics"], plan)
    record["runner_overhead_s"] = round(max(0.0, time.monotonic() - begun - outcome.wall_s), 4)
    append_record(run_dir / RESULTS, record)
    return outcome
