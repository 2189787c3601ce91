"""Judge a recorded run against the history of its configuration, series by series.

Every (cell, metric) of the run is a series over the recorded runs of the same config
name, oldest first, ending with this run. Timing-type metrics go through change-point
detection (bench.results.changepoint): the run is a regression when the newest change
point started within the last `recent` runs and moved the metric the wrong way.
Exact metrics are not statistical: a CUDA allocator's peak is the same number every run
of the same code, so any rise is a regression; the counted communication bytes must
equal the formula (`comm.matches_prediction`) and must not change between runs.

Exit codes (the contract for CI): 0 nothing regressed, 1 a regression, 2 bad input,
3 a series has fewer than K earlier runs (and nothing regressed), so it was not judged.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.results.history import (MATCHES_FORMULA, DbLike, HistoryPoint, cell_devices, connect, history_points,
                                   list_runs, ok_before, series_keys)
from bench.results.records import Run
from bench.results.changepoint import ChangePoint, DetectorSettings, detect, latest_change
from bench.results.verdict import METRICS, METRICS_BY_NAME

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_TOO_LITTLE = 0, 1, 2, 3
BYTES_PER_STEP = "comm.bytes_per_step"
PEAK = "peak_memory_bytes"


@dataclass(frozen=True)
class NightlySettings:
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    min_history: int = 5  # K: earlier runs a series needs before it is judged
    recent: int = 3  # a change point is news (and fails the gate) for this many runs

    def __post_init__(self) -> None:
        if self.min_history < 1 or self.recent < 1:
            raise ValueError("min_history and recent must be >= 1")


@dataclass(frozen=True)
class Change:
    start_run: str  # name of the first run at the new level
    start_utc: str | None
    before: float
    after: float
    rel_change: float
    confidence: float
    # Run metadata that differs between the start run and the run before it: {key: [before, after]}.
    changed: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesVerdict:
    cell: str
    metric: str
    check: str  # "change point" or "exact"
    status: str  # regression, improvement, no change, too little history
    earlier_runs: int
    value: float | None
    change: Change | None = None
    note: str = ""


@dataclass
class NightlyResult:
    run: str
    config_name: str
    settings: NightlySettings
    verdicts: list[SeriesVerdict]
    failed_cells: list[tuple[str, str, bool]]  # cell, status, had ok history

    @property
    def exit_code(self) -> int:
        if any(v.status == "regression" for v in self.verdicts) or any(f[2] for f in self.failed_cells):
            return EXIT_REGRESSION
        if any(v.status == "too little history" for v in self.verdicts) or self.failed_cells:
            return EXIT_TOO_LITTLE
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run, "config_name": self.config_name, "exit_code": self.exit_code,
            "settings": asdict(self.settings),
            "regressions": sum(v.status == "regression" for v in self.verdicts),
            "improvements": sum(v.status == "improvement" for v in self.verdicts),
            "failed_cells": [{"cell": c, "status": s, "ok_before": ok} for c, s, ok in self.failed_cells],
            "series": [asdict(v) for v in self.verdicts],
        }


def _worse(metric: str, rel_change: float) -> bool:
    spec = METRICS_BY_NAME.get(metric)
    higher_is_better = spec.higher_is_better if spec else metric == MATCHES_FORMULA
    return (rel_change > 0) != higher_is_better


ENV_COLUMNS = ("git_commit", "torch", "cuda", "nccl", "driver", "gpu", "gpu_count", "nnodes", "hostname")
Runs = dict[int, dict[str, Any]]  # list_runs() rows by run id


def _change(points: list[HistoryPoint], cp: ChangePoint, runs: Runs | None = None) -> Change:
    """The change as reported, with what else changed that night (the commit, torch, the driver...)."""
    start = points[cp.index]
    changed: dict[str, list[Any]] = {}
    if runs and cp.index > 0:
        a, b = runs.get(points[cp.index - 1].run_id), runs.get(start.run_id)
        if a and b:
            changed = {k: [a.get(k), b.get(k)] for k in ENV_COLUMNS if a.get(k) != b.get(k)}
    return Change(start.run_name, start.utc, cp.before, cp.after, cp.rel_change, cp.confidence, changed)


def exact_change(values: list[float]) -> ChangePoint | None:
    """Where the trailing run of equal values began, against the value before it."""
    start = len(values) - 1
    while start > 0 and values[start - 1] == values[start]:
        start -= 1
    if start == 0:
        return None
    before, after = values[start - 1], values[start]
    rel = (after - before) / abs(before) if before else after - before
    return ChangePoint(start, before, after, rel, 0.0)


def judge_series(points: list[HistoryPoint], cell: str, metric: str, exact: bool,
                 settings: NightlySettings, runs: Runs | None = None) -> SeriesVerdict:
    """points: oldest first, the judged run last."""
    values = [p.value for p in points]
    check, earlier = ("exact" if exact else "change point"), len(points) - 1
    if metric == MATCHES_FORMULA and values[-1] != 1.0:  # wrong tonight whatever the history
        cp = exact_change(values) or ChangePoint(0, 1.0, values[-1], -1.0, 0.0)
        return SeriesVerdict(cell, metric, check, "regression", earlier, values[-1], _change(points, cp, runs),
                             "counted bytes differ from the formula")
    if earlier < settings.min_history:
        return SeriesVerdict(cell, metric, check, "too little history", earlier, values[-1],
                             note=f"{earlier} earlier run(s), K = {settings.min_history}")
    if exact:
        cp = exact_change(values)
        cp = cp if cp is not None and cp.index >= len(values) - settings.recent else None
    else:
        cp = latest_change(values, settings.detector, settings.recent)
    if cp is None:
        return SeriesVerdict(cell, metric, check, "no change", earlier, values[-1])
    status = "regression" if _worse(metric, cp.rel_change) else "improvement"
    return SeriesVerdict(cell, metric, check, status, earlier, values[-1], _change(points, cp, runs))


def _device(record: dict[str, Any]) -> str:
    run_cfg = (record.get("config") or {}).get("run") or {}
    return str(run_cfg.get("device", "")) if isinstance(run_cfg, dict) else ""


def judged_metrics(device: str) -> list[tuple[str, bool]]:
    """(metric, exact) pairs judged for one cell: a CUDA allocator peak is exact, an RSS peak is not."""
    cuda = device.startswith("cuda")
    pairs = [(m.name, m.name == PEAK and cuda) for m in METRICS]
    return [*pairs, (MATCHES_FORMULA, True), (BYTES_PER_STEP, True)]


def series_upto(db: DbLike, run: Run, cell: str, metric: str) -> list[HistoryPoint]:
    """The recorded series of the run's config, oldest first, ending at the run itself."""
    points = history_points(db, cell, metric, config_name=run.config_name)
    resolved = str(run.path.resolve())
    own = [p for p in points if p.run_path == resolved]
    if not own:
        return []
    mine = own[0]
    older = [p for p in points if p is not mine and (p.utc or "") <= (mine.utc or "") and p.run_id != mine.run_id]
    return [*reversed(older), mine]


