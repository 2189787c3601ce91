"""The end of a cell on every rank: the result, the agreement, the teardown.

Rank 0 writes result.json; every rank then passes a barrier, after which rank 0 rewrites it
with `agreed_by_ranks`. A rank that dies after that point (gloo's thread teardown can abort
with "terminate called without an active exception") has lost nothing: the runner keeps such
a result and records the crash as a warning (bench/sweep/launch.py: judge).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist

from bench.results.records import write_json_atomic
from bench.worker.hang_watch import track


def write_agreed_result(out: Path, payload: dict[str, Any]) -> None:
    """Collective: rank 0 writes `payload`, all ranks meet, rank 0 marks it agreed by all."""
    rank = dist.get_rank()
    if rank == 0:
        write_json_atomic(out, payload)
    with track("barrier"):
        dist.barrier()
    if rank == 0:
        write_json_atomic(out, {**payload, "agreed_by_ranks": dist.get_world_size()})


def teardown() -> None:
    """Destroy the process group if there is one: on every exit path, so gloo's threads stop
    before the interpreter does (skipping it is what makes the teardown abort likely)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """Flush this process' output and exit without the interpreter's finalisation: with torch
    imported that takes about a second on a busy machine and serves nothing once the result is
    written (fsynced) and the process group destroyed. Only for a process at its very end."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
