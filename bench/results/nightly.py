"""Judge a recorded run against the history of its configuration, series by series.

Every (cell, metric) of the run is a series over the recorded runs of the same config name,
oldest first, ending with this run. Timing-type metrics go through change-point detection
(bench/results/changepoint.py); exact metrics (a CUDA allocator peak, the counted bytes)
through every change of value; the loss curve through the dtype's tolerance against earlier
nights (bench/results/loss_nights.py). A regression stays open in every later verdict until
the series is back at its old level or it is acknowledged (bench/results/series_state.py,
`history ack`). Canary cells are judged first; a change that a canary move, a machine change
in env.json or a straggler rank explains is labelled so, not called a code regression
(bench/results/nightly_series.py).

Exit codes (the contract for CI; docs/compare.md): 0 nothing regressed and everything was
judged; 1 a code regression (open or new, a loss change, bytes that differ from the formula,
a cell failed that was ok before); 2 bad input; 3 nothing regressed in the code, but the night
is not judged complete: too little history, interrupted or missing cells, a change explained
by the machine or a straggler, a failed cell that never ran ok.

For dashboards: `open_regressions(db, config_name)` lists what is open now as
`OpenRegression` dataclasses; `acknowledge(...)` closes series (`history ack`); the
acknowledgements themselves are bench.results.acks.acks(db, ...).
"""

from __future__ import annotations

import fnmatch
import getpass
import json
import os
import sqlite3
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.results.acks import Ack, add_ack
from bench.results.changepoint import DetectorSettings, detect
from bench.results.history import DbLike, cell_devices, connect, history_points, list_runs, series_keys
from bench.results.loss_nights import judge_loss
from bench.results.nightly_series import (BYTES_PER_STEP, IMPROVEMENT, MACHINE, MACHINE_KEYS, NO_CHANGE,  # noqa: F401
                                          PEAK,
                                          REGRESSION, STRAGGLER, TOO_LITTLE, Change, Context, Night,
                                          NightlySettings, SeriesVerdict, env_changes, higher_is_better,
                                          judge_series, judged_metrics)
from bench.results.records import RecordError, Run, is_canary
from bench.results.series_state import exact_changes

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_TOO_LITTLE = 0, 1, 2, 3
NOT_JUDGED = (TOO_LITTLE, MACHINE, STRAGGLER)  # statuses that leave the night not judged complete


@dataclass
class NightlyResult:
    run: str
    config_name: str
    settings: NightlySettings
    verdicts: list[SeriesVerdict]
    failed_cells: list[tuple[str, str, bool]]  # cell, status, had ok history
    interrupted: list[str]  # cells a scheduler stopped (time limit, preemption): not judged
    missing: list[str]  # planned in cells.json, never recorded
    canaries: list[str]
    machine: list[str]  # what moved on the machine tonight: canary moves, env.json differences
    stragglers: dict[str, dict[str, Any]]  # cell -> its record's metrics.straggler

    @property
    def exit_code(self) -> int:
        if any(v.status == REGRESSION for v in self.verdicts) or any(f[2] for f in self.failed_cells):
            return EXIT_REGRESSION
        if any(v.status in NOT_JUDGED for v in self.verdicts) or self.failed_cells or self.interrupted \
                or self.missing:
            return EXIT_TOO_LITTLE
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        count = {s: sum(v.status == s for v in self.verdicts) for s in (REGRESSION, IMPROVEMENT, MACHINE, STRAGGLER)}
        return {
            "run": self.run, "config_name": self.config_name, "exit_code": self.exit_code,
            "settings": asdict(self.settings),
            "regressions": count[REGRESSION], "improvements": count[IMPROVEMENT],
            "machine_changes": count[MACHINE], "straggler_changes": count[STRAGGLER],
            "failed_cells": [{"cell": c, "status": s, "ok_before": ok} for c, s, ok in self.failed_cells],
            "interrupted_cells": self.interrupted, "missing_cells": self.missing,
            "canaries": self.canaries, "machine_changed": self.machine,
            "series": [asdict(v) for v in self.verdicts],
        }


def judge_run(db: Path, run: Run, settings: NightlySettings) -> NightlyResult:
    with connect(db) as conn:  # one connection for the many small queries
        return _judge_run(conn, run, settings)


