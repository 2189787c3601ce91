"""Run a function on N real processes joined by a gloo process group (no mocks).

`run_ranks(n, fn, *args)` spawns n processes; each initialises gloo through a file store,
calls `fn(rank, world_size, *args)` and sends its return value back. A failure on any rank
is raised in the test with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, queue) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - forwarded to the test with its traceback
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 300) -> list[Any]:
    """fn must be importable (module level) so spawned processes can find it."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, ok, value = queue.get(timeout=timeout_s)
                if ok:
                    results[rank] = value
                else:
                    errors.append(f"rank {rank} failed:\n{value}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
