"""One rank's split of each measured step into compute and communication, from its own clock.

The step timer gives each step's window on this rank: from the start barrier's release to
the moment this rank finished the step, before the closing barrier (`StepTimer.windows`).
The collective ring's capture (bench/worker/collective_ring.py) gives every launch of the
window as [issued, waiting, done] on the same monotonic clock. Per step, with W the window:

    exposed_comm_s = |U [waiting, done] ∩ W|   the host blocked in a collective (waiting for the
                                               transfer or for a peer that is late)
    comm_s         = |U [issued, done] ∩ W|    from launch until the rank saw it complete; for an
                                               asynchronous launch that is when its wait()
                                               returned, so comm_s is an upper bound there
    compute_s      = |W| - exposed_comm_s      everything else: kernels, Python, the optimizer

A launch still open at the window's end counts to the end. DDP's buckets are waited for by
its C++ reducer where no hook sees it: the host is taken to block from the last such bucket's
launch to the last one's completion (the reducer's wait at the end of backward).

What the clock means: on CPU with gloo a blocked host is a blocked rank, so these are the
rank's own figures. On CUDA the host only enqueues; NCCL's wait() returns at once, so
exposed_comm_s is the host's, not the GPU's, and compute_s is close to the host step time:
there the per-rank split comes from the profiled trace's kernels when the cell was profiled
(bench/metrics/per_rank.py says which was used).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from bench.metrics.overlap import total_len
from bench.worker import hang_watch
from bench.worker.timing import StepTimer

NS = 1e-9


def _clip(start: int, end: int, lo: int, hi: int) -> tuple[int, int]:
    return max(start, lo), max(min(end, hi), max(start, lo))


def step_split(window: tuple[int, int], launches: list[list[int]]) -> dict[str, float]:
    """compute_s, comm_s, exposed_comm_s of one step window (ns) from [issued, waiting, done] launches."""
    lo, hi = window
    inside = [(i, w, d) for i, w, d in launches if i < hi and (d or hi) > lo]
    comm = [_clip(i, d or hi, lo, hi) for i, _, d in inside]
    blocked = [_clip(w, d or hi, lo, hi) for _, w, d in inside if w]
    unseen = [(i, d) for i, w, d in inside if not w and d]
    if unseen:  # waited for out of sight (DDP's reducer): from the last launch to the last completion
        blocked.append(_clip(max(i for i, _ in unseen), max(d for _, d in unseen), lo, hi))
    exposed = total_len(blocked) * NS
    return {"compute_s": max(0.0, (hi - lo) * NS - exposed), "comm_s": total_len(comm) * NS,
            "exposed_comm_s": exposed}


def split_steps(windows: list[tuple[int, int]], launches: list[list[int]]) -> dict[str, list[float]]:
    """Per measured step, in order: {"compute_s": [...], "comm_s": [...], "exposed_comm_s": [...]}."""
    out: dict[str, list[float]] = {"compute_s": [], "comm_s": [], "exposed_comm_s": []}
    for window in windows:
        for key, value in step_split(window, launches).items():
            out[key].append(value)
    return out


@contextlib.contextmanager
def captured() -> Iterator[list[list[int]]]:
    """Every launch of the `with` block as [issued, waiting, done] (empty without a ring)."""
    ring = hang_watch.ring()
    if ring is None:
        yield []
        return
    launches = ring.capture()
    try:
        yield launches
    finally:
        ring.stop_capture()


def rank_steps(timer: StepTimer, launches: list[list[int]]) -> dict[str, Any]:
    """This rank's measured steps: its own step seconds, their split, and its node."""
    return {"node": hang_watch.node_index(), "step_s": list(timer.own_samples),
            **split_steps(timer.windows, launches)}
