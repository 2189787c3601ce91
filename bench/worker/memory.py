"""Peak memory of the measured steps.

CUDA: the caching allocator's high-water marks since the last reset,
    peak_allocated_bytes = torch.cuda.max_memory_allocated(device)  (live tensors)
    peak_reserved_bytes  = torch.cuda.max_memory_reserved(device)   (held by the allocator)
    alloc_retries        = memory_stats(device)["num_alloc_retries"] (cudaMalloc
                           failures that forced a cache flush and retry: a sign of
                           fragmentation, which costs time)
CPU: the process' peak resident set size,
    peak_rss_bytes = getrusage(RUSAGE_SELF).ru_maxrss * 1024  (Linux reports KiB)
The RSS high-water mark covers the whole process lifetime and cannot be reset, so
on CPU `reset_peak` is a no-op, and in a process that ran a cell before (a reused worker,
bench/worker/pool.py) the peak is reported unavailable, with the reason, never a figure that
belongs partly to an earlier cell. (Linux can reset VmHWM through /proc/self/clear_refs, but
only to the current RSS, which still holds what the earlier cells' allocations left behind.)
"""

from __future__ import annotations

import resource
import sys

import torch


def _rss_bytes(maxrss: int) -> int:
    """ru_maxrss is in KiB on Linux and in bytes on macOS."""
    return maxrss if sys.platform == "darwin" else maxrss * 1024


RSS_REUSED = ("peak RSS unavailable: this worker process ran an earlier cell (run.reuse_workers), and a "
              "process' RSS peak cannot be reset")
_ran_a_cell = [False]  # per process, as the RSS peak itself


def note_cell_done() -> None:
    """This process has run a cell: the RSS peak of any later one would include it."""
    _ran_a_cell[0] = True


def peak_memory(device: torch.device | str) -> dict:
    """Peak memory of `device` (see the module docstring for each key)."""
    device = torch.device(device)
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "alloc_retries": int(stats.get("num_alloc_retries", 0)),
        }
    if _ran_a_cell[0]:
        return {"peak_rss_bytes": None, "peak_rss_unavailable": RSS_REUSED}
    return {"peak_rss_bytes": _rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}


def reset_peak(device: torch.device | str) -> None:
    """Reset the CUDA high-water marks and accumulated counters (num_alloc_retries
    among them) so the next `peak_memory` covers only what follows; no-op on CPU,
    whose RSS peak cannot be reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.reset_accumulated_memory_stats(device)
