"""What the dashboard shows, read from the history DB (and each run's nightly.json) in one pass.

Pages and charts take these plain objects and never query anything themselves.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field, replace
from typing import Any

from bench.dashboard.judgements import Judgements, Mark, OpenRegression, nightly_json, read_judgements
from bench.results.changepoint import DetectorSettings
from bench.results.history import DbLike, connect, history_points, list_runs


@dataclass(frozen=True)
class Trend:
    names: tuple[str, ...]  # history metric names; the first that has values is charted
    title: str
    unit: str  # as shown
    scale: float  # shown = stored * scale
    band: bool = False  # p10-p90 band from NAME.p10 / NAME.p90
    always: bool = True  # charted (empty, saying so) even when no run recorded it


BUSBW = "collectives.avg_busbw_gbps"  # a collectives cell's one figure (a canary's, in a nightly)
TRENDS: tuple[Trend, ...] = (
    Trend(("step_time_s",), "step time (median, p10-p90 band)", "ms", 1e3, band=True),
    Trend(("tokens_per_s",), "tokens/s", "tokens/s", 1.0),
    Trend(("mfu",), "MFU", "%", 100.0),
    Trend(("peak_memory_bytes",), "peak memory", "MiB", 2.0**-20),
    Trend(("exposed_comm_s",), "exposed communication", "ms", 1e3),
    Trend(("energy_per_token_j", "nvml.energy_per_token_j"), "energy per token", "mJ", 1e3),
    # The planner's relative error against each run (metrics.plan, issue 21), when recorded.
    Trend(("plan.step_time_s.rel_error",), "plan error: step time", "%", 100.0, always=False),
    Trend(("plan.peak_memory_bytes.rel_error",), "plan error: peak memory", "%", 100.0, always=False),
    Trend(("plan.exposed_comm_s.rel_error",), "plan error: exposed comm", "%", 100.0, always=False),
    Trend((BUSBW,), "bus bandwidth (mean over ops and sizes)", "GB/s", 1.0, always=False),
)


@dataclass(frozen=True)
class Point:
    run_id: int
    run: str
    utc: str
    commit: str
    value: float
    lo: float | None = None
    hi: float | None = None


@dataclass
class Series:
    trend: Trend
    metric: str  # the history name charted ("" when none has values)
    points: list[Point]
    changes: list[Mark] = field(default_factory=list)
    acks: list[Mark] = field(default_factory=list)


@dataclass
class CellView:
    config: str
    cell: str
    status: str  # in the config's newest run that has the cell
    verdict: str  # in the newest judged run (nightly.json), or "not judged"
    series: list[Series]

    def latest(self, metric: str) -> float | None:
        mine = next((s for s in self.series if s.metric == metric and s.points), None)
        return mine.points[-1].value if mine else None


@dataclass
class ConfigView:
    name: str
    runs: list[dict[str, Any]]  # list_runs() rows, oldest first
    cells: list[CellView]
    open_regressions: list[OpenRegression]
    nightly: dict[int, dict[str, Any] | None]  # run id -> its nightly.json


def _statuses(conn: sqlite3.Connection, config: str) -> dict[str, str]:
    """Each cell's status in the config's newest run that has it."""
    rows = conn.execute("SELECT s.cell, s.status FROM cell_status s JOIN runs r ON r.id = s.run_id "
                        "WHERE r.config_name = ? ORDER BY r.utc, r.id", (config,)).fetchall()
    return dict(rows)


def cell_verdict(doc: dict[str, Any] | None, cell: str) -> str:
    """One word for a cell in a nightly result: its worst series status."""
    if doc is None:
        return "not judged"
    failed = {f["cell"]: f["status"] for f in doc.get("failed_cells", [])}
    if cell in failed:
        return failed[cell]
    statuses = {s["status"] for s in doc.get("series", []) if s["cell"] == cell}
    # issue 19's nightly adds "machine change" and "straggler": a move the code did not cause
    for word in ("regression", "machine change", "straggler", "improvement", "no change", "too little history"):
        if word in statuses:
            return word
    return "not judged"


def _series(conn: sqlite3.Connection, config: str, cell: str, trend: Trend, commits: dict[int, str],
            judged: Judgements) -> Series | None:
    for name in trend.names:
        points = list(reversed(history_points(conn, cell, name, config_name=config)))
        if points:
            lo = hi = {}
            if trend.band:
                lo = {p.run_id: p.value for p in history_points(conn, cell, f"{name}.p10", config_name=config)}
                hi = {p.run_id: p.value for p in history_points(conn, cell, f"{name}.p90", config_name=config)}
            shown = [Point(p.run_id, p.run_name, p.utc or "", commits.get(p.run_id, ""), p.value,
                           lo.get(p.run_id), hi.get(p.run_id)) for p in points]
            key = (config, cell, name)
            runs = [p.run for p in shown]  # an ack names the run it was made at
            acks = [replace(m, index=runs.index(m.run)) for m in judged.acks.get(key, []) if m.run in runs]
            return Series(trend, name, shown, judged.changes.get(key, []), acks)
    return Series(trend, "", []) if trend.always else None


def read_site(db: DbLike, settings: DetectorSettings | None = None) -> list[ConfigView]:
    runs = list_runs(db)
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_config.setdefault(r["config_name"] or "", []).append(r)
    newest_paths = {c: [r["path"] for r in reversed(rs)] for c, rs in by_config.items()}
    judged = read_judgements(db, newest_paths, settings or DetectorSettings())
    commits = {r["id"]: r["git_commit"] or "" for r in runs}
    views = []
    with connect(db) as conn:
        for config, config_runs in sorted(by_config.items()):
            nightly = {r["id"]: nightly_json(r["path"]) for r in config_runs}
            newest_judged = next((nightly[r["id"]] for r in reversed(config_runs) if nightly[r["id"]]), None)
            cells = []
            for cell, status in sorted(_statuses(conn, config).items()):
                series = [s for t in TRENDS if (s := _series(conn, config, cell, t, commits, judged)) is not None]
                if any(s.metric == BUSBW and s.points for s in series):  # a collectives cell: no training charts
                    series = [s for s in series if s.points]
                cells.append(CellView(config, cell, status, cell_verdict(newest_judged, cell), series))
            views.append(ConfigView(config, config_runs, cells, judged.open_regressions.get(config, []), nightly))
    return views
