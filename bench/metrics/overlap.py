"""Communication/compute overlap, HolisticTraceAnalysis' definition, from chrome traces.

For one rank, with U(X) the union of the intervals of kind X:
    comm_s         = |U(comm)|
    compute_s      = |U(compute)|
    overlapped_s   = |U(comm) ∩ U(compute)|
    exposed_comm_s = comm_s - overlapped_s
    overlap_pct    = 100 * overlapped_s / comm_s   (None when comm_s == 0)

Which trace events are communication and which compute (`intervals_from_chrome_trace`):

CUDA: every GPU kernel (cat "kernel") whose name contains "nccl" (any case) is
communication; every other kernel is compute. Memcpy/memset events are neither.

CPU (gloo): gloo runs each collective on one of its own "pt_gloo_runloop"
threads, which the profiler records as a user_annotation "gloo:<op>" (e.g.
gloo:all_gather, gloo:all_to_all, gloo:all_reduce); those events are the
communication, whatever thread they are on ("gloo:barrier" excepted: on CPU it is
the step timer's synchronisation, not the model's communication). Compute is
the main thread's top-level aten ops minus bookkeeping: the main thread is the one
that records the ProfilerStep# events; among its cpu_op events named "aten::*" or
"c10d::*", an "aten::*" op is top-level when no other such op encloses it (so the
copies gloo's c10d::* wrappers run inside themselves are not compute); then the
ops in NOT_COMPUTE (allocation, views, metadata and copies) are dropped.
user_annotation events (record_function labels, ProfilerStep#) are never compute.

Observed with torch 2.13 + gloo: the gloo thread names in the trace metadata are
not reliable (a runloop thread can be labelled "python3.11"), hence the rule by
event name; and there is no "gloo:reduce_scatter" event: gloo runs
reduce_scatter_tensor as a clone plus an all-reduce of the whole input, recorded as
"gloo:all_reduce", so `comm_time_by_kind` attributes each gloo:all_reduce to the
c10d op that issued it (`gloo_kind`).
"""

from __future__ import annotations

from collections.abc import Iterable

Interval = tuple[float, float]

US = 1e-6  # chrome trace "ts"/"dur" are microseconds

#: Top-level aten ops that are not compute on CPU: allocation, views and metadata,
#: and copies (gloo's collectives copy into and out of their buffers with
#: aten::copy_ on the calling thread, indistinguishable from model copies).
NOT_COMPUTE = frozenset(
    "aten::" + name
    for name in (
        "empty empty_like empty_strided new_empty new_empty_strided resize_ set_ "
        "view _unsafe_view reshape _reshape_alias as_strided alias detach detach_ "
        "t transpose permute expand expand_as squeeze unsqueeze slice select narrow "
        "split split_with_sizes chunk unbind resolve_conj resolve_neg lift_fresh "
        "record_stream copy_ clone contiguous to _to_copy"
    ).split()
)

MAIN_KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce")

#: c10d ops whose gloo work appears as "gloo:all_reduce": gloo implements
#: reduce_scatter_tensor (and list reduce_scatter) as an all-reduce of the input.
_REDUCE_SCATTER_OPS = frozenset(
    {"c10d::reduce_scatter_", "c10d::_reduce_scatter_base_", "c10d::reduce_scatter_tensor_coalesced_"}
)
_ALL_REDUCE_OPS = frozenset({"c10d::allreduce_", "c10d::allreduce_coalesced_"})