def judge_run(db: Path, run: Run, settings: NightlySettings) -> NightlyResult:
    with connect(db) as conn:  # one connection for the many small queries
        return _judge_run(conn, run, settings)


def _judge_run(db: sqlite3.Connection, run: Run, settings: NightlySettings) -> NightlyResult:
    verdicts, failed = [], []
    runs = {r["id"]: r for r in list_runs(db)}
    for cell, record in run.records.items():
        if record.get("status") != "ok":
            failed.append((cell, str(record.get("status")), ok_before(db, cell, run.config_name, run.path, run.utc)))
            continue
        for metric, exact in judged_metrics(_device(record)):
            points = series_upto(db, run, cell, metric)
            if points:
                verdicts.append(judge_series(points, cell, metric, exact, settings, runs))
    return NightlyResult(run.name, run.config_name, settings, verdicts, failed)


def detect_all(db: Path, settings: DetectorSettings) -> list[dict[str, Any]]:
    """Every change point of every (config, cell, metric) series in the DB, oldest first.

    Exact metrics report each run where their value changed; the others go through the detector.
    """
    with connect(db) as conn:
        return _detect_all(conn, settings)


def _detect_all(db: sqlite3.Connection, settings: DetectorSettings) -> list[dict[str, Any]]:
    found = []
    runs = {r["id"]: r for r in list_runs(db)}
    devices: dict[str, dict[str, str]] = {}
    for config, cell, metric in series_keys(db):
        device = devices.setdefault(config, cell_devices(db, config)).get(cell, "")
        exact = dict(judged_metrics(device)).get(metric)
        if exact is None:
            continue  # only the judged metrics; the rest of the numbers are for trend plots
        points = list(reversed(history_points(db, cell, metric, config_name=config)))
        values = [p.value for p in points]
        for cp in (exact_changes(values) if exact else detect(values, settings)):
            found.append({"config_name": config, "cell": cell, "metric": metric, "runs": len(points),
                          "check": "exact" if exact else "change point",
                          "kind": "regression" if _worse(metric, cp.rel_change) else "improvement",
                          "index": cp.index, **asdict(_change(points, cp, runs))})
    return found


def exact_changes(values: list[float]) -> list[ChangePoint]:
    return [ChangePoint(i, a, b, (b - a) / abs(a) if a else b - a, 0.0)
            for i, (a, b) in enumerate(zip(values, values[1:]), start=1) if a != b]
