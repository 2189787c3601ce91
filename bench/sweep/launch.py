"""One cell as one torchrun job: the command, the kill on timeout, and why it failed.

torchrun puts every worker in a session of its own, so killing torchrun's process group is
not enough when it is itself stuck or killed: the workers it started are found first and
killed by id afterwards. The job also dies with the runner (a parent-death signal) and carries
the run's lock token in its environment, so a later runner can find what a dead one left
(bench/sweep/processes.py).

Each launch is one attempt of the cell: its torchrun.log and rank logs gain a marked line
"==== attempt N ... ====" first, and error tails are read from the last such line on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Union

from bench.config.cell import CellConfig
from bench.metrics.phases import LAUNCHED_ENV
from bench.sweep import hang
from bench.sweep.zygote import ForkedJob
from bench.sweep.processes import RUN_ENV, kill_tree, shielded, start_process

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORKER = "bench.worker"
TORCHRUN = "bench.sweep.torchrun"  # torchrun itself, without its interpreter's slow shutdown
TAIL_LINES = 40
# Any of these means the user chose how ranks meet; without them a single node is assumed.
_RDZV = ("--standalone", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend",
         "--master-addr", "--master_addr", "--master-port", "--master_port")
_OOM = ("OutOfMemoryError", "CUDA out of memory")


@dataclass(frozen=True)
class LaunchOptions:
    torchrun_args: tuple[str, ...] = ()  # passed to torchrun as given, e.g. --nnodes=2
    worker_module: str = DEFAULT_WORKER
    python: str = sys.executable
    kill_grace_s: float = 10.0  # SIGTERM, then this long, then SIGKILL
    run_token: str = ""  # the run lock's token, put in the job's environment as RUN_ENV
    starter: Any = field(default=None, compare=False)  # the sweep's zygote.Zygote: torchrun forked, not started

    def __post_init__(self) -> None:
        if any(a.split("=")[0] in ("--nproc-per-node", "--nproc_per_node") for a in self.torchrun_args):
            raise ValueError("--torchrun-arg: --nproc-per-node is set from parallel.world_size / nnodes")
        self.nnodes  # noqa: B018 -- parse now, so a bad --nnodes fails before any cell runs

    @property
    def nnodes(self) -> int:
        args = list(self.torchrun_args)
        for i, arg in enumerate(args):
            name, eq, value = arg.partition("=")
            if name in ("--nnodes",):
                value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
                lo, _, hi = value.partition(":")
                if not lo.isdigit() or (hi and hi != lo) or int(lo) < 1:
                    raise ValueError(f"--torchrun-arg --nnodes={value}: expected a fixed node count such as 2")
                return int(lo)
        return 1


@dataclass(frozen=True)
class CellPaths:
    config: Path  # what the worker reads
    result: Path  # what rank 0 writes on success
    log_dir: Path  # rank<r>.log from the worker, torchrun.log from us

    @classmethod
    def under(cls, run_dir: Path, cell_id: str) -> CellPaths:
        cell_dir = run_dir.resolve() / "cells" / cell_id
        return cls(cell_dir / "config.json", cell_dir / "result.json", run_dir.resolve() / "logs" / cell_id)

    @property
    def torchrun_log(self) -> Path:
        return self.log_dir / "torchrun.log"


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | failed | timeout | interrupted
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    wall_s: float
    warnings: tuple[str, ...] = ()
    job_s: float | None = None  # this node's job alone, start to exit (wall_s may add coordination)

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status
        assert (self.status == "ok") == (self.error is None), "an error goes with a failure only"

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


STATUSES = ("ok", "failed", "timeout", "interrupted")
Job = Union["subprocess.Popen[bytes]", ForkedJob]  # what start_job returns: pid, wait, poll, returncode
ATTEMPT_MARK = "==== attempt "


class Interrupted(KeyboardInterrupt):
    """Raised in the runner by a signal handler; `signame` says which signal (SIGTERM, SIGINT)."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def torchrun_command(world_size: int, opts: LaunchOptions, worker_module: str) -> list[str]:
    """torchrun with this node's share of `world_size` ranks, up to the worker module."""
    passthrough = list(opts.torchrun_args)
    if not any(a.split("=")[0] in _RDZV for a in passthrough):
        passthrough.insert(0, "--standalone")
    return [opts.python, "-m", TORCHRUN, f"--nproc-per-node={world_size // opts.nnodes}", *passthrough,
            "-m", worker_module]