# Interval arithmetic


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Union of [start, end) intervals: sorted, disjoint, with touching ones merged.

    Empty intervals (end == start) are dropped; end < start is an error.
    """
    items = sorted((float(s), float(e)) for s, e in intervals)
    merged: list[Interval] = []
    for start, end in items:
        if end < start:
            raise ValueError(f"interval ends before it starts: ({start}, {end})")
        if end == start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def total_len(intervals: Iterable[Interval]) -> float:
    """|U(intervals)| = sum of end - start over the union."""
    return sum((end - start for start, end in union(intervals)), 0.0)


def intersect_len(a: Iterable[Interval], b: Iterable[Interval]) -> float:
    """|U(a) ∩ U(b)|: a two-pointer sweep over both unions, summing
    max(0, min(end_a, end_b) - max(start_a, start_b)) over overlapping pairs."""
    ua, ub = union(a), union(b)
    i = j = 0
    total = 0.0
    while i < len(ua) and j < len(ub):
        lo, hi = max(ua[i][0], ub[j][0]), min(ua[i][1], ub[j][1])
        total += max(0.0, hi - lo)
        if ua[i][1] < ub[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap_stats(comm: Iterable[Interval], compute: Iterable[Interval]) -> dict:
    """HolisticTraceAnalysis overlap of one rank (see the module docstring for the formulas).

    Returns comm_s, compute_s, overlapped_s, exposed_comm_s, overlap_pct
    (None when there is no communication); units are those of the intervals.
    """
    comm, compute = union(comm), union(compute)
    comm_s, compute_s = total_len(comm), total_len(compute)
    overlapped = intersect_len(comm, compute)
    return {
        "comm_s": comm_s,
        "compute_s": compute_s,
        "overlapped_s": overlapped,
        "exposed_comm_s": comm_s - overlapped,
        "overlap_pct": 100.0 * overlapped / comm_s if comm_s > 0 else None,
    }


# Chrome trace extraction

def _complete_events(trace: dict) -> list[dict]:
    """The "X" events, "ts" made relative to the earliest (in place, once): epoch microseconds
    (~1.7e15) in float64 seconds keep only ~0.2 us each, and sums of many kernels drifted."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if events and not trace.get("_ts_relative"):
        t0 = min(float(e["ts"]) for e in events)
        for e in events:
            e["ts"] = float(e["ts"]) - t0
        trace["_ts_relative"] = t0
    return events


def _interval(event: dict) -> Interval:
    start = float(event["ts"]) * US
    return start, start + float(event["dur"]) * US


def _is_nccl_kernel(event: dict) -> bool:
    return event.get("cat") == "kernel" and "nccl" in event["name"].lower()


def _is_gloo_comm(event: dict) -> bool:
    name = event["name"]
    return name.startswith("gloo:") and name != "gloo:barrier"


def main_thread(events: list[dict]) -> object | None:
    """The thread that records ProfilerStep#; else the one with tid == pid; else
    the one with the most cpu_op events."""
    for e in events:
        if e["name"].startswith("ProfilerStep#"):
            return e.get("tid")
    for e in events:
        if e.get("cat") == "cpu_op" and e.get("tid") == e.get("pid"):
            return e.get("tid")
    counts: dict[object, int] = {}
    for e in events:
        if e.get("cat") == "cpu_op":
            counts[e.get("tid")] = counts.get(e.get("tid"), 0) + 1
    return max(counts, key=counts.get) if counts else None


def _top_level_aten_ops(events: list[dict], tid: object) -> list[dict]:
    """aten::* cpu_ops on thread `tid` not enclosed by another aten::*/c10d::* op."""
    ops = [
        e
        for e in events
        if e.get("cat") == "cpu_op" and e.get("tid") == tid and e["name"].startswith(("aten::", "c10d::"))
    ]
    ops.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    top: list[dict] = []
    enclosing_end = float("-inf")
    for e in ops:
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if start < enclosing_end:
            continue  # nested inside the previous top-level op
        enclosing_end = end
        if e["name"].startswith("aten::"):
            top.append(e)
    return top


def cpu_compute_events(events: list[dict]) -> list[dict]:
    """The CPU compute events: top-level main-thread aten ops not in NOT_COMPUTE."""
    tid = main_thread(events)
    return [e for e in _top_level_aten_ops(events, tid) if e["name"] not in NOT_COMPUTE]


