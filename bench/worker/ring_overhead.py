"""What the collective ring costs a training step: the same ISP cell timed with the ring on and
off in alternating blocks of steps, on real gloo ranks, plus the ring's own cost per launch.

    python -m bench.worker.ring_overhead [--world 2] [--blocks 8] [--steps 5]

Rank 0 prints launches per step, microseconds per launch (issue + waiting + done into the mapped
file, timed in a loop), and the median step with and without the ring; the ring off means
CommStats has no launch log and the benchmark's barriers log nothing. torch's Flight Recorder
is a separate cost, set at process-group creation: run once with TORCH_FR_BUFFER_SIZE=0 and
once without to see it (the worker's default is 2000 entries). docs/runs.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

from bench.config.cell import CellConfig
from bench.worker import hang_watch
from bench.worker.collective_ring import CollectiveRing

CELL = {"model": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "vocab": 2048, "mlp_hidden": 352},
        "data": {"seq_len": 256, "global_batch": 4, "micro_num": 2},
        "parallel": {"world_size": 2, "sp": 2, "wp": 2, "overlap": True}, "run": {"check_loss": False}}


def per_launch_us(ring: CollectiveRing, n: int = 20000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        token = ring.issue("weight", (0, 1), "all_gather", 4096)
        ring.waiting(token)
        ring.done(token)
    return (time.perf_counter() - t0) / n * 1e6


def _rank(rank: int, world: int, port: int, blocks: int, steps: int, log_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from bench.worker.cell import batches_for, build, setup
    from bench.worker.timing import StepTimer

    ring = hang_watch.install(Path(log_dir), rank)
    config = CellConfig.from_dict({**CELL, "parallel": {**CELL["parallel"], "world_size": world}})
    cell = build(config, "ring-overhead", Path(log_dir), setup(config))
    for step in range(2):  # warm-up
        cell.trainer.train_step(batches_for(cell, step))
    launches_before = ring._count
    cell.trainer.train_step(batches_for(cell, 2))
    per_step = ring._count - launches_before
    samples: dict[bool, list[float]] = {True: [], False: []}
    for block in range(2 * blocks):
        on = block % 4 in (1, 2)  # ABBA: neither side always comes second
        cell.topo.stats.log = ring if on else None
        with hang_watch.detached(not on):
            timer = StepTimer(cell.device)
            for step in range(steps):
                with timer.step():
                    cell.trainer.train_step(batches_for(cell, 3 + step))
        samples[on] += timer.samples
    if rank == 0:
        off, on = statistics.median(samples[False]), statistics.median(samples[True])
        cost = per_launch_us(ring)
        print(f"world {world}: {per_step} launches per training step, "
              f"{cost:.2f} us per launch -> {per_step * cost:.0f} us per step expected")
        print(f"median step: ring off {off * 1e3:.2f} ms, ring on {on * 1e3:.2f} ms, "
              f"difference {100 * (on / off - 1):+.2f}% over {len(samples[True])} steps each "
              f"(blocks of {steps}, order off-on-on-off)")
    import torch.distributed as dist

    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as log_dir:
        mp.spawn(_rank, (args.world, port, args.blocks, args.steps, log_dir), nprocs=args.world)


if __name__ == "__main__":
    main()
