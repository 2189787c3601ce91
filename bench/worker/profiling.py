"""torch.profiler around the measured steps, one gzipped chrome trace per rank and
cycle, and CUDA memory snapshots loadable by PyTorch's memory_viz. (NVTX ranges for Nsight
Systems, profile.nvtx: bench/worker/nvtx.py.)

Layout: <trace_root>/<cell>/rank<r>.json.gz for the first profiling cycle and
rank<r>_<k>.json.gz for cycle k >= 1 when the schedule repeats. With
torch.distributed initialised, torch writes a "distributedInfo" block (backend,
rank, world_size, process groups) at the top of every trace.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench.worker import nvtx


class ProfileSettings(Protocol):
    """The attributes Profiler reads from the config (any object that has them)."""

    enabled: bool
    ranks: str | Sequence[int]  # "all" or a list of ranks
    wait: int
    warmup: int
    active: int
    repeat: int
    record_shapes: bool
    with_stack: bool
    profile_memory: bool


def rank_selected(ranks: str | Sequence[int], rank: int) -> bool:
    """True when `rank` is profiled: ranks == "all" or rank in ranks."""
    if isinstance(ranks, str):
        if ranks != "all":
            raise ValueError(f'profile ranks must be "all" or a list of ints, got {ranks!r}')
        return True
    return rank in ranks


def steps_needed(settings: ProfileSettings) -> int:
    """Steps the worker must run (calling step() after each) to complete every cycle:
    (wait + warmup + active) * repeat; with repeat == 0 (forever) one cycle's worth."""
    cycle = settings.wait + settings.warmup + settings.active
    return cycle * max(settings.repeat, 1)


def _validate(settings: ProfileSettings) -> None:
    if settings.active < 2:
        raise ValueError(f"profile active must be >= 2 (a trace needs two ProfilerStep#), got {settings.active}")
    for name in ("wait", "warmup", "repeat"):
        if getattr(settings, name) < 0:
            raise ValueError(f"profile {name} must be >= 0, got {getattr(settings, name)}")


def export_gzipped_trace(prof: profile, path: Path) -> Path:
    """Write prof's chrome trace to `path` (.json.gz): export to a temporary .json
    next to it, gzip it, remove the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name.removesuffix(".gz") + f".tmp{os.getpid()}")
    prof.export_chrome_trace(str(tmp))
    try:
        # Level 1: a few times faster than gzip's default 9 on a profiler trace, about a third bigger.
        with open(tmp, "rb") as src, gzip.open(path, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Profiler:
    """Context manager: torch.profiler with the config's schedule on the selected ranks.

        with Profiler(cfg.profile, cell="wp4_sp2", rank=rank) as p:
            for _ in range(steps_needed(cfg.profile)):
                train_step()
                p.step()
        p.trace_paths  # files written by this rank

    Activities: CPU, plus CUDA when CUDA is available. On a rank that is not
    selected, or with enabled False, every method is a no-op.
    """

    def __init__(self, settings: ProfileSettings, cell: str, rank: int, trace_root: str | Path = "traces") -> None:
        self.settings = settings
        self.rank = rank
        self.trace_dir = Path(trace_root) / cell
        if settings.enabled:
            _validate(settings)  # on every rank, so that all ranks fail alike
        self.active = bool(settings.enabled) and rank_selected(settings.ranks, rank)
        self.trace_paths: list[Path] = []
        self._prof: profile | None = None

    def _trace_path(self, cycle: int) -> Path:
        suffix = "" if cycle == 0 else f"_{cycle}"
        return self.trace_dir / f"rank{self.rank}{suffix}.json.gz"

    def _on_trace_ready(self, prof: profile) -> None:
        path = self._trace_path(len(self.trace_paths))
        self.trace_paths.append(export_gzipped_trace(prof, path))

    def _build(self) -> profile:
        s = self.settings
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        return profile(
            activities=activities,
            schedule=schedule(wait=s.wait, warmup=s.warmup, active=s.active, repeat=s.repeat),
            on_trace_ready=self._on_trace_ready,
            record_shapes=s.record_shapes,
            with_stack=s.with_stack,
            profile_memory=s.profile_memory,
        )

    def __enter__(self) -> Profiler:
        if self.active:
            nvtx.pause_labels()  # torch.profiler takes the profiler slot the NVTX labels hold
            self._prof = self._build()
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            self._prof = None
            nvtx.resume_labels()

    def step(self) -> None:
        """Mark the end of one training step (advances the schedule)."""
        if self._prof is not None:
            self._prof.step()


# ---------------------------------------------------------------------------
# CUDA memory snapshots (no-ops without CUDA)
# ---------------------------------------------------------------------------


def start_memory_history(max_entries: int = 100_000) -> bool:
    """Start recording CUDA allocator events (the last `max_entries`, with Python stacks).

    stacks="python": the default "all" also unwinds C++ frames on every allocation, which
    slows the profiled steps several-fold. Returns True when recording started, False on CPU.
    """
    if not torch.cuda.is_available():
        return False
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    return True


def dump_memory_snapshot(path: str | Path) -> Path | None:
    """Write the allocator snapshot to `path` as a pickle that PyTorch's memory_viz
    (https://pytorch.org/memory_viz) loads. None on CPU."""
    if not torch.cuda.is_available():
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    return path


def stop_memory_history() -> None:
    """Stop recording allocator events (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(enabled=None)