def intervals_from_chrome_trace(trace: dict, device: str) -> tuple[list[Interval], list[Interval]]:
    """(comm, compute) intervals in seconds from one rank's chrome trace.

    `device` is "cuda" (NCCL kernels vs other kernels) or "cpu" (gloo events vs
    main-thread compute ops); the rules are in the module docstring.
    """
    events = _complete_events(trace)
    if str(device).startswith("cuda"):
        kernels = [e for e in events if e.get("cat") == "kernel"]
        comm = [_interval(e) for e in kernels if _is_nccl_kernel(e)]
        compute = [_interval(e) for e in kernels if not _is_nccl_kernel(e)]
        return comm, compute
    comm = [_interval(e) for e in events if _is_gloo_comm(e)]
    compute = [_interval(e) for e in cpu_compute_events(events)]
    return comm, compute


def nccl_kind(kernel_name: str) -> str:
    """Collective kind of an NCCL kernel name (e.g. ncclDevKernel_AllGather_RING_LL).

    NCCL runs all_to_all as grouped send/recv ("SendRecv" kernels); the suite does
    no other point-to-point traffic, so send/recv kernels count as all_to_all.
    """
    name = kernel_name.lower()
    for key, kind in (
        ("allgather", "all_gather"),
        ("reducescatter", "reduce_scatter"),
        ("allreduce", "all_reduce"),
        ("alltoall", "all_to_all"),
        ("sendrecv", "all_to_all"),
        ("send", "all_to_all"),
        ("recv", "all_to_all"),
        ("broadcast", "broadcast"),
        ("reduce", "reduce"),
    ):
        if key in name:
            return kind
    return "other"


def _numels(input_dims: object) -> set[int]:
    """Element counts of the tensors in a profiler "Input Dims" list (nested for TensorList)."""
    found: set[int] = set()
    for dims in input_dims if isinstance(input_dims, list) else []:
        if dims and all(isinstance(d, int) for d in dims):
            n = 1
            for d in dims:
                n *= d
            found.add(n)
        elif dims and all(isinstance(d, list) for d in dims):
            found |= _numels(dims)
    return found


def _gloo_all_reduce_kind(event: dict, issuers: list[dict]) -> str:
    """Whether a gloo:all_reduce event is an all_reduce or gloo's reduce_scatter.

    Rule: its issuing op is the latest c10d all-reduce or reduce-scatter op that
    started no later than the event; when shapes were recorded, only issuers with
    a tensor of the event's element count are considered (if any match). A heuristic:
    async ops queued behind busy gloo threads can still be misattributed.
    """
    start = float(event["ts"])
    before = [op for op in issuers if float(op["ts"]) <= start]
    wanted = _numels(event.get("args", {}).get("Input Dims"))
    if wanted:
        matching = [op for op in before if wanted & _numels(op.get("args", {}).get("Input Dims"))]
        before = matching or before
    if not before:
        return "all_reduce"
    issuer = max(before, key=lambda op: float(op["ts"]))
    return "reduce_scatter" if issuer["name"] in _REDUCE_SCATTER_OPS else "all_reduce"


def gloo_kind(event: dict, issuers: list[dict]) -> str:
    """Collective kind of a "gloo:<op>" event (gloo:all_reduce resolved via its issuer)."""
    op = event["name"].removeprefix("gloo:")
    return _gloo_all_reduce_kind(event, issuers) if op == "all_reduce" else op


def comm_events_by_kind(trace: dict) -> dict[str, list[Interval]]:
    """Communication intervals (seconds) per kind: NCCL kernels and gloo events."""
    events = _complete_events(trace)
    issuers = [e for e in events if e["name"] in _REDUCE_SCATTER_OPS | _ALL_REDUCE_OPS]
    by_kind: dict[str, list[Interval]] = {kind: [] for kind in MAIN_KINDS}
    for e in events:
        if _is_nccl_kernel(e):
            kind = nccl_kind(e["name"])
        elif _is_gloo_comm(e):
            kind = gloo_kind(e, issuers)
        else:
            continue
        by_kind.setdefault(kind, []).append(_interval(e))
    return by_kind


def comm_time_by_kind(trace: dict) -> dict[str, float]:
    """Seconds of communication per kind: |U(intervals of that kind)|.

    Always has all_gather, reduce_scatter, all_to_all, all_reduce (0.0 when absent),
    plus any other kind found (broadcast, ...).
    """
    return {kind: total_len(intervals) for kind, intervals in comm_events_by_kind(trace).items()}
