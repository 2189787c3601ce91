"""What a rank leaves for the runner to explain a hang: its collective ring, its Python stacks on a
signal, and torch's Flight Recorder on request. Installed first thing by `python -m bench.worker`.

- The ring (bench/worker/collective_ring.py) is `logs/<cell>/rank<r>.ring`; isp_core's CommStats
  logs into it (`ring()` hands it to the topology) and `track()` logs the benchmark's own
  barriers and gathers, so a rank stuck anywhere in a step has its last launch on file.
- faulthandler dumps every thread's Python stack into the rank's log on SIGUSR2 (the runner's
  request at a timeout: bench/sweep/hang.py) and on SIGTERM before the default action (torchrun
  stops the other ranks with SIGTERM when one dies). C-level and async-signal-safe, it answers
  even while the main thread sits inside a blocking collective.
- torch's Flight Recorder (every c10d collective of every process group, NCCL and gloo alike
  in torch 2.13) keeps TORCH_FR_BUFFER_SIZE entries (default here 2000, unless the deprecated
  NCCL name TORCH_NCCL_TRACE_BUFFER_SIZE is set, which torch still reads). A thread watches for
  the runner's request file and writes `logs/<cell>/fr_rank<r>.json`; on NCCL, ProcessGroupNCCL also dumps by itself on
  its own collective timeout (TORCH_NCCL_DUMP_ON_TIMEOUT) to `logs/<cell>/nccl_trace_rank_<r>`.
  A stopped rank runs no thread: its ring alone speaks for it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from bench.worker.collective_ring import CollectiveRing

STACK_SIGNAL = signal.SIGUSR2
DUMP_REQUEST = ".dump-request"  # the runner writes it; each live rank answers with fr_rank<r>.json
FR_BUFFER = "2000"
NODE_ENV = "ISP_BENCH_NODE"  # the runner's node index (several nodes: torchrun's GROUP_RANK may differ)
BENCH_GROUP = "bench"  # the default process group, which only the benchmark's own calls use
POLL_S = 0.5

_ring: Optional[CollectiveRing] = None
_world: tuple[int, ...] = ()
_cell: Optional[tuple[Path, int]] = None  # the current cell's log folder and rank (the dump thread's)
_DUMP_FILE_SET_BY_USER = "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" in os.environ


def ring_path(log_dir: Path, rank: int) -> Path:
    return log_dir / f"rank{rank}.ring"


def fr_path(log_dir: Path, rank: int) -> Path:
    return log_dir / f"fr_rank{rank}.json"


def node_index() -> int:
    return int(os.environ.get(NODE_ENV) or os.environ.get("GROUP_RANK") or 0)


def install(log_dir: Path, rank: int) -> CollectiveRing:
    """Before the cell's process group exists, after its output goes to its rank log: the ring,
    the stack signals, the Flight Recorder. Again for each cell a process runs: the new cell's
    ring replaces the last one, the stacks go to the new log, the dump thread serves the new folder."""
    global _ring, _world, _cell
    if _ring is not None:
        _ring.close()
    world = int(os.environ.get("WORLD_SIZE", 1))
    _world = tuple(range(world))
    _ring = CollectiveRing(ring_path(log_dir, rank), rank, world, node_index(), int(os.environ.get("LOCAL_RANK", 0)))
    faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:  # the old name, which torch 2.13 still reads
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FR_BUFFER)
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if not _DUMP_FILE_SET_BY_USER:
        os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = str(log_dir / "nccl_trace_rank_")
    first, _cell = _cell is None, (log_dir, rank)
    if first:
        threading.Thread(target=_answer_dump_requests, name="isp-bench-fr-dump", daemon=True).start()
    return _ring


def ring() -> Optional[CollectiveRing]:
    """This process' ring (None outside a worker, e.g. in-process tests)."""
    return _ring


@contextlib.contextmanager
def detached(off: bool = True) -> Iterator[None]:
    """`track` logs nothing inside (bench/worker/ring_overhead.py times steps without the ring)."""
    global _ring
    kept = _ring
    if off:
        _ring = None
    try:
        yield
    finally:
        _ring = kept


@contextlib.contextmanager
def track(kind: str, nbytes: int = 0) -> Iterator[None]:
    """Log one of the benchmark's own blocking calls on the default group (a barrier, a gather)."""
    if _ring is None:
        yield
        return
    with _ring.track(BENCH_GROUP, _world, kind, nbytes):
        yield


def _answer_dump_requests() -> None:
    answered = None
    while True:
        time.sleep(POLL_S)
        log_dir, rank = _cell  # type: ignore[misc]  # set before the thread starts
        try:
            stamp = f"{log_dir}:{(log_dir / DUMP_REQUEST).read_text()}"
        except OSError:
            continue
        if stamp != answered:
            answered = stamp
            _dump_flight_recorder(fr_path(log_dir, rank))


def _dump_flight_recorder(path: Path) -> None:
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        data = _dump_fr_trace_json(True, False)  # collectives, all of them (not only the active)
    except Exception as exc:  # noqa: BLE001 - a torch without it, or no process group yet
        data = json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:200]}"}).encode()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
