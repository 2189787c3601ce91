"""Turn a Comparison into a terminal table, Markdown for a PR comment, or JSON for machines.

Differences in environment and configuration come before the table because they
are the first thing to rule out when a number moves.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tabulate import tabulate

from bench.results.compare import Comparison, Row

HEADERS = ("cell", "metric", "base", "new", "new/base", "p", "verdict")
MAX_CELLS_SHOWN = 6


def _ratio(row: Row) -> str:
    r = row.verdict.ratio
    return "-" if r is None else f"{r:.3f}x"


def _p(row: Row) -> str:
    p = row.verdict.p_value
    return "-" if p is None else f"{p:.2g}"


def _table_rows(result: Comparison) -> list[list[str]]:
    rows = []
    for row in result.rows:
        word = row.verdict.word
        if row.verdict.regressed:
            word += "  <-- REGRESSED"
        elif row.verdict.note.startswith("not significant"):
            word += " (not significant)"
        rows.append([row.cell, row.spec.name, row.spec.format(row.base), row.spec.format(row.new), _ratio(row), _p(row), word])
    return rows


def _cells(cells: list[str], total: int) -> str:
    if len(cells) == total and total > 1:
        return f"all {total} cells"
    shown = ", ".join(cells[:MAX_CELLS_SHOWN])
    return shown + (f" and {len(cells) - MAX_CELLS_SHOWN} more" if len(cells) > MAX_CELLS_SHOWN else "")


def _summary(result: Comparison) -> str:
    regressed = [r for r in result.rows if r.verdict.regressed]
    improved = sum(r.verdict.improved for r in result.rows)
    unchanged = len(result.rows) - len(regressed) - improved
    newly_failed = sum(f[3] for f in result.failed)
    cells = len({r.cell for r in regressed})
    text = (
        f"{len(regressed)} regressed metric(s) in {cells} cell(s), {improved} improved, {unchanged} unchanged "
        f"over {result.n_matched} matched cell(s)"
    )
    if newly_failed:
        text += f"; {newly_failed} cell(s) ok in base but not in new"
    return text + ("; REGRESSION (exit 1)" if result.regressed else "; no regression (exit 0)")


def _sections(result: Comparison, bullet: str) -> list[tuple[str, list[str]]]:
    """(heading, lines) pairs shared by the text and Markdown forms."""
    sections = []
    if result.env_diff:
        sections.append(("Environment differences", [f"{bullet}{k}: {b} -> {n}" for k, b, n in result.env_diff]))
    if result.config_diff:
        sections.append((
            "Config differences (matched cells)",
            [f"{bullet}{k}: {b} -> {n} ({_cells(c, result.n_matched)})" for k, b, n, c in result.config_diff],
        ))
    if result.only_base:
        sections.append(("Only in base (not compared)", [bullet + ", ".join(result.only_base)]))
    if result.only_new:
        sections.append(("Only in new (not compared)", [bullet + ", ".join(result.only_new)]))
    if result.failed:
        sections.append((
            "Cells not ok in one or both runs",
            [f"{bullet}{c}: base {b} -> new {n}" + (" <-- REGRESSED" if reg else "") + (f" ({err})" if err else "")
             for c, b, n, reg, err in result.failed],
        ))
    if result.notes:
        sections.append(("Notes", [bullet + note for note in result.notes]))
    return sections


def render_text(result: Comparison, alpha: float) -> str:
    out = [f"base: {result.base_label}", f"new:  {result.new_label}", ""]
    for heading, lines in _sections(result, "  "):
        out += [f"{heading}:", *lines, ""]
    if result.rows:
        out += [tabulate(_table_rows(result), headers=HEADERS, tablefmt="simple", disable_numparse=True), ""]
    out.append(f"rule: change > threshold AND Mann-Whitney U p < {alpha:g}; '(no samples)' = threshold only")
    out.append(_summary(result))
    return "\n".join(out)


def render_markdown(result: Comparison, alpha: float) -> str:
    out = ["### Benchmark comparison", "", f"- base: `{result.base_label}`", f"- new: `{result.new_label}`", ""]
    for heading, lines in _sections(result, "- "):
        out += [f"#### {heading}", "", *lines, ""]
    if result.rows:
        out += [tabulate(_table_rows(result), headers=HEADERS, tablefmt="github", disable_numparse=True), ""]
    out.append(f"Rule: change > threshold and Mann-Whitney U p < {alpha:g}; `(no samples)` means threshold only.")
    out += ["", f"**{_summary(result)}**"]
    return "\n".join(out)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def to_json(result: Comparison, alpha: float) -> dict[str, Any]:
    return {
        "base": result.base_label,
        "new": result.new_label,
        "alpha": alpha,
        "regressed": result.regressed,
        "env_diff": [{"key": k, "base": b, "new": n} for k, b, n in result.env_diff],
        "config_diff": [{"key": k, "base": b, "new": n, "cells": c} for k, b, n, c in result.config_diff],
        "only_in_base": result.only_base,
        "only_in_new": result.only_new,
        "failed": [
            {"cell": c, "base_status": b, "new_status": n, "regressed": reg, "error": err}
            for c, b, n, reg, err in result.failed
        ],
        "rows": [
            {
                "cell": r.cell, "metric": r.spec.name, "base": r.base, "new": r.new,
                "ratio": _finite(r.verdict.ratio), "p_value": r.verdict.p_value, "verdict": r.verdict.word,
                "regressed": r.verdict.regressed, "improved": r.verdict.improved, "note": r.verdict.note,
            }
            for r in result.rows
        ],
        "notes": result.notes,
        "summary": _summary(result),
    }


def render(result: Comparison, fmt: str, alpha: float) -> str:
    if fmt == "json":
        return json.dumps(to_json(result, alpha), indent=2)
    if fmt == "md":
        return render_markdown(result, alpha)
    return render_text(result, alpha)
