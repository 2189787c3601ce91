"""What a collectives cell sweeps and reports, without torch: sizes, the rules of its config,
the nccl-tests table and the floor.

The worker (bench/worker/collectives.py) fills one JSON document per cell; everything a person
reads (the console table, the runner's copy of it, the gate) is derived from that document, so
the table and the JSON cannot disagree. Formulas and columns: docs/collectives.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    pass

NCCL_TYPE = {"float32": "float", "bfloat16": "bfloat16", "float16": "half"}  # nccl-tests' `type` column
# The reduction on the wire: every ISP reduce-scatter averages; isp_core's all_reduce_ sends SUM
# (its "avg" is SUM then a local divide). Data-movement ops reduce nothing.
REDOP = {"all_gather": "none", "reduce_scatter": "avg", "all_to_all": "none", "all_reduce": "sum"}
# Ops whose buffer is split into one equal chunk per rank: their counts are multiples of n.
CHUNKED = ("all_gather", "reduce_scatter", "all_to_all")

# (header, unit, JSON key, format) in nccl-tests' order; min/max/p99 come after #wrong, then skew:
# 100 (max - min) / max of the ranks' times, how unevenly the ranks saw the same collective.
COLUMNS = [("size", "(B)", "size_bytes", "{:>12d}"), ("count", "(elements)", "count", "{:>12d}"),
           ("type", "", "type", "{:>9s}"), ("redop", "", "redop", "{:>6s}"),
           ("time", "(us)", "time_us", "{:>10.2f}"), ("algbw", "(GB/s)", "algbw_gbps", "{:>8.3f}"),
           ("busbw", "(GB/s)", "busbw_gbps", "{:>8.3f}"), ("#wrong", "", "wrong", "{:>7d}"),
           ("min", "(us)", "min_us", "{:>10.2f}"), ("max", "(us)", "max_us", "{:>10.2f}"),
           ("p99", "(us)", "p99_us", "{:>10.2f}"), ("skew", "(%)", "skew_pct", "{:>7.1f}")]


def message_sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    """nccl-tests -b/-e/-f: min, min*f, min*f^2, ... up to max (included when reached)."""
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def element_count(op: str, nbytes: int, n: int, element_size: int) -> int:
    """Elements of the op's counted buffer for a requested size: rounded down to whole elements,
    and for chunked ops to a multiple of n (every rank gets an equal chunk), at least one per rank."""
    count = nbytes // element_size
    if op in CHUNKED:
        return max(n, count - count % n)
    return max(1, count)


def sweep_counts(op: str, min_bytes: int, max_bytes: int, factor: int, n: int, element_size: int) -> list[int]:
    """The distinct counts swept for `op` (rounding can map two small sizes to one count)."""
    counts = [element_count(op, s, n, element_size) for s in message_sizes(min_bytes, max_bytes, factor)]
    return list(dict.fromkeys(counts))


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def finish(doc: dict[str, Any], floor: float | None) -> dict[str, Any]:
    """Add what nccl-tests prints under the table: `Avg bus bandwidth` per op and over every row
    (the plain mean of busbw over sizes), the total #wrong, the floor and the verdict."""
    rows = [row for op in doc["ops"].values() for row in op["rows"]]
    for op in doc["ops"].values():
        op["avg_busbw_gbps"] = mean([r["busbw_gbps"] for r in op["rows"]])
    doc["avg_busbw_gbps"] = mean([r["busbw_gbps"] for r in rows])
    doc["max_skew_pct"] = max((r["skew_pct"] for r in rows), default=None)
    doc["wrong"] = sum(r["wrong"] for r in rows)
    doc["min_busbw_gbps"] = floor
    doc["error"] = failure(doc)
    return doc


def failure(doc: dict[str, Any]) -> str | None:
    """Why the cell fails: wrong elements, or an average below the floor; None when it passes."""
    reasons = []
    if doc["wrong"]:
        bad = [f"{op} at {r['size_bytes']} B: {r['wrong']}" for op, o in doc["ops"].items()
               for r in o["rows"] if r["wrong"]]
        reasons.append(f"{doc['wrong']} wrong element(s) ({'; '.join(bad[:4])}{'; ...' if len(bad) > 4 else ''})")
    floor, avg = doc.get("min_busbw_gbps"), doc.get("avg_busbw_gbps")
    if floor is not None and avg is not None and avg < floor:
        reasons.append(f"avg bus bandwidth {avg:.3f} GB/s is below min_busbw_gbps {floor:g}")
    return "collectives: " + " and ".join(reasons) if reasons else None


def format_table(doc: dict[str, Any]) -> str:
    """nccl-tests' out-of-place table, one block per op, then the averages and the verdict."""
    head = "#" + "".join(f"{h:>{_width(f)}s}" for h, _, _, f in COLUMNS)[1:]
    units = "#" + "".join(f"{u:>{_width(f)}s}" for _, u, _, f in COLUMNS)[1:]
    mode = "async (one wait per batch)" if doc["async_op"] else "blocking (wait per call)"
    title = (f"# collectives cell {doc['cell']}: {doc['group']} group of {doc['group_size']} ranks "
             f"{doc['group_ranks']} (world {doc['world_size']}), {doc['dtype']}, {doc['device']}/{doc['backend']}, "
             f"{mode}, warmup {doc['warmup_iters']}, iters {doc['iters']}")
    lines = [title]
    for name, op in doc["ops"].items():
        note = " (isp_core all_reduce_ is blocking: never async)" if name == "all_reduce" and doc["async_op"] else ""
        lines += ["#", f"# {name}{note}", head, units]
        lines += ["".join(f.format(row[key]) for _, _, key, f in COLUMNS) for row in op["rows"]]
        lines.append(f"# Avg bus bandwidth    : {_gbps(op['avg_busbw_gbps'])} ({name})")
    lines += ["#", f"# Out of bounds values : {doc['wrong']} {'OK' if not doc['wrong'] else 'FAILED'}",
              f"# Avg bus bandwidth    : {_gbps(doc['avg_busbw_gbps'])} (all ops)"]
    if doc.get("min_busbw_gbps") is not None:
        lines.append(f"# min_busbw_gbps       : {doc['min_busbw_gbps']:g} "
                     f"{'FAILED' if _below(doc) else 'OK'}")
    return "\n".join(lines)


def _width(fmt: str) -> int:
    return int(fmt.strip("{}:>dfs").split(".")[0])


def _gbps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g} GB/s"


def _below(doc: dict[str, Any]) -> bool:
    return doc.get("avg_busbw_gbps") is not None and doc["avg_busbw_gbps"] < doc["min_busbw_gbps"]


def table_of(metrics: dict[str, Any] | None) -> str | None:
    """The table of a record's metrics when it is a collectives cell's, else None."""
    doc = (metrics or {}).get("collectives")
    return format_table(doc) if isinstance(doc, dict) and "ops" in doc else None
