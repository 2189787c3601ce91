"""Stand-in for bench.worker.cell in the runner's tests: real torchrun, real gloo, scripted failures.

The runner cannot tell it from the real worker: same arguments, same files. What it does is
chosen per cell id by FAKE_WORKER_PLAN (JSON {cell id: mode}; default "ok"):
  ok     rank 0 writes plausible metrics
  crash  the last rank raises
  oom    the last rank raises torch.OutOfMemoryError
  kill   the last rank SIGKILLs itself
  exit   the last rank calls os._exit(137)
  hang   every rank sleeps past any timeout
  abort  the result is written and agreed by every rank, then the last rank aborts (SIGABRT),
         as gloo's thread teardown sometimes does
  fill   as ok, then rank 0 fills the run folder's disk (a file `filler` beside results.jsonl)
FAKE_WORKER_LAUNCHES names a file where rank 0 appends the cell id of every launch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import torch
import torch.distributed as dist

from bench.config import CellConfig
from bench.worker.finish import write_agreed_result


def _log_uncaught(log: TextIO) -> None:
    """Tracebacks go to the rank log as well as stderr, so the runner's log_tail shows them."""
    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log.write("".join(traceback.format_exception(kind, exc, tb)))
        log.flush()
        sys.__excepthook__(kind, exc, tb)

    sys.excepthook = hook


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fake_metrics(cell: CellConfig) -> dict[str, Any]:
    """Deterministic numbers in the worker's metrics contract; overlap makes steps faster."""
    base = 0.2 / cell.parallel.world_size * (0.8 if cell.parallel.overlap else 1.0) * (1 + 0.3 * cell.model.checkpoint)
    samples = [base * (1 + 0.02 * ((i * 7) % 5)) for i in range(cell.run.measure_steps)]
    median = statistics.median(samples)
    return {
        "step_time_s": {"median": median, "p10": _percentile(samples, 0.1), "p90": _percentile(samples, 0.9),
                        "mean": statistics.fmean(samples), "stdev": statistics.pstdev(samples),
                        "min": min(samples), "max": max(samples), "samples": samples},
        "tokens_per_s": cell.tokens_per_step / median,
        "loss": [8.0 - 0.1 * i for i in range(cell.run.measure_steps)],
        "peak_memory_bytes": (64 << 20) * (2 if cell.parallel.memory_pool else 1),
        "fake_extra": {"nested": 1.5},  # keys outside the contract must be tolerated downstream
    }


def _fill_disk(path: Path) -> None:
    """Write until the file system says ENOSPC: the runner's next append must fail cleanly."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cell-config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--log-dir", type=Path, required=True)
    args = parser.parse_args()
    cell = CellConfig.from_dict(json.loads(args.cell_config.read_text()))
    mode = json.loads(os.environ.get("FAKE_WORKER_PLAN", "{}")).get(args.cell_config.parent.name, "ok")

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = open(args.log_dir / f"rank{rank}.log", "a")
    _log_uncaught(log)
    log.write(f"rank {rank}/{world} mode {mode}\n")
    log.flush()
    assert world == cell.parallel.world_size, (world, cell.parallel.world_size)
    dist.barrier()
    if rank == 0 and (launches := os.environ.get("FAKE_WORKER_LAUNCHES")):
        with open(launches, "a") as f:
            f.write(args.cell_config.parent.name + "\n")

    if mode == "hang":
        time.sleep(3600)
    if mode not in ("ok", "abort", "fill"):
        if rank != world - 1:
            time.sleep(3600)  # until torchrun tears the job down
        if mode == "crash":
            raise RuntimeError("fake worker: injected crash")
        if mode == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "exit":
            os._exit(137)
        raise ValueError(f"unknown FAKE_WORKER_PLAN mode {mode!r}")

    write_agreed_result(args.out, {"metrics": fake_metrics(cell)})  # the real worker's ending
    if mode == "fill" and rank == 0:
        _fill_disk(args.out.parents[2] / "filler")
    if mode == "abort" and rank == world - 1:
        log.write("terminate called without an active exception (fake)\n")
        log.flush()
        os.abort()
    dist.destroy_process_group()
    log.write("done\n")


if __name__ == "__main__":
    main()
