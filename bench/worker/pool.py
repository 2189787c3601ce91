"""A reused worker job (run.reuse_workers): one torchrun job runs cell after cell, without a start-up each.

    python -m bench.sweep.torchrun --nproc-per-node=N --standalone -m bench.worker.pool --pool-dir DIR

Every rank waits for DIR/task-<k>.json (written by bench/sweep/pool.py, k = 0, 1, ...), runs
that cell exactly as a fresh job's worker would (bench/worker/__main__.py: main), then
writes DIR/done-<k>.rank<r> with its exit code. What keeps each cell's figures its own:

- a fresh default process group per cell, on a store prefix of its own (the earlier cell's
  keys cannot be read by mistake), and with it every group of the cell, destroyed at its end;
- the global RNG back to its start value, garbage collected, CUDA's cache emptied and its
  memory statistics reset before each cell;
- on CPU, from the second cell on, peak RSS reported unavailable (bench/worker/memory.py);
- a failing cell ends the job (its exit code, its traceback in the cell's rank log): the
  runner starts a fresh job for the next cell. A task `{"stop": true}` ends it cleanly.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from bench.metrics.phases import PhaseClock
from bench.worker.__main__ import main as worker_main
from bench.worker.finish import leave
from bench.worker.memory import note_cell_done

POLL_S = 0.01  # how often an idle rank looks for its next task


def task_path(pool_dir: Path, k: int) -> Path:
    return pool_dir / f"task-{k}.json"


def done_path(pool_dir: Path, k: int, rank: int) -> Path:
    return pool_dir / f"done-{k}.rank{rank}"


def wait_task(pool_dir: Path, k: int) -> dict[str, Any]:
    path = task_path(pool_dir, k)
    while not path.exists():  # the runner renames it into place: present means complete
        time.sleep(POLL_S)
    return json.loads(path.read_text())


def job_store() -> dist.Store:
    """A client of the store torchrun's agent hosts for this job (the same one env:// would use)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         int(os.environ["WORLD_SIZE"]), is_master=False, wait_for_workers=False)


def fresh_state() -> None:
    """What a new process would start a cell with, as far as a cell can tell."""
    gc.collect()
    torch.manual_seed(torch.initial_seed())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_accumulated_memory_stats()


def serve(pool_dir: Path) -> int:
    rank, store = int(os.environ.get("RANK", 0)), job_store()
    for k in range(sys.maxsize):
        task = wait_task(pool_dir, k)
        if task.get("stop"):
            return 0
        fresh_state()
        clock = PhaseClock(task["launched_at"])  # the first task's: when the job itself was started
        argv = ["--cell-config", task["cell_config"], "--out", task["out"], "--log-dir", task["log_dir"]]
        code = worker_main(argv, clock, dist.PrefixStore(f"isp-bench/cell{k}", store))
        note_cell_done()
        done, tmp = done_path(pool_dir, k, rank), pool_dir / f".done-{k}.rank{rank}.tmp"
        tmp.write_text(f"{code}\n")
        os.replace(tmp, done)  # whole when it appears: the runner reads it at once
        if code:
            return code
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-dir", type=Path, required=True)
    return serve(parser.parse_args(argv).pool_dir)


if __name__ == "__main__":
    leave(main())
