"""Acknowledged regressions: who accepted a series' new level, when and why (`history ack`).

One row of the history DB's `acks` table per acknowledged (config, cell, metric) series. The
acknowledged `level` becomes the series' baseline from the run it was made after (`run_*`):
the nightly closes every regression of that series open at that run, and a later move is
measured from the acknowledged level (bench/results/series_state.py). For the loss curve
(metric `loss`) that run's curve becomes the reference. Rows are only ever added.

For dashboards: `acks(db, config_name=..., cell=..., metric=...)` lists them oldest first, as
`Ack` dataclasses (`Ack.to_json()` for a dict); bench.results.nightly.open_regressions lists
what is still open.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.results.history import DbLike, connect

COLUMNS = ("id", "config_name", "cell", "metric", "level", "before", "run_id", "run_name", "run_utc", "by",
           "utc", "note")


@dataclass(frozen=True)
class Ack:
    id: int
    config_name: str
    cell: str
    metric: str
    level: float  # the acknowledged level: the series' baseline from run_name on
    before: float | None  # the level of the regression's old baseline, for the record
    run_id: int | None  # the newest run of the config when it was acknowledged
    run_name: str | None
    run_utc: str | None
    by: str  # who
    utc: str  # when (ISO 8601, UTC)
    note: str  # why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def add_ack(db: DbLike, ack: Ack) -> int:
    """Store one acknowledgement (its `id` is ignored); returns the new id."""
    values = asdict(ack)
    with connect(db) as conn:
        cur = conn.execute(f"INSERT INTO acks ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * (len(COLUMNS) - 1))})",
                           [values[c] for c in COLUMNS[1:]])
        return int(cur.lastrowid)  # type: ignore[arg-type]


def acks(db: DbLike, config_name: str | None = None, cell: str | None = None, metric: str | None = None) -> list[Ack]:
    """Acknowledgements, oldest first, optionally of one config, cell or metric."""
    where = [(c, v) for c, v in (("config_name", config_name), ("cell", cell), ("metric", metric)) if v is not None]
    sql = f"SELECT {', '.join(COLUMNS)} FROM acks"
    if where:
        sql += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
    with connect(db) as conn:
        rows = conn.execute(sql + " ORDER BY utc, id", [v for _, v in where]).fetchall()
    return [Ack(*row) for row in rows]
