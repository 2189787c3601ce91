"""One (cell, metric) series of a configuration judged up to one night, with what explains it.

The series is every recorded night of the configuration up to the judged one, oldest first.
bench/results/series_state.py says which regressions are open; this module turns each into a
`Change` that names the run it started at, what else changed that night, and its cause:

- `machine`: a canary cell (`run.canary: true`) moved within a night of its start, or env.json
  differed from the night before in driver, CUDA, NCCL, GPU, GPU count, node count or
  hostnames (`machine changed: canary ws8 busbw -12%`); a canary's own move is the machine;
- `straggler`: the regression is gone without the nights whose record named a straggler rank
  (`straggler rank 5 (node 0), lag 12.0%`);
- `code`: anything else. Only these fail the nightly (docs/compare.md, exit codes).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from bench.results.acks import Ack, acks
from bench.results.changepoint import DetectorSettings, change_points
from bench.results.history import (MATCHES_FORMULA, STRAGGLERS, HistoryPoint, cell_devices, history_points,
                                   list_runs)
from bench.results.series_state import AckPoint, Shift, judge_values
from bench.results.verdict import METRICS, METRICS_BY_NAME

BYTES_PER_STEP = "comm.bytes_per_step"
BUSBW = "collectives.avg_busbw_gbps"  # a collectives cell's figure (docs/collectives.md); higher is better
PEAK = "peak_memory_bytes"
SHORT = {"step_time_s": "step time", BUSBW: "busbw", "tokens_per_s": "tokens/s"}
ENV_COLUMNS = ("git_commit", "torch", "cuda", "nccl", "driver", "gpu", "gpu_count", "nnodes", "hostname", "hostnames")
MACHINE_KEYS = ("driver", "cuda", "nccl", "gpu", "gpu_count", "nnodes", "hostnames")
REGRESSION, MACHINE, STRAGGLER = "regression", "machine change", "straggler"
IMPROVEMENT, NO_CHANGE, TOO_LITTLE = "improvement", "no change", "too little history"
CAUSE_STATUS = {"code": REGRESSION, "machine": MACHINE, "straggler": STRAGGLER}  # worst first


@dataclass(frozen=True)
class NightlySettings:
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    min_history: int = 5  # K: earlier runs a series needs before it is judged
    recent: int = 3  # an improvement is shown for this many runs from its start

    def __post_init__(self) -> None:
        if self.min_history < 1 or self.recent < 1:
            raise ValueError("min_history and recent must be >= 1")


@dataclass(frozen=True)
class Change:
    start_run: str  # name of the first run at the new level
    start_utc: str | None
    before: float  # the level it left
    after: float  # the level now
    rel_change: float
    confidence: float
    # Run metadata that differs between the start run and the run before it: {key: [before, after]}.
    changed: dict[str, list[Any]] = field(default_factory=dict)
    cause: str = "code"  # code, machine or straggler (module docstring)
    label: str = ""  # why it is not the code: "machine changed: ...", "straggler rank 5 (node 0), ..."


@dataclass(frozen=True)
class SeriesVerdict:
    cell: str
    metric: str
    check: str  # "change point", "exact" or "loss curve"
    status: str  # regression, machine change, straggler, improvement, no change, too little history
    earlier_runs: int
    value: float | None  # tonight's; None when the cell was not measured tonight
    change: Change | None = None  # the newest open regression, else a recent improvement
    note: str = ""
    open: tuple[Change, ...] = ()  # every open regression of the series, oldest first


@dataclass(frozen=True)
class Night:
    run_id: int
    name: str
    utc: str | None


class NightPoint(Protocol):
    """A night of a series: a HistoryPoint, or a loss curve's night (bench/results/loss_nights.py)."""

    @property
    def run_id(self) -> int: ...
    @property
    def run_name(self) -> str: ...
    @property
    def utc(self) -> str | None: ...


def higher_is_better(metric: str) -> bool:
    spec = METRICS_BY_NAME.get(metric)
    return spec.higher_is_better if spec else metric in (MATCHES_FORMULA, BUSBW)


def judged_metrics(device: str) -> list[tuple[str, bool]]:
    """(metric, exact) pairs judged for one cell: a CUDA allocator peak is exact, an RSS peak is not.
    A collectives cell has only BUSBW, a training cell everything else: absent series are skipped."""
    cuda = device.startswith("cuda")
    pairs = [(m.name, m.name == PEAK and cuda) for m in METRICS]
    return [*pairs, (BUSBW, False), (MATCHES_FORMULA, True), (BYTES_PER_STEP, True)]


def env_changes(a: dict[str, Any] | None, b: dict[str, Any] | None, keys: tuple[str, ...] = ENV_COLUMNS,
                known_only: bool = False) -> dict[str, list[Any]]:
    """{key: [before, after]} where two runs' rows differ; known_only: both sides recorded."""
    if not a or not b:
        return {}
    return {k: [a.get(k), b.get(k)] for k in keys
            if a.get(k) != b.get(k) and not (known_only and (a.get(k) is None or b.get(k) is None))}


