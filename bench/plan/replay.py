"""An event-level replay of one training step on a compute stream and communication streams.

The schedule builders (isp_schedule, peer_schedule) issue operations in the order the host
issues them. Each operation runs on one stream; a stream runs its operations one at a time in
issue order; an operation starts once its stream is free and every operation it depends on
has finished:

    start(op) = max(free(op.stream), max(end(d) for d in op.deps)),  end = start + seconds

Exposed communication follows HolisticTraceAnalysis, as bench/overlap.py measures it from
traces: the part of the union of communication intervals that no compute interval covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COMPUTE = "compute"


@dataclass(frozen=True)
class Op:
    name: str
    stream: str
    seconds: float
    deps: tuple[int, ...] = ()
    kind: str | None = None    # collective kind, None for compute
    group: str | None = None   # process group name
    nbytes: int = 0            # nccl-tests' convention (isp_core/comm_stats.py)
    host: bool = False         # host time around a call (Python, copies): on the compute stream, not compute


@dataclass
class Timeline:
    ops: list[Op]
    start: list[float]
    end: list[float]

    @property
    def step_s(self) -> float:
        return max(self.end, default=0.0)

    def intervals(self, compute: bool) -> list[tuple[float, float]]:
        return [(s, e) for op, s, e in zip(self.ops, self.start, self.end)
                if not op.host and (op.stream == COMPUTE) == compute and e > s]

    def compute_s(self) -> float:
        return _length(_union(self.intervals(True)))

    def comm_s(self) -> float:
        return _length(_union(self.intervals(False)))

    def exposed_comm_s(self) -> float:
        comm, compute = _union(self.intervals(False)), _union(self.intervals(True))
        return _length(comm) - _length(_intersect(comm, compute))

    def comm_time_by_kind(self) -> dict[str, float]:
        """Busy seconds per collective kind (sum of call durations, as traces add them)."""
        out: dict[str, float] = {}
        for op, s, e in zip(self.ops, self.start, self.end):
            if op.kind:
                out[op.kind] = out.get(op.kind, 0.0) + (e - s)
        return out


@dataclass
class Schedule:
    """Builder: `compute(...)` and `comm(...)` append operations and return their index.

    `host_sync`: the host issues a launch only once its previous compute finished (CPU
    devices, where compute is synchronous); on GPUs the host runs ahead and a launch only
    waits for its stream and its data.
    """

    host_sync: bool = True
    call_overhead_s: float = 0.0  # host time before each collective call (Hardware.call_overhead_s)
    ops: list[Op] = field(default_factory=list)
    _waits: list[int] = field(default_factory=list)   # comm the next compute must wait for
    last_compute: int | None = None

    def compute(self, name: str, seconds: float, deps: tuple[int, ...] = ()) -> int:
        deps = tuple(deps) + tuple(self._waits)
        self._waits = []
        self.ops.append(Op(name, COMPUTE, max(0.0, seconds), deps))
        self.last_compute = len(self.ops) - 1
        return self.last_compute

    def comm(self, name: str, group: str, kind: str, nbytes: int, seconds: float, sync: bool,
             needs_compute: bool = False, deps: tuple[int, ...] = ()) -> int:
        """A collective on `group`'s stream. `needs_compute`: its input is the last compute's
        output (a gradient, activations), so it cannot start before that compute ends."""
        deps = tuple(deps)
        if self.call_overhead_s > 0:  # the host's own work comes first, once it is free
            hdeps = tuple(self._waits) if self.host_sync else ()
            self.ops.append(Op(f"host.{name}", COMPUTE, self.call_overhead_s, hdeps, host=True))
            self.last_compute = len(self.ops) - 1
        if self.last_compute is not None and (needs_compute or self.host_sync):
            deps += (self.last_compute,)
        if self.host_sync:  # a blocked host issues nothing until its synchronous calls return
            deps += tuple(self._waits)
        self.ops.append(Op(name, group, max(0.0, seconds), deps, kind, group, int(nbytes)))
        index = len(self.ops) - 1
        if sync:
            self._waits.append(index)
        return index

    def wait(self, *indices: int) -> None:
        """The next compute waits for these (an async handle's wait())."""
        self._waits.extend(indices)

    def tally(self) -> dict[str, dict[str, dict[str, int]]]:
        """{group: {kind: {calls, bytes}}}, comparable with isp_core's formulas."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for op in self.ops:
            if op.kind:
                entry = out.setdefault(op.group, {}).setdefault(op.kind, {"calls": 0, "bytes": 0})
                entry["calls"] += 1
                entry["bytes"] += op.nbytes
        return {g: dict(sorted(k.items())) for g, k in sorted(out.items())}


def replay(schedule: Schedule) -> Timeline:
    free: dict[str, float] = {}
    start, end = [], []
    if schedule._waits:  # trailing waits (the end of a step) become a zero-length compute
        schedule.compute("step.end", 0.0)
    for op in schedule.ops:
        s = max([free.get(op.stream, 0.0)] + [end[d] for d in op.deps])
        start.append(s)
        end.append(s + op.seconds)
        free[op.stream] = s + op.seconds
    return Timeline(list(schedule.ops), start, end)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)