def command(cell: CellConfig, paths: CellPaths, opts: LaunchOptions) -> list[str]:
    return [*torchrun_command(cell.parallel.world_size, opts, opts.worker_module), "--cell-config",
            str(paths.config), "--out", str(paths.result), "--log-dir", str(paths.log_dir)]


def environment(cell: CellConfig, opts: LaunchOptions) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[LAUNCHED_ENV] = repr(time.time())  # the worker's launch_to_first_line (bench/metrics/phases.py)
    if opts.run_token:
        env[RUN_ENV] = opts.run_token
    if cell.run.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Share the cores between this node's ranks instead of every rank spinning on all of them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (cell.parallel.world_size // opts.nnodes)))
    if cell.run.device == "cpu":
        # Busy-waiting OpenMP threads lose their core to any other process and stall the step
        # (seen here: 1.6 s instead of 0.25 s per step on a loaded 2-core machine); passive
        # waiting keeps CPU figures sane when the machine is not idle.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def start_attempt(cell: CellConfig, paths: CellPaths, opts: LaunchOptions, how: str | None = None) -> str:
    """Mark a new attempt in torchrun.log and this node's rank logs; return the marked line.
    Earlier attempts' lines stay above it. `how`: what runs the cell, when not its own command."""
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    attempt = 1 + sum(line.startswith(ATTEMPT_MARK) for line in _read(paths.torchrun_log).splitlines())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    mark = f"{ATTEMPT_MARK}{attempt} of {paths.log_dir.name}, {stamp} ===="
    for r in range(cell.parallel.world_size // opts.nnodes):
        _append_line(paths.log_dir / f"rank{r}.log", mark)
    _append_line(paths.torchrun_log, f"{mark}\n{how or '$ ' + ' '.join(command(cell, paths, opts))}")
    return mark


def _append_line(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(("\n" if f.tell() else "") + text + "\n")  # a blank line between attempts


def start_job(cmd: list[str], env: dict[str, str], log: IO[str], starter: Any = None) -> Job:
    """The job's torchrun: a fork of the sweep's launcher (bench/sweep/zygote.py) when there is one."""
    forkable = starter is not None and cmd[:3] == [sys.executable, "-m", TORCHRUN]
    return start_process(cmd, env, log, REPO_ROOT, starter if forkable else None, cmd[3:])


def launch(cell: CellConfig, paths: CellPaths, opts: LaunchOptions) -> Outcome:
    """Run the cell's torchrun job to its end, its timeout, or an interrupt (status interrupted)."""
    paths.result.unlink(missing_ok=True)  # a result left by an earlier attempt must not count
    hang.clear(paths)
    start_attempt(cell, paths, opts)
    start = time.monotonic()
    with open(paths.torchrun_log, "a") as log:
        proc = start_job(command(cell, paths, opts), environment(cell, opts), log, opts.starter)
        try:
            proc.wait(timeout=cell.run.timeout_s)
        except subprocess.TimeoutExpired:
            with shielded():
                collecting = time.monotonic()
                ranks = hang.collect(paths, live=True)  # what every rank was doing, before the kill
                if opts.nnodes > 1:
                    hang.hold_for_peers(collecting)  # the other nodes' ranks may still be dumping
                kill_tree(proc, opts.kill_grace_s)
            error = failure(paths, None, f"timeout after {cell.run.timeout_s:g}s")
            error = hang.explain(paths, error, ranks, timed_out=True, rewrite=opts.nnodes == 1)
            return Outcome("timeout", None, error, time.monotonic() - start)
        except KeyboardInterrupt as exc:
            with shielded():
                kill_tree(proc, opts.kill_grace_s)
            signame = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
            return Outcome("interrupted", None, failure(paths, None, f"interrupted by {signame}"),
                           time.monotonic() - start)
    wall = time.monotonic() - start
    return replace(judge(paths, proc.returncode, wall, opts.nnodes), job_s=wall)


def judge(paths: CellPaths, returncode: int, wall: float, nnodes: int = 1) -> Outcome:
    """The outcome of a job that ended by itself, from its exit status and result.json."""
    if returncode != 0:
        metrics, reason = judged_result(paths.result)
        if reason is None and (agreed := agreed_result(paths.result)) is not None:
            # Every rank passed the final barrier after the result was written: a crash after
            # that (gloo's teardown abort) costs nothing measured; say so and keep the result.
            why = failure(paths, returncode, None)["reason"]
            return Outcome("ok", agreed, None, wall, (f"{why} after every rank agreed on the result",))
        error = hang.explain(paths, failure(paths, returncode, reason), hang.collect(paths, live=False),
                             timed_out=False, rewrite=nnodes == 1)  # a lost rank: where the others were
        return Outcome("failed", metrics, error, wall)
    metrics, problem = read_result(paths.result)
    if problem:
        return Outcome("failed", None, failure(paths, 0, problem), wall)
    return Outcome("ok", metrics, None, wall)


def agreed_result(path: Path) -> dict[str, Any] | None:
    """The metrics of a result.json that every rank confirmed (bench/worker/finish.py), else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("agreed_by_ranks"), int) and doc.get("error") is None
    return doc["metrics"] if ok and isinstance(doc.get("metrics"), dict) else None


def read_result(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        metrics = json.loads(path.read_text()).get("metrics")
    except (OSError, ValueError, AttributeError) as exc:
        return None, f"exited 0 but rank 0 left no readable result.json ({type(exc).__name__})"
    if not isinstance(metrics, dict):
        return None, "exited 0 but result.json has no 'metrics' mapping"
    return metrics, None


def judged_result(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A worker that fails its own cell (a collectives check) leaves result.json with its metrics
    and an `error` string before exiting non-zero: both go into the record. (None, None) otherwise."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
        return None, None
    return (doc["metrics"] if isinstance(doc.get("metrics"), dict) else None), doc["error"]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log's newest attempt (after its last attempt mark)."""
    text = _read(path)
    cut = text.rfind(ATTEMPT_MARK)
    if cut >= 0:
        text = text[text.find("\n", cut) + 1 if text.find("\n", cut) >= 0 else len(text):]
    return "\n".join(text.splitlines()[-lines:])


def failure(paths: CellPaths, exit_code: int | None, reason: str | None) -> dict[str, Any]:
    """The record's `error`: reason, exit code, failing rank and the tail of the best log."""
    torchrun_text = tail(paths.torchrun_log, 400)
    rank, rank_code = _root_cause(torchrun_text)
    rank_log = paths.log_dir / f"rank{rank if rank is not None else 0}.log"
    log = rank_log if tail(rank_log) else paths.torchrun_log
    if reason is None and any(m in tail(log) + torchrun_text for m in _OOM):
        reason = "out of memory" + (f" on rank {rank}" if rank is not None else "")
    elif reason is None:
        reason = _reason(rank, rank_code, exit_code)
    return {"reason": reason, "exit_code": rank_code if rank_code is not None else exit_code, "rank": rank,
            "log_file": str(log.relative_to(paths.log_dir.parent.parent)), "log_tail": tail(log)}


def _root_cause(text: str) -> tuple[int | None, int | None]:
    """Failing rank and its exit code from torchrun's ChildFailedError report."""
    section = text.rpartition("Root Cause")[2]
    rank = re.search(r"^\s*rank\s*:\s*(\d+)", section, re.M)
    code = re.search(r"^\s*exitcode\s*:\s*(-?\d+)", section, re.M)
    return (int(rank.group(1)) if rank else None), (int(code.group(1)) if code else None)


def _reason(rank: int | None, rank_code: int | None, exit_code: int | None) -> str:
    who, code = (f"rank {rank}", rank_code) if rank is not None and rank_code is not None else ("torchrun", exit_code)
    if code is not None and code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"{who} killed by signal {-code}{name}"
    hint = " (128+9: SIGKILL, often the kernel OOM killer)" if code == 137 else ""
    return f"{who} exited with code {code}{hint}"
