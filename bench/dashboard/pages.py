"""The pages' contexts: index, one page per (config, cell), one per run (bench/dashboard/templates.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.dashboard.charts import RunAxis, cell_item, label
from bench.dashboard.model import CellView, ConfigView
from bench.results import report
from bench.results.compare import compare, side_from_run
from bench.results.records import RecordError, Run, load_run

EXIT_MEANING = {0: "nothing regressed", 1: "a regression", 2: "bad input", 3: "too little history to judge everything"}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


def cell_href(cell: CellView) -> str:
    return f"cells/{slug(cell.config)}/{slug(cell.cell)}.html"


def run_href(run: dict[str, Any]) -> str:
    return f"runs/{run['id']}-{slug(run['name'])}.html"


def _latest(cell: CellView, metric: str) -> str:
    series = next((s for s in cell.series if s.metric == metric and s.points), None)
    return label(series.points[-1].value, series) if series else "-"


def index_context(configs: list[ConfigView]) -> dict[str, Any]:
    shown = []
    for c in configs:
        cells = {cell.cell: cell for cell in c.cells}
        open_rows = [{"cell": o.cell, "metric": o.metric, "since": o.since, "text": o.text,
                      "href": cell_href(cells[o.cell]) if o.cell in cells else "#"} for o in c.open_regressions]
        runs = [{"name": r["name"], "utc": r["utc"], "commit": (r["git_commit"] or "")[:12], "href": run_href(r),
                 "verdict": _run_verdict(c.nightly.get(r["id"]))} for r in reversed(c.runs)]
        shown.append({"name": c.name, "slug": slug(c.name), "runs": runs, "newest": runs[0], "open": open_rows,
                      "judged": any(c.nightly.values()),
                      "cells": [{"cell": cell.cell, "href": cell_href(cell), "status": cell.status,
                                 "verdict": cell.verdict, "step": _latest(cell, "step_time_s"),
                                 "tokens": _latest(cell, "tokens_per_s"),
                                 "nruns": max((len(s.points) for s in cell.series), default=0)} for cell in c.cells]})
    return {"configs": shown, "nruns": sum(len(c.runs) for c in configs), "root": "", "crumbs": []}


def _run_verdict(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "not judged"
    return {0: "no change", 1: "regression"}.get(doc.get("exit_code"), "too little history")


def items_json(items: list[tuple[str, dict[str, Any]]]) -> str:
    # Inside a <script> element: "</" would end it early.
    return json.dumps(items).replace("</", "<\\/")


def cell_context(cell: CellView, runs: list[dict[str, Any]]) -> dict[str, Any]:
    root = "../../"
    pages = {r["id"]: root + run_href(r) for r in runs}
    charted = [s for s in cell.series if s.points]
    items = [("charts", cell_item(charted, RunAxis.of(runs), pages))] if charted else []
    empty = [s.trend.title for s in cell.series if not s.points]
    changes = [(s.metric, m) for s in cell.series for m in [*s.changes, *s.acks]]
    return {"cell": cell, "empty": empty, "changes": changes, "items": items_json(items) if items else "",
            "root": root, "crumbs": [(cell.config, f"{root}index.html#{slug(cell.config)}"), (cell.cell, "#")]}


def _nightly(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    rows = [{"cell": s["cell"], "metric": s["metric"], "status": s["status"], "note": s.get("note", "")}
            for s in doc.get("series", []) if s.get("status") in ("regression", "improvement")]
    rows += [{"cell": f["cell"], "metric": "status", "status": f["status"],
              "note": "ok before" if f.get("ok_before") else "no ok history"} for f in doc.get("failed_cells", [])]
    return {"exit_code": doc.get("exit_code"), "meaning": EXIT_MEANING.get(doc.get("exit_code"), "?"),
            "regressions": doc.get("regressions", 0), "improvements": doc.get("improvements", 0), "rows": rows}


def _load(path: str) -> Run | None:
    try:
        return load_run(path)
    except RecordError:
        return None


def _traces(run: Run, root: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    out = []
    for cell, record in run.records.items():
        files = [p for p in ((record.get("metrics") or {}).get("traces") or []) if isinstance(p, str)]
        links = [(Path(p).name, (root / p).resolve().as_uri()) for p in files if (root / p).is_file()]
        if links:
            out.append((cell, links))
    return out


def _moved(prev: Run, run: Run) -> tuple[list[Any], list[Any], list[tuple[str, ...]]]:
    """Env and config differences against the previous run, and the metrics the compare rule
    (bench.results.compare: threshold and rank test) calls changed."""
    result = compare(side_from_run(prev), side_from_run(run), 0.05, {})
    moved = [(r.cell, r.spec.name, r.spec.format(r.base), r.spec.format(r.new), r.verdict.word)
             for r in result.rows if r.verdict.regressed or r.verdict.improved]
    return result.env_diff, result.config_diff, moved


def run_context(config: ConfigView, i: int) -> dict[str, Any]:
    row, root = config.runs[i], "../"
    run = _load(row["path"])
    prev_row = config.runs[i - 1] if i > 0 else None
    prev = _load(prev_row["path"]) if prev_row else None
    env, cfg, moved = _moved(prev, run) if run and prev else ([], [], [])
    summary = report.table(run.path, tablefmt="html") if run and run.records else ""
    return {"run": row, "slug": slug(config.name), "nightly": _nightly(config.nightly.get(row["id"])),
            "summary": summary, "missing": f"run folder not readable at {row['path']}: summary and traces unavailable",
            "prev": {"name": prev_row["name"], "href": root + run_href(prev_row)} if prev_row else None,
            "env": env, "config": cfg, "moved": moved, "traces": _traces(run, run.path) if run else [],
            "compared": bool(run and prev),
            "root": root, "crumbs": [(config.name, f"{root}index.html#{slug(config.name)}"), (row["name"], "#")]}
