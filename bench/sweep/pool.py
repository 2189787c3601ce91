"""run.reuse_workers: the cells of one world size and device, in turn, in one torchrun job.

`WorkerPool.launch` has launch()'s signature and outcome. The job (bench/worker/pool.py) lives
in RUN_DIR/pool/<name>/: its torchrun.log, a task-<k>.json per cell, written here, and a
done-<k>.rank<r> per rank and cell, written there. One job at a time: a cell of another world
size or device, a failed, timed-out or interrupted cell, or the end of the sweep ends it
(the runner groups the cells by world size first, so each size starts one job). What a cell
sees of the job's torchrun.log while it ran is copied into its own logs/<cell>/torchrun.log
when the job dies under it, so its record's reason and log tail read as a fresh job's would.
One node only (bench/config/checks.py says so before anything runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.config.cell import CellConfig
from bench.config.matrix import Cell
from bench.sweep.launch import (CellPaths, Interrupted, LaunchOptions, Outcome, environment, failure, judge,
                                start_attempt, start_job, torchrun_command)
from bench.sweep.launch import Job as Process
from bench.sweep.processes import kill_tree, shielded

POOL_WORKER = "bench.worker.pool"
POLL_S = 0.01
STOP_WAIT_S = 10.0  # a job told to stop that is still there after this is killed


def pool_key(config: CellConfig) -> tuple[int, str]:
    return config.parallel.world_size, config.run.device


def grouped(cells: list[Cell]) -> list[Cell]:
    """With any cell reusing workers: the cells of one pool key together, keys in order of first
    appearance, each key's cells in their own order. Otherwise the cells as they are."""
    if not any(c.config.run.reuse_workers for c in cells):
        return cells
    first: dict[tuple[int, str], int] = {}
    for i, c in enumerate(cells):
        first.setdefault(pool_key(c.config), i)
    return sorted(cells, key=lambda c: first[pool_key(c.config)])


@dataclass
class Job:
    key: tuple[int, str]
    proc: Process  # a Popen or a forked torchrun (bench/sweep/launch.py Job)
    folder: Path
    launched_at: float  # time.time() at its start: the first cell's launch_to_first_line
    tasks: int = 0

    @property
    def log(self) -> Path:
        return self.folder / "torchrun.log"


class WorkerPool:
    def __init__(self, run_dir: Path, opts: LaunchOptions) -> None:
        self.root = run_dir.resolve() / "pool"
        self.opts = opts
        self.job: Job | None = None

    def launch(self, cell: CellConfig, paths: CellPaths, opts: LaunchOptions) -> Outcome:
        """The cell in the current job (a new one when there is none for its key)."""
        if self.job is not None and (self.job.key != pool_key(cell) or self.job.proc.poll() is not None):
            self.close()
        begun = time.monotonic()
        job = self.job or self._start(cell, opts)
        self.job = job
        paths.result.unlink(missing_ok=True)
        start_attempt(cell, paths, opts, how=f"$ (task {job.tasks} of the reused worker job "
                                              f"{job.folder.name}, pid {job.proc.pid}: {job.log})")
        offset = job.log.stat().st_size
        k = job.tasks
        job.tasks += 1
        launched_at = job.launched_at if k == 0 else time.time()
        _write_task(job.folder, k, {"cell_config": str(paths.config), "out": str(paths.result),
                                    "log_dir": str(paths.log_dir), "launched_at": launched_at})
        outcome = self._wait(job, k, cell, paths, begun, offset)
        if outcome.status != "ok" or outcome.warnings:
            self.close()  # a fresh job after any failure
        return outcome

    def _start(self, cell: CellConfig, opts: LaunchOptions) -> Job:
        world, device = pool_key(cell)
        n = 1
        while (folder := self.root / f"ws{world}-{device}-{n}").exists():
            n += 1
        folder.mkdir(parents=True)
        cmd = [*torchrun_command(world, opts, POOL_WORKER), "--pool-dir", str(folder)]
        with open(folder / "torchrun.log", "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            launched_at = time.time()
            proc = start_job(cmd, environment(cell, opts), log, opts.starter)
        return Job((world, device), proc, folder, launched_at)

    def _wait(self, job: Job, k: int, cell: CellConfig, paths: CellPaths, begun: float, offset: int) -> Outcome:
        """Until every rank is done with task k, the job ends, the cell times out, or a stop."""
        deadline = begun + cell.run.timeout_s
        done = [job.folder / f"done-{k}.rank{r}" for r in range(cell.parallel.world_size)]
        try:
            while not all(p.exists() for p in done):
                if job.proc.poll() is not None:  # died under the cell: judged as a fresh job's exit
                    _copy_log(job.log, offset, paths.torchrun_log)
                    wall = time.monotonic() - begun
                    return replace(judge(paths, job.proc.returncode, wall), job_s=wall)
                if time.monotonic() > deadline:
                    self._kill(job, paths, offset)
                    return Outcome("timeout", None, failure(paths, None, f"timeout after {cell.run.timeout_s:g}s"),
                                   time.monotonic() - begun)
                time.sleep(POLL_S)
        except KeyboardInterrupt as exc:
            self._kill(job, paths, offset)
            signame = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
            return Outcome("interrupted", None, failure(paths, None, f"interrupted by {signame}"),
                           time.monotonic() - begun)
        wall = time.monotonic() - begun
        code = max(int(p.read_text()) for p in done)
        return replace(judge(paths, code, wall), job_s=wall)

    def _kill(self, job: Job, paths: CellPaths, offset: int) -> None:
        with shielded():
            kill_tree(job.proc, self.opts.kill_grace_s)
        _copy_log(job.log, offset, paths.torchrun_log)
        self.job = None

    def close(self) -> None:
        """End the current job: a stop task, then a kill if it does not leave in time."""
        job, self.job = self.job, None
        if job is None:
            return
        if job.proc.poll() is None:
            _write_task(job.folder, job.tasks, {"stop": True})
            try:
                job.proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                with shielded():
                    kill_tree(job.proc, self.opts.kill_grace_s)


def _write_task(folder: Path, k: int, task: dict[str, object]) -> None:
    tmp = folder / f".task-{k}.tmp"
    tmp.write_text(json.dumps(task) + "\n")
    os.replace(tmp, folder / f"task-{k}.json")  # whole or absent: the ranks poll for the name


def _copy_log(job_log: Path, offset: int, cell_log: Path) -> None:
    """The job's output since the cell's task began, into the cell's torchrun.log."""
    try:
        with open(job_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return
    with open(cell_log, "a") as out:
        out.write(text)
