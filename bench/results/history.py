"""A SQLite history of runs, so a nightly can be judged against its own recent past.

One row per run folder (keyed by its resolved path, so recording again after a
resume replaces rather than duplicates) and one row per (run, cell, metric) with
the value and, where the metric has them, its per-step samples as JSON.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.results.records import Run, flatten, load_run, metric_samples, metric_value
from bench.results.verdict import METRICS

DEFAULT_DB = Path("results/history.sqlite")
MATCHES_FORMULA = "comm.matches_prediction"  # 1.0 when the counted bytes equal the formula, else 0.0
DbLike = str | Path | sqlite3.Connection

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    utc TEXT,
    git_commit TEXT,
    hostname TEXT,
    torch TEXT,
    gpu TEXT,
    driver TEXT,
    config_name TEXT
);
CREATE TABLE IF NOT EXISTS cell_metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    cell TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    samples_json TEXT,
    PRIMARY KEY (run_id, cell, metric)
);
CREATE INDEX IF NOT EXISTS cell_metrics_by_cell ON cell_metrics (cell, metric);
CREATE TABLE IF NOT EXISTS cell_status (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    cell TEXT NOT NULL,
    status TEXT NOT NULL,
    device TEXT,
    PRIMARY KEY (run_id, cell)
);
"""
# Columns added after the first release, so a change point can be laid beside what changed
# that night; connect() adds them to an older DB (their values stay NULL for old runs).
ADDED_RUN_COLUMNS = ("cuda", "nccl", "gpu_count", "nnodes")
RUN_COLUMNS = ("id", "name", "path", "utc", "git_commit", "hostname", "torch", "gpu", "driver", "config_name",
               *ADDED_RUN_COLUMNS)
SCHEMA_VERSION = 2  # PRAGMA user_version: 0/1 the first schema, 2 with ADDED_RUN_COLUMNS and cell_status


@contextmanager
def connect(db: DbLike) -> Iterator[sqlite3.Connection]:
    """A connection with the schema in place; commits on success when it opened the file itself."""
    if isinstance(db, sqlite3.Connection):
        yield db
        return
    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executescript(_SCHEMA)
        _migrate(conn)
        yield conn
        conn.commit()
    finally:
        conn.close()


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a DB written by an older version up to SCHEMA_VERSION, in place."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    for column in ADDED_RUN_COLUMNS:
        if column not in have:
            conn.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _text(value: Any) -> str | None:
    # env.json may describe the GPU as a string or as a dict of details.
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _cell_rows(run: Run) -> Iterator[tuple[str, str, float, str | None]]:
    for cell, record in run.ok_records().items():
        seen: set[str] = set()
        for spec in METRICS:  # the compared metrics, with the samples the rank test needs
            value = metric_value(record, spec.name)
            if value is not None:
                samples = metric_samples(record, spec.name)
                seen.add(spec.name)
                yield cell, spec.name, value, json.dumps(samples) if samples else None
        for name, leaf in flatten(record.get("metrics")).items():  # every other number, for trends
            if name not in seen and isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
                yield cell, name, float(leaf), None
        matches = (record.get("metrics") or {}).get("comm", {}).get("matches_prediction")
        if isinstance(matches, bool):  # bytes = formula, an exact check for the nightly: 1 or 0
            yield cell, MATCHES_FORMULA, float(matches), None


def _device(record: dict[str, Any]) -> str | None:
    run_cfg = (record.get("config") or {}).get("run") or {}
    return _text(run_cfg.get("device")) if isinstance(run_cfg, dict) else None


def record_run(db: DbLike, run_dir: Path | str) -> int:
    """Insert or replace one run folder; returns its run id."""
    run = load_run(run_dir)
    env = run.env
    row = (
        run.name, str(run.path.resolve()), run.utc, _text(env.get("git_commit")), _text(env.get("hostname")),
        _text(env.get("torch")), _text(env.get("gpu")), _text(env.get("driver")), run.config_name,
        *(_text(None if env.get(c) is None else str(env[c])) for c in ADDED_RUN_COLUMNS),
    )
    with connect(db) as conn:
        old = conn.execute("SELECT id FROM runs WHERE path = ?", (row[1],)).fetchone()
        if old is None:
            cur = conn.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS[1:])}) VALUES ({', '.join('?' * len(row))})", row)
            run_id = int(cur.lastrowid)  # type: ignore[arg-type]
        else:
            run_id = int(old[0])
            sets = ", ".join(f"{c} = ?" for c in RUN_COLUMNS[1:])
            conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*row, run_id))
            conn.execute("DELETE FROM cell_metrics WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM cell_status WHERE run_id = ?", (run_id,))
        conn.executemany(
            "INSERT INTO cell_status (run_id, cell, status, device) VALUES (?, ?, ?, ?)",
            [(run_id, c, str(r.get("status")), _device(r)) for c, r in run.records.items()],
        )
        conn.executemany(
            "INSERT INTO cell_metrics (run_id, cell, metric, value, samples_json) VALUES (?, ?, ?, ?, ?)",
            [(run_id, *r) for r in _cell_rows(run)],
        )
    return run_id


