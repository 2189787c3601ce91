"""Change points, open regressions and acknowledged changes: the one place the dashboard reads them.

Change points come from bench.results.nightly.detect_all over the history. Open regressions
and acknowledgements belong to issue 19 (an `acks` table in the history DB and the open
regressions of a config in bench.results.nightly); until that lands, read_judgements reads what
exists: a config's open regressions are the series its newest judged run's nightly.json calls
a regression, plus the cells that failed there after an ok history, and there are no acks.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.results.changepoint import DetectorSettings
from bench.results.history import DbLike
from bench.results.nightly import detect_all

Key = tuple[str, str, str]  # config name, cell, metric


@dataclass(frozen=True)
class Mark:
    """A change point or an acknowledged change on one series, at the run where it starts."""
    index: int  # into the series, oldest run first
    run: str
    kind: str  # regression, improvement, acknowledged
    text: str  # what the hover says


@dataclass(frozen=True)
class OpenRegression:
    cell: str
    metric: str  # a metric name, or "status" for a cell that failed after an ok history
    since: str  # the run the change started at (or the failed run)
    text: str


@dataclass
class Judgements:
    changes: dict[Key, list[Mark]] = field(default_factory=dict)
    acks: dict[Key, list[Mark]] = field(default_factory=dict)
    open_regressions: dict[str, list[OpenRegression]] = field(default_factory=dict)  # by config name


def nightly_json(run_path: str | Path) -> dict[str, Any] | None:
    """A run folder's nightly.json (NightlyResult.to_json()), or None when it was never judged."""
    path = Path(run_path) / "nightly.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _change_text(f: dict[str, Any]) -> str:
    def short(v: object) -> str:  # commits are 40 hex digits; 12 name one
        return str(v)[:12] if isinstance(v, str) and len(v) == 40 else str(v)

    changed = ", ".join(f"{k} {short(a)} -> {short(b)}" for k, (a, b) in (f.get("changed") or {}).items())
    text = f"{f['kind']} {f['rel_change'] * 100:+.1f}% from run {f['start_run']}"
    return f"{text}; changed that night: {changed}" if changed else text


def _open_from_nightly(doc: dict[str, Any]) -> list[OpenRegression]:
    out = [OpenRegression(s["cell"], s["metric"], (s.get("change") or {}).get("start_run") or doc["run"],
                          f"{(s.get('change') or {}).get('rel_change', 0.0) * 100:+.1f}% ({s.get('note') or s['check']})")
           for s in doc.get("series", []) if s.get("status") == "regression"]
    out += [OpenRegression(f["cell"], "status", doc["run"], f"{f['status']} after an ok history")
            for f in doc.get("failed_cells", []) if f.get("ok_before")]
    return out


def read_judgements(db: DbLike, newest_run_paths: dict[str, list[str]], settings: DetectorSettings) -> Judgements:
    """newest_run_paths: per config name, its run folders newest first (the first judged one counts).

    When issue 19 lands: open_regressions from bench.results.nightly's open regressions of each
    config, and acks from the history's `acks` table (config, cell, metric, who, when, why, level),
    each as a Mark at the run it acknowledges.
    """
    out = Judgements()
    try:
        found = detect_all(db, settings)  # type: ignore[arg-type]
    except sqlite3.DatabaseError:
        found = []
    for f in found:
        key = (f["config_name"], f["cell"], f["metric"])
        out.changes.setdefault(key, []).append(Mark(f["index"], f["start_run"], f["kind"], _change_text(f)))
    for config, paths in newest_run_paths.items():
        doc = next((d for d in map(nightly_json, paths) if d is not None), None)
        out.open_regressions[config] = _open_from_nightly(doc) if doc else []
    return out
