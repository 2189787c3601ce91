"""Change points, open regressions and acknowledged changes: the one place the dashboard reads them.

Change points come from bench.results.nightly.detect_all over the history. Open regressions
and acknowledgements are issue 19's: `bench.results.nightly.open_regressions(db, config)` and
`bench.results.acks.acks(db, config_name=...)` (the history's `acks` table). Where that API is
not installed (this branch was cut before it), read_judgements reads what exists instead: a
config's open regressions are the series its newest judged run's nightly.json calls a
regression, plus the cells that failed there after an ok history, and there are no acks.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.results.changepoint import DetectorSettings
from bench.results.history import DbLike
from bench.results.nightly import detect_all
from bench.results.nightly_render import fmt

Key = tuple[str, str, str]  # config name, cell, metric


@dataclass(frozen=True)
class Mark:
    """A change point or an acknowledged change on one series, at the run where it starts."""
    index: int  # into the series, oldest run first (-1: find it by `run`, bench/dashboard/model.py)
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


def _issue19_api() -> tuple[Callable[..., list[Any]], Callable[..., list[Any]]] | None:
    try:
        from bench.results import nightly
        from bench.results.acks import acks  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return (nightly.open_regressions, acks) if hasattr(nightly, "open_regressions") else None


def _from_issue19(db: DbLike, config: str, out: Judgements) -> None:
    open_regressions, acks = _issue19_api()  # type: ignore[misc]
    for o in open_regressions(db, config):
        c = o.change
        text = f"{c.rel_change * 100:+.1f}%, {fmt(o.metric, c.before)} -> {fmt(o.metric, c.after)}" + (
            f" ({c.label})" if c.label else "")
        out.open_regressions.setdefault(config, []).append(OpenRegression(o.cell, o.metric, c.start_run, text))
    for a in acks(db, config_name=config):
        mark = Mark(-1, a.run_name or "", "acknowledged",
                    f"acknowledged by {a.by} on {a.utc[:10]}: {a.note} (level {fmt(a.metric, a.level)})")
        out.acks.setdefault((config, a.cell, a.metric), []).append(mark)


def read_judgements(db: DbLike, newest_run_paths: dict[str, list[str]], settings: DetectorSettings) -> Judgements:
    """newest_run_paths: per config name, its run folders newest first (the first judged one counts)."""
    out = Judgements()
    try:
        found = detect_all(db, settings)  # type: ignore[arg-type]
    except sqlite3.DatabaseError:
        found = []
    for f in found:
        key = (f["config_name"], f["cell"], f["metric"])
        out.changes.setdefault(key, []).append(Mark(f["index"], f["start_run"], f["kind"], _change_text(f)))
    issue19 = _issue19_api() is not None
    for config, paths in newest_run_paths.items():
        out.open_regressions[config] = []
        if issue19:
            _from_issue19(db, config, out)
        elif (doc := next((d for d in map(nightly_json, paths) if d is not None), None)) is not None:
            out.open_regressions[config] = _open_from_nightly(doc)
    return out