def machine_stays(key: str, before: Any, after: Any, earlier: list[dict[str, Any]],
                  later: list[dict[str, Any]]) -> bool:
    """Whether every later night still ran on what changed: the hosts that came in (hostnames),
    else no value the series had before the change (driver, CUDA, NCCL, GPU, counts)."""
    if key == "hostnames":
        came = set(str(after).split(",")) - set(str(before).split(","))
        return all(run.get(key) is None or came <= set(str(run[key]).split(",")) for run in later)
    old = {run.get(key) for run in earlier if run.get(key) is not None}
    return all(run.get(key) not in old for run in later)


def describe_stragglers(straggler: dict[str, Any]) -> str:
    """'straggler rank 5 (node 0), lag 12.0%' from a record's metrics.straggler (shared schema)."""
    ranks = [f"rank {s.get('rank')} (node {s.get('node')}), lag {float(s.get('lag_pct') or 0):.1f}%"
             for s in straggler.get("stragglers") or []]
    nodes = [f"node {s.get('node')}, lag {float(s.get('lag_pct') or 0):.1f}%" for s in straggler.get("node_stragglers") or []]
    return "straggler " + "; ".join(ranks + nodes) if ranks or nodes else ""


class Context:
    """What judging the series of one configuration up to one night needs from the DB, read once.
    `records`: the judged night's records, which name every straggler (the DB keeps the slowest)."""

    def __init__(self, db: sqlite3.Connection, config_name: str, night: Night, settings: NightlySettings,
                 records: dict[str, dict[str, Any]] | None = None) -> None:
        self.db, self.config_name, self.night, self.settings = db, config_name, night, settings
        self.records = records or {}
        self.runs = {r["id"]: r for r in list_runs(db)}
        self.acks: dict[tuple[str, str], list[Ack]] = {}
        for ack in acks(db, config_name):
            self.acks.setdefault((ack.cell, ack.metric), []).append(ack)
        self.moves: dict[int, list[str]] = {}  # run id -> canary moves that started that night
        self.devices = cell_devices(db, config_name)
        self._points: dict[tuple[str, str], list[HistoryPoint]] = {}

    def points(self, cell: str, metric: str) -> list[HistoryPoint]:
        """The series up to the judged night, oldest first (ending at it when it measured the cell)."""
        if (cell, metric) not in self._points:  # the straggler counts serve every metric of a cell
            points = history_points(self.db, cell, metric, config_name=self.config_name)
            night = self.night
            older = [p for p in reversed(points) if p.run_id != night.run_id and (p.utc or "") <= (night.utc or "")]
            self._points[cell, metric] = [*older, *(p for p in points if p.run_id == night.run_id)]
        return self._points[cell, metric]

    def add_canary(self, cell: str) -> None:
        """Every change point of a canary's main figure is a move of the machine on its start night."""
        for metric in (BUSBW, "step_time_s"):
            points = self.points(cell, metric)
            if points:
                for cp in change_points([p.value for p in points], self.settings.detector):
                    text = f"canary {cell} {SHORT.get(metric, metric)} {cp.rel_change:+.0%}"
                    self.moves.setdefault(points[cp.index].run_id, []).append(text)
                return

    def machine_label(self, points: Sequence[NightPoint], start: int) -> str:
        near = [points[i].run_id for i in range(max(0, start - 1), min(len(points), start + 2))]
        events = [m for run_id in dict.fromkeys(near) for m in self.moves.get(run_id, [])]
        if start > 0:
            diff = env_changes(self.runs.get(points[start - 1].run_id), self.runs.get(points[start].run_id),
                               MACHINE_KEYS, known_only=True)
            # A machine explains a new level only while the machine stays: a level that outlasts
            # the change (a later night at it without the hosts that came in, or back on an old
            # driver) is the code's, so a cluster that hands out other nodes each night sees it red.
            if diff:
                earlier = [self.runs.get(p.run_id) or {} for p in points[:start]]
                later = [self.runs.get(p.run_id) or {} for p in points[start + 1:]]
                events += [f"{k} {a} -> {b}" for k, (a, b) in diff.items() if machine_stays(k, a, b, earlier, later)]
        return "machine changed: " + "; ".join(events) if events else ""

    def straggler_nights(self, cell: str, points: list[HistoryPoint]) -> list[bool]:
        counts = {p.run_id: p.value for p in self.points(cell, STRAGGLERS)}
        return [counts.get(p.run_id, 0.0) > 0 for p in points]

    def straggler_label(self, cell: str, points: list[HistoryPoint], flags: list[bool], start: int) -> str:
        """The newest straggler night from the regression's start on, named as its record names it."""
        night = next((i for i in range(len(points) - 1, start - 1, -1) if flags[i]), None)
        if night is None:
            return "straggler"
        run_id = points[night].run_id
        record = self.records.get(cell) if run_id == self.night.run_id else None
        straggler = ((record or {}).get("metrics") or {}).get("straggler")
        if isinstance(straggler, dict) and describe_stragglers(straggler):
            return describe_stragglers(straggler)
        slowest = {k: {p.run_id: p.value for p in self.points(cell, f"straggler.slowest.{k}")}.get(run_id)
                   for k in ("rank", "node", "lag_pct")}
        lag = f", lag {slowest['lag_pct']:.1f}%" if slowest["lag_pct"] is not None else ""
        return (f"straggler rank {slowest['rank'] or 0:.0f} (node {slowest['node'] or 0:.0f}){lag} "
                f"on {points[night].run_name}")

    def ack_points(self, cell: str, metric: str, points: Sequence[NightPoint]) -> list[AckPoint]:
        """Each acknowledgement at the last night of the series its author could have seen."""
        return [(sum(1 for p in points if (p.utc or "") <= (a.run_utc or "")) - 1, a.level)
                for a in self.acks.get((cell, metric), [])]

    def change(self, points: Sequence[NightPoint], shift: Shift, cell: str, metric: str, canary: bool,
               straggler: str = "") -> Change:
        start = points[shift.start]
        before = self.runs.get(points[shift.start - 1].run_id) if shift.start > 0 else None
        changed = env_changes(before, self.runs.get(start.run_id))
        machine = (f"machine changed: canary {cell} {SHORT.get(metric, metric)} {shift.rel_change:+.0%}" if canary
                   else self.machine_label(points, shift.start))
        cause = "machine" if machine else "straggler" if straggler else "code"
        label = "; ".join(t for t in (machine, straggler) if t)
        return Change(start.run_name, start.utc, shift.before, shift.after, shift.rel_change, shift.confidence,
                      changed, cause, label)


