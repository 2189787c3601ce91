"""What one rank's own trace says, computed on that rank (no rank opens another's trace).

A cluster need not share a disk, so rank 0 cannot read the other ranks' trace files by path:
each rank reduces its first trace to a few numbers, and those travel to rank 0 through the
process group with the rest of its measurement. Per profiled step:

    overlap      bench.metrics.overlap.overlap_stats (comm_s, compute_s, exposed_comm_s / steps)
    comm_time_s  per collective kind, bench.metrics.overlap.comm_time_by_kind / steps
    nccl         CUDA only: bytes and bandwidth from the NCCL kernels' own arguments
                 (bench.metrics.nccl_trace; empty when the trace lacks them)
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from bench.metrics.nccl_trace import nccl_bytes_by_kind
from bench.metrics.overlap import comm_time_by_kind, intervals_from_chrome_trace, overlap_stats


def trace_figures(trace: dict, device: str, steps: int) -> dict[str, Any]:
    """The per-step figures of one rank's chrome trace covering `steps` profiled steps."""
    stats = overlap_stats(*intervals_from_chrome_trace(trace, device))
    for key in ("comm_s", "compute_s", "overlapped_s", "exposed_comm_s"):
        stats[key] = stats[key] / steps
    times = {kind: t / steps for kind, t in comm_time_by_kind(trace).items()}
    nccl = nccl_bytes_by_kind(trace) if str(device).startswith("cuda") else {}
    for entry in nccl.values():
        entry["bytes"], entry["seconds"] = entry["bytes"] / steps, entry["seconds"] / steps
    return {"overlap": stats, "comm_time_s": times, "nccl": nccl}


def trace_file_figures(path: str, device: str, steps: int) -> dict[str, Any]:
    with gzip.open(path, "rt") as f:
        return trace_figures(json.load(f), device, steps)
