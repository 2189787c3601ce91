"""Bytes and bandwidth of NCCL kernels, read from the kernels' own arguments.

PyTorch (2.4 and later) records on each NCCL kernel of a CUDA trace what it moved:
"Collective name", "In msg nelems", "Out msg nelems", "dtype", "Group size". For each kind
(named as in bench.metrics.overlap.nccl_kind):

    bytes      = sum over kernels of max(In, Out msg nelems) x the dtype's size
                 (nccl-tests' convention: all_gather counts the full output, reduce_scatter
                 the full input, all_reduce and all_to_all the buffer)
    seconds    = sum of the kernels' durations
    algbw_gbps = bytes / seconds / 1e9; busbw_gbps = algbw x the kind's bus factor at the
                 group size, when every kernel of the kind ran on groups of one size.

Traces without these arguments (older PyTorch) give no entry: sizes are never guessed.
"""

from __future__ import annotations

from typing import Any

from bench.metrics.formulas import BUS_FACTORS, algbw, bus_factor
from bench.metrics.overlap import US, nccl_kind

DTYPE_BYTES = {"float": 4, "bfloat16": 2, "half": 2, "double": 8, "int": 4, "long": 8, "byte": 1,
               "char": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _kernel_bytes(args: dict) -> int | None:
    size = DTYPE_BYTES.get(str(args.get("dtype", "")).lower())
    counts = [args.get("In msg nelems"), args.get("Out msg nelems")]
    if size is None or not all(isinstance(c, int) for c in counts):
        return None
    return max(counts) * size


def nccl_bytes_by_kind(trace: dict) -> dict[str, dict[str, Any]]:
    """Per kind: bytes, seconds, group_size (None when mixed), algbw_gbps, busbw_gbps."""
    acc: dict[str, dict[str, Any]] = {}
    for e in trace.get("traceEvents", []):
        if e.get("cat") != "kernel" or "nccl" not in e.get("name", "").lower() or "dur" not in e:
            continue
        nbytes = _kernel_bytes(e.get("args", {}))
        if nbytes is None:
            continue
        entry = acc.setdefault(nccl_kind(e["name"]), {"bytes": 0, "seconds": 0.0, "sizes": set()})
        entry["bytes"] += nbytes
        entry["seconds"] += float(e["dur"]) * US
        entry["sizes"].add(e["args"].get("Group size"))
    out = {}
    for kind, entry in acc.items():
        sizes = entry.pop("sizes")
        n = next(iter(sizes)) if len(sizes) == 1 and isinstance(next(iter(sizes)), int) else None
        if entry["seconds"] <= 0:
            continue
        bw = algbw(entry["bytes"], entry["seconds"])
        out[kind] = {**entry, "group_size": n, "algbw_gbps": bw,
                     "busbw_gbps": bw * bus_factor(kind, n) if n and kind in BUS_FACTORS else None}
    return out
