"""One loss reference per sweep and key (bench/metrics/loss_check.py: reference_key), not one per cell.

Where it runs: in the cell of its key with the fewest ranks, moved ahead of the key's other
cells, on that cell's rank 0 after every rank has measured (and, on CUDA, has freed its model).
Not as a job of its own: a world-size-1 job would idle the node's other GPUs just as long for
the reference itself, and longer by its own start-up (interpreter, CUDA context, model build);
in the smallest cell the reference idles the fewest ranks of all the cells that need it and
costs no start-up. Several nodes: global rank 0 of that cell computes it, wherever it runs; its
losses come back in the cell's result to node 0, which keeps the file and sends it on with the
later cells' inputs (bench/sweep/lockstep.py ships the cell inputs to every node).

RUN_DIR/references/<name>.json holds {"name", "key", "cell" (the one that computed it), "losses"
(null when it could not be computed), "reason" (why not)}. A cell that fails before its
reference was tried leaves no file, so the next cell of the key computes it; a reference that
was tried and could not be computed is not tried again: every cell of the key says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.config.matrix import Cell
from bench.metrics.loss_check import REFERENCE_FILE, REFERENCES_DIR, key_name, reference_key
from bench.results.records import write_json_atomic


def hosts_first(cells: list[Cell]) -> list[Cell]:
    """The cells in order, except that each key's cell with the fewest ranks (the first of them)
    runs where the key's first cell would have: it computes the reference the others reuse."""
    groups: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        if (key := reference_key(cell.config)) is not None:
            groups.setdefault(key_name(key), []).append(i)
    order = list(range(len(cells)))
    for members in groups.values():
        host = min(members, key=lambda i: (cells[i].config.parallel.world_size, i))
        if host != members[0]:
            order.remove(host)
            order.insert(order.index(members[0]), host)
    return [cells[i] for i in order]


def instruction(run_dir: Path, cell: Cell) -> dict[str, Any] | None:
    """What the cell's worker is told: compute the key's reference, or here it is (or why there
    is none). None when the cell checks no losses."""
    key = reference_key(cell.config)
    if key is None:
        return None
    name = key_name(key)
    rel = f"{REFERENCES_DIR}/{name}.json"
    try:
        kept = json.loads((run_dir / rel).read_text())
    except (OSError, ValueError):
        return {"name": name, "key": key, "file": rel, "cell": cell.id, "compute": True}
    return {"name": name, "key": key, "file": rel, "cell": kept.get("cell"), "compute": False,
            "losses": kept.get("losses"), "reason": kept.get("reason")}


def write_input(cell_dir: Path, shared: dict[str, Any] | None) -> None:
    path = cell_dir / REFERENCE_FILE
    if shared is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(shared) + "\n")


def keep(run_dir: Path, shared: dict[str, Any] | None, metrics: dict[str, Any] | None) -> None:
    """After the cell that was to compute the reference: keep what it found (losses or why not)."""
    if shared is None or not shared["compute"] or not metrics:
        return
    losses, reason = metrics.get("loss_reference"), metrics.get("loss_check_skipped")
    if losses is None and reason is None:
        return  # not tried (the cell stopped before): the next cell of the key computes it
    write_json_atomic(run_dir / shared["file"], {"name": shared["name"], "key": shared["key"],
                                                 "cell": shared["cell"], "losses": losses, "reason": reason})