def list_runs(db: DbLike) -> list[dict[str, Any]]:
    """Recorded runs, oldest first, each with how many cells it recorded."""
    with connect(db) as conn:
        rows = conn.execute(
            f"SELECT {', '.join('r.' + c for c in RUN_COLUMNS)}, COUNT(DISTINCT m.cell) FROM runs r "
            "LEFT JOIN cell_metrics m ON m.run_id = r.id GROUP BY r.id ORDER BY r.utc, r.id"
        ).fetchall()
    return [dict(zip((*RUN_COLUMNS, "cells"), row)) for row in rows]


@dataclass(frozen=True)
class HistoryPoint:
    run_id: int
    run_name: str
    utc: str | None
    value: float
    samples: list[float] | None
    run_path: str = ""


def history_points(
    db: DbLike,
    cell: str,
    metric: str,
    n: int | None = None,
    before_utc: str | None = None,
    config_name: str | None = None,
    exclude_path: Path | str | None = None,
) -> list[HistoryPoint]:
    """The last n recorded values of (cell, metric), newest first, optionally restricted."""
    sql = (
        "SELECT r.id, r.name, r.utc, m.value, m.samples_json, r.path FROM cell_metrics m JOIN runs r ON r.id = m.run_id "
        "WHERE m.cell = ? AND m.metric = ?"
    )
    params: list[Any] = [cell, metric]
    if before_utc is not None:
        sql += " AND r.utc < ?"
        params.append(before_utc)
    if config_name is not None:
        sql += " AND r.config_name = ?"
        params.append(config_name)
    if exclude_path is not None:
        sql += " AND r.path != ?"
        params.append(str(Path(exclude_path).resolve()))
    sql += " ORDER BY r.utc DESC, r.id DESC"
    if n is not None:
        sql += " LIMIT ?"
        params.append(n)
    with connect(db) as conn:
        rows = conn.execute(sql, params).fetchall()
    return [HistoryPoint(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None, r[5]) for r in rows]


def median_of_last(
    db: DbLike, cell: str, metric: str, n: int, before_utc: str | None = None, **where: Any
) -> float | None:
    points = history_points(db, cell, metric, n, before_utc, **where)
    return statistics.median(p.value for p in points) if points else None


def pooled_samples(points: list[HistoryPoint]) -> list[float] | None:
    """All per-step samples of the given points; None unless every point has some.

    Pooling only some runs would weight the test towards those runs, so a partial
    pool is dropped and the threshold alone decides.
    """
    if not points or any(not p.samples for p in points):
        return None
    return [s for p in points for s in p.samples]  # type: ignore[union-attr]


def cells_and_metrics(db: DbLike) -> list[tuple[str, str]]:
    with connect(db) as conn:
        return conn.execute("SELECT DISTINCT cell, metric FROM cell_metrics ORDER BY cell, metric").fetchall()


def series_keys(db: DbLike) -> list[tuple[str, str, str]]:
    """Every (config name, cell, metric) series: cell ids can repeat across configurations."""
    with connect(db) as conn:
        return conn.execute(
            "SELECT DISTINCT r.config_name, m.cell, m.metric FROM cell_metrics m JOIN runs r ON r.id = m.run_id "
            "ORDER BY r.config_name, m.cell, m.metric"
        ).fetchall()


def cell_devices(db: DbLike, config_name: str) -> dict[str, str]:
    """The device each cell of a configuration last ran on (CUDA peaks are exact, RSS peaks are not)."""
    with connect(db) as conn:
        rows = conn.execute(
            "SELECT s.cell, s.device FROM cell_status s JOIN runs r ON r.id = s.run_id WHERE r.config_name = ? "
            "AND s.device IS NOT NULL ORDER BY r.utc, r.id", (config_name,)
        ).fetchall()
    return dict(rows)


def ok_before(db: DbLike, cell: str, config_name: str, run_path: Path | str, before_utc: str | None) -> bool:
    """Whether an earlier run of the configuration has this cell ok (metrics recorded)."""
    return bool(history_points(db, cell, "step_time_s", 1, before_utc=before_utc, config_name=config_name,
                               exclude_path=run_path))
