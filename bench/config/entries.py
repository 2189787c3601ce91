"""The entries of a sweep file that are lists or mappings of dotted keys: `exclude`, `include`,
`baseline` and `canaries`. Each key is checked (it exists, its value passes its rule) where it
was written, and problems are collected, not raised (bench/config/matrix.py expands the cells).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from bench.config.file import Messages, key_problem
from bench.config.schema import _clip, _show, rule_for

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # a cell id names its folder


def check_value(dotted: str, value: Any, path: str, out: Messages) -> None:
    rule = rule_for(dotted)
    assert rule is not None, dotted
    _, text = rule.check(value)
    if text:
        out.add(path, text)


def parse_entries(raw: Any, where: str, out: Messages, allowed: list[str] | None) -> list[dict[str, Any]]:
    """exclude/include entries (and baseline): mappings of dotted keys, values checked."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        out.add(where, "expected a list of mappings of dotted keys, e.g. - {parallel.overlap: false}")
        return []
    def not_swept(key: str, _: Any) -> str | None:
        if allowed is None or key in allowed:
            return None
        return f"not a swept key; allowed: {', '.join(allowed) or 'none (nothing is swept)'}"

    entries = []
    for i, entry in enumerate(raw):
        path = f"{where}[{i}]" if where != "baseline" else where
        if not isinstance(entry, dict):
            out.add(path, f"expected a mapping of dotted keys, got {entry!r}")
            continue
        entries.append(_keys(entry, path, out, not_swept))
    return entries


def _keys(entry: dict[str, Any], path: str, out: Messages,
          refuse: Callable[[str, Any], str | None]) -> dict[str, Any]:
    """An entry's dotted keys that exist, are not refused and whose values pass their rules."""
    kept = {}
    for key, value in entry.items():
        if (problem := key_problem(key) or refuse(key, value)) is not None:
            out.add(f"{path}.{key}", problem)
        else:
            check_value(key, value, f"{path}.{key}", out)
            kept[key] = value
    return kept


def parse_canaries(raw: Any, out: Messages) -> dict[str, dict[str, Any]]:
    """`canaries: {ID: {dotted key: value}}`: cells named ID, `base` plus the keys, `run.canary`
    true. Not swept keys: the other cells' ids (history series) stay as they were."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        out.add("canaries", "expected a mapping of cell ids to dotted keys, e.g. ws8-busbw: {run.kind: collectives}")
        return {}
    found: dict[str, dict[str, Any]] = {}
    for cell_id, entry in raw.items():
        path = f"canaries.{cell_id}"
        if not isinstance(cell_id, str) or not SAFE_ID.match(cell_id):
            out.add(path, "not a safe cell id; allowed: letters, digits and . _ + - (it names the cell's folder)")
            continue
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            out.add(path, f"expected a mapping of dotted keys, got {_clip(repr(entry))}")
            continue
        found[cell_id] = {**_keys(entry, path, out, _not_canary), "run.canary": True}
    return found


def _not_canary(key: str, value: Any) -> str | None:
    if key == "run.canary" and value is not True:
        return f"got {_show(value)}; a cell under canaries is a canary (allowed: true)"
    return None
