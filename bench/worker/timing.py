"""Step timing: summary statistics, a per-step timer, and the cross-rank reduction.

A step's time is the time of the slowest rank: every timed step starts after a barrier (so
the ranks' launch skew is not timed), then on CUDA each rank times its own stream with
events and the worker takes the element-wise max over ranks (`reduce_max_across_ranks`); on
CPU the timer also ends with a barrier, so every rank already reads the synchronised wall clock.
Each rank's own time (before the closing barrier) and its step windows on the monotonic clock
are kept beside it (`own_samples`, `windows`: bench/worker/rank_figures.py splits them).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from bench.worker.hang_watch import track


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """Percentile by linear interpolation (numpy.percentile's default, "linear").

    With the samples sorted ascending, x_0 <= ... <= x_{n-1}, and
    pos = (n - 1) * q / 100, lo = floor(pos), hi = ceil(pos):
        p_q = x_lo + (x_hi - x_lo) * (pos - lo)
    """
    if not sorted_samples:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(sorted_samples) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    x_lo, x_hi = sorted_samples[lo], sorted_samples[hi]
    return x_lo + (x_hi - x_lo) * (pos - lo)


def summarize(samples: list[float]) -> dict:
    """Summary statistics of step times (seconds).

    median = p50, p10, p90: linear-interpolated percentiles (see `percentile`);
    mean = sum(x) / n;
    stdev = sqrt(sum((x - mean)^2) / (n - 1)), the sample standard deviation,
            0.0 when n == 1;
    min, max; samples: the list itself, in measurement order.
    """
    if not samples:
        raise ValueError("summarize needs at least one sample")
    xs = sorted(float(x) for x in samples)
    return {
        "median": percentile(xs, 50.0),
        "p10": percentile(xs, 10.0),
        "p90": percentile(xs, 90.0),
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": xs[0],
        "max": xs[-1],
        "samples": [float(x) for x in samples],
    }


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class StepTimer:
    """Times training steps: `with timer.step(): ...`, then `timer.samples` (seconds).

    CUDA: a barrier (all ranks' earlier work done, none starts early), then a start and
    an end `torch.cuda.Event(enable_timing=True)` are recorded on the current stream
    around the step; after `end.synchronize()` the step time is
    start.elapsed_time(end) / 1000 (elapsed_time is in milliseconds). Work on other
    streams is included only if it is joined back to the current stream before the
    end event, as every collective's wait() does.

    CPU: barrier, t0 = perf_counter(), step, barrier, t1 = perf_counter(); the
    sample is t1 - t0. The barriers (when torch.distributed is initialised) make
    every rank start together and stop only when the slowest rank is done, so the
    sample is the synchronised wall clock; it includes one barrier latency.

    `own_samples`: this rank's own seconds per step (CUDA: the events' time; CPU: until the
    rank is done, before the closing barrier); `windows`: (start, end) of each step on this
    rank in time.monotonic_ns(), the clock of the collective ring.
    """

    def __init__(self, device: torch.device | str, group: dist.ProcessGroup | None = None) -> None:
        self.device = torch.device(device)
        self.group = group
        self.samples: list[float] = []
        self.own_samples: list[float] = []
        self.windows: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Time the body of the `with` block and append the seconds to `samples`."""
        if self.device.type == "cuda":
            with self._cuda_step():
                yield
        else:
            with self._cpu_step():
                yield

    @contextlib.contextmanager
    def _cuda_step(self) -> Iterator[None]:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self._barrier()
        w0 = time.monotonic_ns()
        start.record()
        yield
        end.record()
        end.synchronize()
        self.windows.append((w0, time.monotonic_ns()))
        self.samples.append(start.elapsed_time(end) / 1000.0)
        self.own_samples.append(self.samples[-1])

    @contextlib.contextmanager
    def _cpu_step(self) -> Iterator[None]:
        self._barrier()
        t0 = time.perf_counter()
        w0 = time.monotonic_ns()
        yield
        w1 = time.monotonic_ns()
        self._barrier()
        self.samples.append(time.perf_counter() - t0)
        self.windows.append((w0, w1))
        self.own_samples.append((w1 - w0) * 1e-9)

    def _barrier(self) -> None:
        if not _dist_ready():
            return
        with track("barrier"):
            self._barrier_now()

    def _barrier_now(self) -> None:
        if self.device.type == "cuda" and "nccl" in str(dist.get_backend(self.group)).lower():
            # NCCL's barrier is an all-reduce on the device; synchronising after it makes the
            # host wait until every rank has arrived, so no rank's start event runs early.
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            dist.barrier(group=self.group, device_ids=[index])
            torch.cuda.synchronize(self.device)
        else:
            dist.barrier(group=self.group)

    def reset(self) -> None:
        """Drop the samples taken so far (e.g. after warm-up)."""
        self.samples.clear()
        self.own_samples.clear()
        self.windows.clear()


def _reduction_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL reduces only CUDA tensors; every other backend here takes CPU ones."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_agree(flag: bool, device: torch.device | str | None = None,
                    group: dist.ProcessGroup | None = None) -> bool:
    """True only when `flag` is true on every rank (an all-reduce MIN; `flag` itself when
    torch.distributed is not initialised). Every rank must call it."""
    if not _dist_ready():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_reduction_device(group))
    with track("all_reduce", 4):
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def gather_across_ranks(value: float, group: dist.ProcessGroup | None = None) -> list[float]:
    """Every rank's `value`, in rank order ([value] when torch.distributed is not initialised)."""
    if not _dist_ready():
        return [float(value)]
    t = torch.tensor([value], dtype=torch.float64, device=_reduction_device(group))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    with track("all_gather", 8 * len(out)):
        dist.all_gather(out, t, group=group)
    return [float(x.item()) for x in out]


def reduce_max_across_ranks(samples: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """Element-wise max over ranks: out[i] = max_r samples_r[i].

    One all_reduce(MAX) of a float64 tensor; every rank must pass the same number
    of samples. Identity (a copy) when torch.distributed is not initialised.
    """
    if not _dist_ready():
        return [float(x) for x in samples]
    t = torch.tensor(samples, dtype=torch.float64, device=_reduction_device(group))
    with track("all_reduce", 8 * len(samples)):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [float(x) for x in t.cpu().tolist()]