def planned_cells(run: Run) -> dict[str, dict[str, Any]] | None:
    """cells.json of the run folder, {cell: its config}; None for a folder without one."""
    path = run.path / "cells.json"
    if not path.is_file():
        return None
    try:
        cells = json.loads(path.read_text())
        return {str(c["cell"]): c.get("config") or {} for c in cells}
    except (ValueError, TypeError, KeyError) as exc:
        raise RecordError(path, None, f"not a list of cells ({exc})") from None


def _night_of(db: sqlite3.Connection, run: Run) -> Night:
    row = db.execute("SELECT id FROM runs WHERE path = ?", (str(run.path.resolve()),)).fetchone()
    if row is None:
        raise RecordError(run.path, None, "not recorded in the history DB (run_bench.py history record RUN_DIR)")
    return Night(int(row[0]), run.name, run.utc)


def _ok_before(db: sqlite3.Connection, config_name: str, cell: str, night: Night) -> bool:
    return db.execute(
        "SELECT 1 FROM cell_status s JOIN runs r ON r.id = s.run_id WHERE r.config_name = ? AND s.cell = ? "
        "AND s.status = 'ok' AND r.id != ? AND COALESCE(r.utc, '') <= ? LIMIT 1",
        (config_name, cell, night.run_id, night.utc or "")).fetchone() is not None


def _judge_cell(ctx: Context, cell: str, device: str, canary: bool) -> list[SeriesVerdict]:
    found = [judge_series(ctx, cell, metric, exact, canary) for metric, exact in judged_metrics(device)]
    return [v for v in (*found, judge_loss(ctx, cell)) if v is not None]


def _machine_tonight(ctx: Context) -> list[str]:
    """Canary moves that started tonight or last night (a move is confirmed on its second night),
    and env.json against the configuration's previous run."""
    mine = [r for r in ctx.runs.values() if r["config_name"] == ctx.config_name
            and (r["utc"] or "") <= (ctx.night.utc or "")]
    ids = [r["id"] for r in sorted(mine, key=lambda r: (r["utc"] or "", r["id"]))]
    ids = ids[:ids.index(ctx.night.run_id) + 1] if ctx.night.run_id in ids else ids
    lines = [m for run_id in ids[-2:] for m in ctx.moves.get(run_id, [])]
    if len(ids) >= 2:
        diff = env_changes(ctx.runs[ids[-2]], ctx.runs[ids[-1]], MACHINE_KEYS, known_only=True)
        lines += [f"{k} {a} -> {b}" for k, (a, b) in diff.items()]
    return lines


def _judge_run(db: sqlite3.Connection, run: Run, settings: NightlySettings) -> NightlyResult:
    night = _night_of(db, run)
    ctx = Context(db, run.config_name, night, settings, run.records)
    planned = planned_cells(run)
    configs = {**(planned or {}), **{c: r.get("config") or {} for c, r in run.records.items()}}
    canaries = [c for c, cfg in configs.items() if is_canary(cfg)]
    for cell in canaries:  # first: their moves label everything else tonight
        ctx.add_canary(cell)
    verdicts: list[SeriesVerdict] = []
    failed, interrupted = [], []
    for cell in sorted(configs, key=lambda c: c not in canaries):
        record = run.records.get(cell)
        status = str(record.get("status")) if record else "missing"
        if status == "interrupted":
            interrupted.append(cell)
        elif record is not None and status != "ok":
            failed.append((cell, status, _ok_before(db, run.config_name, cell, night)))
        run_cfg = (configs[cell].get("run") or {}) if isinstance(configs[cell], dict) else {}
        device = str(run_cfg.get("device") or ctx.devices.get(cell) or "")
        verdicts += _judge_cell(ctx, cell, device, cell in canaries)
    missing = [c for c in (planned or {}) if c not in run.records]
    stragglers = {c: r["metrics"]["straggler"] for c, r in run.ok_records().items()
                  if isinstance(r["metrics"].get("straggler"), dict)}
    return NightlyResult(run.name, run.config_name, settings, verdicts, failed, interrupted, missing, canaries,
                         _machine_tonight(ctx), stragglers)


@dataclass(frozen=True)
class OpenRegression:
    """One regression still open at the newest run of a configuration (for dashboards)."""

    config_name: str
    cell: str
    metric: str
    check: str  # change point, exact, loss curve
    change: Change  # start_run, before (old level), after (level now), rel_change, cause, label...
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _newest_night(db: sqlite3.Connection, config_name: str) -> Night | None:
    row = db.execute("SELECT id, name, utc FROM runs WHERE config_name = ? ORDER BY utc DESC, id DESC LIMIT 1",
                     (config_name,)).fetchone()
    return Night(int(row[0]), row[1], row[2]) if row else None


