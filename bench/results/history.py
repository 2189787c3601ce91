"""A SQLite history of runs, so a nightly can be judged against its own recent past.

One row per run folder (keyed by its resolved path, so recording again after a
resume replaces rather than duplicates) and one row per (run, cell, metric) with
the value and, where the metric has them, its per-step samples as JSON (the loss curve
is the `loss` row's samples). `acks` keeps who accepted a series' new level, when and
why (bench/results/acks.py). A DB written by a newer version is refused, never rewritten.
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

from bench.results.history_rows import (LOSS, LOSS_KEYS, MATCHES_FORMULA, STRAGGLERS, cell_rows, hostnames,  # noqa: F401
                                        loss_key, status_row, text)
from bench.results.records import load_run

DEFAULT_DB = Path("results/history.sqlite")
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
CREATE TABLE IF NOT EXISTS acks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_name TEXT NOT NULL,
    cell TEXT NOT NULL,
    metric TEXT NOT NULL,
    level REAL NOT NULL,
    before REAL,
    run_id INTEGER REFERENCES runs(id),
    run_name TEXT,
    run_utc TEXT,
    by TEXT NOT NULL,
    utc TEXT NOT NULL,
    note TEXT NOT NULL
);
"""
# Columns added after the first release, so a change point can be laid beside what changed
# that night; connect() adds them to an older DB (their values stay NULL for old runs).
ADDED_RUN_COLUMNS = ("cuda", "nccl", "gpu_count", "nnodes")
HOSTNAMES = "hostnames"  # every node's hostname, sorted, comma-separated (env.json's nodes, else hostname)
RUN_COLUMNS = ("id", "name", "path", "utc", "git_commit", "hostname", "torch", "gpu", "driver", "config_name",
               *ADDED_RUN_COLUMNS, HOSTNAMES)
# loss_key: what fixes a cell's loss curve (LOSS_KEYS, as JSON); canary: run.canary (1/0).
ADDED_COLUMNS = {"runs": (*ADDED_RUN_COLUMNS, HOSTNAMES), "cell_status": ("loss_key", "canary")}
# PRAGMA user_version: 0/1 the first schema, 2 with ADDED_RUN_COLUMNS and cell_status, 3 with acks,
# hostnames, loss_key and canary.
SCHEMA_VERSION = 3


class HistoryTooNew(sqlite3.DatabaseError):
    """A DB written by a newer version of ISP Bench: refused for reading and writing, never downgraded."""

    def __init__(self, found: int) -> None:
        self.found = found
        super().__init__(f"history schema version {found} is newer than this code's version {SCHEMA_VERSION}; "
                         "refusing to read or write it (update ISP Bench, or pass another --db)")


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
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:  # checked before anything is written: the file stays as it was
            raise HistoryTooNew(found)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executescript(_SCHEMA)
        _migrate(conn)
        yield conn
        conn.commit()
    finally:
        conn.close()


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a DB written by an older version up to SCHEMA_VERSION, in place."""
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def record_run(db: DbLike, run_dir: Path | str) -> int:
    """Insert or replace one run folder; returns its run id."""
    run = load_run(run_dir)
    env = run.env
    row = (
        run.name, str(run.path.resolve()), run.utc, text(env.get("git_commit")), text(env.get("hostname")),
        text(env.get("torch")), text(env.get("gpu")), text(env.get("driver")), run.config_name,
        *(text(None if env.get(c) is None else str(env[c])) for c in ADDED_RUN_COLUMNS), hostnames(env),
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
            "INSERT INTO cell_status (run_id, cell, status, device, loss_key, canary) VALUES (?, ?, ?, ?, ?, ?)",
            [status_row(run_id, c, r) for c, r in run.records.items()],
        )
        conn.executemany(
            "INSERT INTO cell_metrics (run_id, cell, metric, value, samples_json) VALUES (?, ?, ?, ?, ?)",
            [(run_id, *r) for r in cell_rows(run)],
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
