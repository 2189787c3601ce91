"""From a YAML file to the list of cells to run: read, apply --set, expand the matrix, validate.

Problems are collected, not raised one at a time: a user fixing a sweep wants every mistake
in one go, each with the file, the key path as written and what would be accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config.cell import CellConfig
from bench.config.schema import SECTIONS, ConfigError, _clip, _show, suggest
from bench.config.checks import HostLimits, host_problems
from bench.config.entries import SAFE_ID, check_value, parse_canaries, parse_entries
from bench.config.file import TOP_KEYS, Messages, apply_overrides, key_problem, read_doc
from bench.config.limits import MAX_CELLS, cells_problem, name_problem

_ABBREV = {"overlap": "ov", "memory_pool": "mp", "checkpoint": "ck", "world_size": "ws", "sp": "sp",
           "wp": "wp", "micro_num": "mn", "seq_len": "sl", "strategy": "", "kind": "", "group": "",
           "wp_unit": "wu", "head": "hd", "forward_overlap_per": "fo", "launch_allgather_before": "lb"}


@dataclass(frozen=True)
class Cell:
    id: str
    swept: dict[str, Any]  # dotted key -> value as written (sp may read "world")
    config: CellConfig


@dataclass(frozen=True)
class BenchConfig:
    name: str
    source: str
    doc: dict[str, Any]  # the YAML document after --set: what config.yaml saves and --resume re-reads
    swept_keys: tuple[str, ...]
    baseline: dict[str, Any]
    cells: tuple[Cell, ...]

    def __post_init__(self) -> None:
        ids = [c.id for c in self.cells]
        assert len(ids) == len(set(ids)), f"duplicate cell ids {ids}"


def load_config(path: Path | None, overrides: list[str] | None = None, cell_filter: str | None = None,
                host: HostLimits | None = None, max_cells: int = MAX_CELLS) -> BenchConfig:
    """Read, override, expand and validate; raises ConfigError listing every problem.

    `host` None skips what depends on this machine (GPU count, NVML), as --dry-run does.
    More than `max_cells` cells is refused before the matrix is expanded (limits.py)."""
    doc, label = read_doc(path)
    doc = apply_overrides(doc, overrides or [], label)
    default_name = path.stem if path is not None else "cpu-default"
    return build(doc, label, default_name, cell_filter, host, max_cells)


def build(doc: dict[str, Any], label: str, default_name: str, cell_filter: str | None = None,
          host: HostLimits | None = None, max_cells: int = MAX_CELLS) -> BenchConfig:
    out = Messages(label)
    if (too_many := cells_problem(doc.get("matrix"), doc.get("include"), max_cells, doc.get("canaries"))) is not None:
        raise ConfigError([f"{label}: {too_many}"])  # alone: nothing below runs on such a matrix
    for key in doc:
        if key not in TOP_KEYS:
            out.add(str(key), suggest(str(key), TOP_KEYS))
    name = doc.get("name", default_name)
    if (too_long := name_problem(name)) is not None:
        out.add("name", too_long)
    elif not isinstance(name, str) or not SAFE_ID.match(name):
        out.add("name", f"got {_show(name)}; allowed: letters, digits and . _ + - (it names the results folder)")
    base = _base(doc.get("base"), out)
    matrix = _matrix(doc.get("matrix"), out)
    exclude = parse_entries(doc.get("exclude"), "exclude", out, allowed=list(matrix))
    include = parse_entries(doc.get("include"), "include", out, allowed=None)
    swept = list(dict.fromkeys(list(matrix) + [k for entry in include for k in entry]))
    baseline = parse_entries([doc.get("baseline") or {}], "baseline", out, allowed=swept)[0]
    canaries = parse_canaries(doc.get("canaries"), out)
    cells = _expand(base, matrix, exclude, include, swept, out, host, canaries)
    if cell_filter is not None and cells:
        cells = _filter(cells, cell_filter, out)
    out.raise_if_any()
    return BenchConfig(name=str(name), source=label, doc=doc, swept_keys=tuple(swept),
                       baseline=baseline, cells=tuple(cells))


def _base(raw: Any, out: Messages) -> dict[str, dict[str, Any]]:
    """Base sections with defaults filled in; unknown keys reported and dropped."""
    base = {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
    if raw is None:
        return base
    if not isinstance(raw, dict):
        out.add("base", f"expected a mapping of sections ({', '.join(SECTIONS)})")
        return base
    for section, values in raw.items():
        if section not in SECTIONS:
            out.add(f"base.{section}", suggest(str(section), list(SECTIONS)))
        elif not isinstance(values, dict):
            out.add(f"base.{section}", "expected a mapping")
        else:
            for key, value in values.items():
                if (problem := key_problem(f"{section}.{key}")) is not None:
                    out.add(f"base.{section}.{key}", problem)
                    continue
                check_value(f"{section}.{key}", value, f"base.{section}.{key}", out)
                base[section][key] = value
    return base


def _matrix(raw: Any, out: Messages) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        out.add("matrix", "expected a mapping of dotted keys to lists, e.g. parallel.overlap: [false, true]")
        return {}
    matrix = {}
    for key, values in raw.items():
        if (problem := key_problem(key)) is not None:
            out.add(f"matrix.{key}", problem)
        elif not isinstance(values, list) or not values:
            out.add(f"matrix.{key}", f"expected a non-empty list of values, got {values!r}")
        else:
            seen: set[Any] = set()  # == as `in` compares (1 and 1.0 are one value); lists compared in full
            for i, value in enumerate(values):
                check_value(key, value, f"matrix.{key}[{i}]", out)
                hashable = _hashable(value)
                if (value in seen) if hashable else (value in values[:i]):
                    out.add(f"matrix.{key}[{i}]", f"{_clip(repr(value))} is listed twice; each value makes its "
                                                  "own cells")
                if hashable:
                    seen.add(value)
            matrix[key] = values
    return matrix


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _merge(base: dict[str, dict[str, Any]], values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cell = copy.deepcopy(base)
    for dotted, value in values.items():
        section, _, name = dotted.partition(".")
        cell[section][name] = value
    return cell


def _expand(base: dict[str, dict[str, Any]], matrix: dict[str, list[Any]], exclude: list[dict[str, Any]],
            include: list[dict[str, Any]], swept: list[str], out: Messages,
            host: HostLimits | None, canaries: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
    """The canaries (first, under their own ids), then the Cartesian product in key order, minus
    partial exclude matches, plus new include cells."""
    combos = [dict(zip(matrix, values, strict=True)) for values in itertools.product(*matrix.values())]
    combos = [c for c in combos if not any(all(c.get(k) == v for k, v in e.items()) for e in exclude)]
    merged: list[tuple[str | None, dict[str, dict[str, Any]]]] = [
        *((cell_id, _merge(base, e)) for cell_id, e in (canaries or {}).items()),
        *((None, _merge(base, c)) for c in combos), *((None, _merge(base, e)) for e in include)]
    abbrevs = _abbreviations(swept)
    cells: list[Cell] = []
    seen: set[str] = set()  # reprs of the cells' configs: equal reprs, equal configs (fields are normalised)
    by_cell: dict[tuple[str, str], list[str]] = {}  # one message per problem, naming every cell it hits
    for named, raw in merged:
        values = {k: raw[k.partition(".")[0]][k.partition(".")[2]] for k in swept}
        cell_id = named or "-".join(abbrevs[k] + _format(v) for k, v in values.items()) or "base"
        try:
            config = CellConfig(**{name: cls(**raw[name]) for name, cls in SECTIONS.items()})
        except ConfigError as exc:  # a bad field value was reported where it was written
            for p in exc.problems:
                by_cell.setdefault((p.key, p.text), []).append(cell_id)
            continue
        if named is None and repr(config) in seen:  # an include that repeats a cell adds nothing
            continue
        seen.add(repr(config))
        for p in host_problems(config, host) if host is not None else []:
            by_cell.setdefault((p.key, p.text), []).append(cell_id)
        cells.append(Cell(cell_id, {} if named else values, config))  # a canary sweeps nothing
    for (key, text), ids in by_cell.items():
        shown = ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
        out.add(f"base.{key}" if ids == ["base"] else f"cell{'s' if len(ids) > 1 else ''} {shown} ({key})", text)
    _check_ids(cells, out, set(canaries or {}))
    return cells


def _abbreviations(swept: list[str]) -> dict[str, str]:
    """Short prefixes; keys whose short forms collide fall back to longer, distinct ones."""
    def short(key: str) -> str:
        last = key.rpartition(".")[2]
        return _ABBREV.get(last, "".join(word[0] for word in last.split("_")))

    forms = {k: short(k) for k in swept}
    for level in (lambda k: k.rpartition(".")[2], lambda k: k.replace(".", "_")):
        clashes = {k for k in swept if list(forms.values()).count(forms[k]) > 1}
        forms.update({k: level(k) for k in clashes})
    return forms


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "_".join(_format(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+]", "_", str(value))


def _check_ids(cells: list[Cell], out: Messages, canaries: set[str]) -> None:
    seen: dict[str, Cell] = {}
    for cell in cells:
        if not SAFE_ID.match(cell.id):
            out.add(f"cell {cell.id}", "the id is not safe as a folder name; change the swept values")
        if cell.id in seen and cell.id in canaries:
            out.add(f"canaries.{cell.id}", "a matrix or include cell has this id too; rename the canary")
        elif cell.id in seen:
            out.add(f"cell {cell.id}", f"two different cells get this id (swept {seen[cell.id].swept} and "
                                       f"{cell.swept}); make their swept values differ")
        seen.setdefault(cell.id, cell)


def _filter(cells: list[Cell], pattern: str, out: Messages) -> list[Cell]:
    """Keep cells whose id matches `pattern` as a regex, or contains it when it is no regex."""
    try:
        regex = re.compile(pattern)
        kept = [c for c in cells if regex.search(c.id)]
    except re.error:
        kept = [c for c in cells if pattern in c.id]
    if not kept:
        out.add(f"--filter {pattern}", f"matches no cell; cells: {', '.join(c.id for c in cells)}")
    return kept