def _cells_of(db: sqlite3.Connection, config_name: str) -> dict[str, bool]:
    """Every cell of the configuration, and whether its newest status row marks it a canary."""
    rows = db.execute("SELECT s.cell, s.canary FROM cell_status s JOIN runs r ON r.id = s.run_id "
                      "WHERE r.config_name = ? ORDER BY r.utc, r.id", (config_name,)).fetchall()
    return {cell: canary == "1" for cell, canary in rows}


def open_regressions(db: DbLike, config_name: str, settings: NightlySettings | None = None) -> list[OpenRegression]:
    """What is open at the configuration's newest recorded run, every cause (code, machine, straggler)."""
    with connect(db) as conn:
        night = _newest_night(conn, config_name)
        if night is None:
            return []
        ctx = Context(conn, config_name, night, settings or NightlySettings())
        cells = _cells_of(conn, config_name)
        for cell in (c for c, canary in cells.items() if canary):
            ctx.add_canary(cell)
        out = []
        for cell, canary in cells.items():
            for v in _judge_cell(ctx, cell, ctx.devices.get(cell, ""), canary):
                out += [OpenRegression(config_name, cell, v.metric, v.check, c, v.note) for c in v.open]
        return out


class AckError(ValueError):
    """An acknowledgement that matches nothing, or more than one configuration; str() says which."""


def acknowledge(db: DbLike, cell: str, metric: str, note: str, config_name: str | None = None,
                by: str | None = None) -> list[Ack]:
    """Acknowledge every open regression whose cell and metric match (shell patterns: '*')."""
    with connect(db) as conn:
        configs = sorted({c for c, cl, _ in series_keys(conn) if fnmatch.fnmatchcase(cl, cell)})
    if config_name is None and len(configs) != 1:
        raise AckError(f"cell {cell!r} is recorded in configs {', '.join(configs)}: pass --config NAME" if configs
                       else f"no recorded cell matches {cell!r}")
    config_name = config_name or configs[0]
    opens = open_regressions(db, config_name)
    picked = {(o.cell, o.metric): o for o in opens
              if fnmatch.fnmatchcase(o.cell, cell) and fnmatch.fnmatchcase(o.metric, metric)}
    if not picked:
        listed = ", ".join(sorted({f"{o.cell} {o.metric}" for o in opens})) or "none"
        raise AckError(f"no open regression of {cell} {metric} in config {config_name} (open: {listed})")
    with connect(db) as conn:
        night = _newest_night(conn, config_name)
    assert night is not None  # it has open regressions
    who = by or os.environ.get("USER") or getpass.getuser()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    made = []
    for (c, m), o in sorted(picked.items()):
        ack = Ack(0, config_name, c, m, o.change.after, o.change.before, night.run_id, night.name, night.utc, who,
                  now, note)
        made.append(replace(ack, id=add_ack(db, ack)))
    return made


def detect_all(db: Path, settings: DetectorSettings) -> list[dict[str, Any]]:
    """Every change point of every (config, cell, metric) series in the DB, oldest first.

    Exact metrics report each run where their value changed; the others go through the detector.
    """
    with connect(db) as conn:
        found = []
        runs = {r["id"]: r for r in list_runs(conn)}
        devices: dict[str, dict[str, str]] = {}
        for config, cell, metric in series_keys(conn):
            device = devices.setdefault(config, cell_devices(conn, config)).get(cell, "")
            exact = dict(judged_metrics(device)).get(metric)
            if exact is None:
                continue  # only the judged metrics; the rest of the numbers are for trend plots
            points = list(reversed(history_points(conn, cell, metric, config_name=config)))
            values = [p.value for p in points]
            for cp in (exact_changes(values) if exact else detect(values, settings)):
                start, before = points[cp.index], runs.get(points[cp.index - 1].run_id) if cp.index else None
                change = Change(start.run_name, start.utc, cp.before, cp.after, cp.rel_change, cp.confidence,
                                env_changes(before, runs.get(start.run_id)))
                kind = "regression" if (cp.rel_change > 0) != higher_is_better(metric) else "improvement"
                shown = {k: v for k, v in asdict(change).items() if k not in ("cause", "label")}  # tonight's words
                found.append({"config_name": config, "cell": cell, "metric": metric, "runs": len(points),
                              "check": "exact" if exact else "change point", "kind": kind, "index": cp.index,
                              **shown})
        return found