def status_of(opens: tuple[Change, ...]) -> str | None:
    causes = {c.cause for c in opens}
    return next((status for cause, status in CAUSE_STATUS.items() if cause in causes), None)


def open_note(opens: tuple[Change, ...], measured: bool) -> str:
    parts = [f"open since {c.start_run}, {c.rel_change:+.0%}" + (f" ({c.label})" if c.label else "") for c in opens]
    return "; ".join(parts if measured else ["not measured tonight", *parts])


def judge_series(ctx: Context, cell: str, metric: str, exact: bool, canary: bool = False) -> SeriesVerdict | None:
    """The verdict of one series; None when it has no point, or was not measured and has nothing open."""
    points = ctx.points(cell, metric)
    if not points:
        return None
    measured = points[-1].run_id == ctx.night.run_id
    values = [p.value for p in points]
    check, earlier = ("exact" if exact else "change point"), len(points) - measured
    s = ctx.settings
    if measured and metric == MATCHES_FORMULA and values[-1] != 1.0:  # wrong tonight whatever the history
        start = next(i for i in range(len(values) - 1, -1, -1) if i == 0 or values[i - 1] == 1.0)
        # No machine explains bytes that differ from the formula: the code counts them.
        c = replace(ctx.change(points, Shift(start, 1.0, values[-1], 1.0), cell, metric, False), cause="code", label="")
        return SeriesVerdict(cell, metric, check, REGRESSION, earlier, values[-1], c,
                             "counted bytes differ from the formula", (c,))
    if earlier < s.min_history:
        return SeriesVerdict(cell, metric, check, TOO_LITTLE, earlier, values[-1],
                             note=f"{earlier} earlier run(s), K = {s.min_history}") if measured else None
    # A slow rank moves the timings, not what a rank allocates: memory is judged on every night.
    flags = ctx.straggler_nights(cell, points) if metric != PEAK else [False] * len(points)
    state = judge_values(values, s.detector, s.recent, higher_is_better=higher_is_better(metric), exact=exact,
                         acks=ctx.ack_points(cell, metric, points), stragglers=flags)
    opens = tuple(ctx.change(points, o, cell, metric, canary,
                             ctx.straggler_label(cell, points, flags, o.start) if o.straggler_only else "")
                  for o in state.open)
    if not measured and not opens:
        return None
    improved = ctx.change(points, state.improvement, cell, metric, canary) if state.improvement else None
    status = status_of(opens) or (IMPROVEMENT if improved else NO_CHANGE)
    if status == NO_CHANGE and measured and flags[-1] and not exact:
        # Tonight's record names a straggler rank, so tonight's value is left out of the code's
        # series (judge_values): labelled as the straggler's night, not judged, whatever it shows.
        # (Two such nights that move the series open a straggler-only change above.)
        label = ctx.straggler_label(cell, points, flags, len(points) - 1)
        return SeriesVerdict(cell, metric, check, STRAGGLER, earlier, values[-1], None,
                             f"{label} tonight: tonight's value is not judged as the code")
    return SeriesVerdict(cell, metric, check, status, earlier, values[-1] if measured else None,
                         opens[-1] if opens else improved, open_note(opens, measured), opens)
