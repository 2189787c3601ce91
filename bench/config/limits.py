"""Bounds on what a sweep file may ask for, each checked before anything expands or prints it.

A YAML file is small text that can stand for a very large value: aliases repeat an anchored
value without copying it (nine levels of nine aliases are 9^9 = 387M strings), and a matrix of
a few short lists multiplies into millions of cells. Python's YAML loader keeps the repeats as
one shared object, so loading is quick; what hangs or runs out of memory is whatever walks the
value afterwards (a repr in an error message, a deep copy, the matrix product). So:

    values   the document with every alias expanded holds at most MAX_VALUES values (a scalar,
             a list or a mapping entry counts 1), nests at most MAX_DEPTH levels and does not
             contain itself: measured on the shared objects, in time linear in the text
    cells    matrix product (before exclude) plus include entries <= max_cells (MAX_CELLS, or
             run_bench.py --max-cells N), from the list lengths alone, before any cell exists
    name     at most MAX_NAME characters: it names the results folder, and a file name is at
             most 255 bytes (NAME_MAX) with the timestamp in front

Each problem is one line naming the file, the key and the limit, and never the value itself.
"""

from __future__ import annotations

import math
from typing import Any, Optional

MAX_VALUES = 100_000  # the largest shipped config holds about 300
MAX_DEPTH = 32  # a sweep file nests 4 levels (base.model.hidden); deep nesting is a mistake or an attack
MAX_CELLS = 10_000  # the nightly has 37 cells; 10,000 still expand and validate in seconds
MAX_NAME = 128


def _children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, list) else []


def expanded_sizes(root: Any) -> tuple[dict[int, int], Optional[str]]:
    """Expanded size of every list and mapping under `root`, by id (each shared object visited
    once, so an alias bomb costs its text, not its expansion), and why the walk stopped early:
    too deep, or a value that contains itself (a YAML anchor used inside its own value)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool, int]] = [(root, False, 1)]
    while stack:
        value, children_done, depth = stack.pop()
        if not isinstance(value, (dict, list)) or (id(value) in sizes and not children_done):
            continue
        kids = _children(value)
        if children_done:
            on_path.discard(id(value))
            entries = len(value) if isinstance(value, dict) else 0  # a key counts as a value too
            sizes[id(value)] = 1 + entries + sum(sizes.get(id(k), 1) for k in kids)
            continue
        if depth > MAX_DEPTH:
            return sizes, f"nested more than {MAX_DEPTH} levels deep; allowed: at most {MAX_DEPTH}"
        if id(value) in on_path:
            return sizes, "contains itself (a YAML alias inside its own anchor); allowed: values that end"
        on_path.add(id(value))
        stack.append((value, True, depth))
        stack.extend((k, False, depth + 1) for k in kids if isinstance(k, (dict, list)))
    return sizes, None


def _biggest_key(doc: dict[str, Any], sizes: dict[int, int], limit: int) -> str:
    """The deepest key path whose value alone is over `limit` (where a user would look)."""
    path, node = [], doc
    while isinstance(node, dict):
        over = [(sizes.get(id(v), 1), str(k), v) for k, v in node.items() if sizes.get(id(v), 1) > limit]
        if not over:
            break
        _, key, node = max(over, key=lambda item: item[0])
        path.append(key)
    return ".".join(path)


def oversize(value: Any) -> Optional[tuple[str, str]]:
    """(key path inside `value`, what is wrong) when the loaded value is over MAX_VALUES or
    MAX_DEPTH or refers to itself; None when it is within the bounds."""
    sizes, stopped = expanded_sizes(value)
    if stopped is not None:
        return "", stopped
    total = sizes.get(id(value), 1)
    if total <= MAX_VALUES:
        return None
    where = _biggest_key(value, sizes, MAX_VALUES) if isinstance(value, dict) else ""
    return where, (f"expands to {total:,} values (YAML aliases repeat their anchor's value); "
                   f"allowed: at most {MAX_VALUES:,} values")


def size_problem(doc: Any, label: str) -> Optional[str]:
    """`oversize` of a whole sweep file as its one line, or None."""
    found = oversize(doc)
    if found is None:
        return None
    where, text = found
    return f"{label}: {where or '(the whole document)'}: {text}"


def cells_problem(matrix: Any, include: Any, max_cells: int, canaries: Any = None) -> Optional[str]:
    """Why the sweep would have more than `max_cells` cells, from the list lengths alone (the
    matrix product before exclude, plus include entries and canaries), or None."""
    lengths = [len(v) for v in matrix.values() if isinstance(v, list)] if isinstance(matrix, dict) else []
    product = math.prod(lengths) if lengths else 0
    entries = len(include) if isinstance(include, list) else 0
    probes = len(canaries) if isinstance(canaries, dict) else 0
    extra = entries + probes
    if product + extra <= max_cells:
        return None
    shape = " x ".join(str(n) for n in lengths) or "no matrix"
    plus = (f" plus {entries:,} include entries" if entries else "") + (f" plus {probes:,} canaries" if probes else "")
    return (f"matrix: {product + extra:,} cells ({shape} values before exclude{plus}); allowed: at most "
            f"{max_cells:,} cells (raise the bound with run_bench.py --max-cells N)")


def name_problem(name: Any) -> Optional[str]:
    if isinstance(name, str) and len(name) > MAX_NAME:
        return (f"{len(name):,} characters; allowed: at most {MAX_NAME} (it names the results folder, "
                "whose name the file system caps at 255 bytes)")
    return None
