"""The rows of `python -m bench.gpu_check`: one per check, each guarded on its own, the table a
person reads, the line that says what to fix first, and gpu_check.json for machines.

Every check has a priority (the order a person should work through failures: a GPU or a
package that is not there makes everything after it fail too):

    0 SETUP        the GPU, the driver, flash-attn installed and importable
    1 RUNS         a cell runs at all (its reason whole, with the rank log and the run folder)
    2 CORRECT      losses equal their reference, counted bytes the formula, flash equals SDPA
    3 KERNELS      the kernels that ran are the ones asked for (flash-attn, NCCL)
    4 SPEED        the GEMM and attention rates, the training cell's TFLOP/s between its bounds
    5 MEASUREMENT  NVML's energy and power, the memory snapshot
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tabulate import tabulate

SCHEMA = "isp-bench-gpu-check/1"
OK, FAIL, NA = "ok", "FAIL", "n/a"
SETUP, RUNS, CORRECT, KERNELS, SPEED, MEASUREMENT = range(6)
DETAIL_WIDTH = 110  # the detail column wraps here: a reason is shown whole, never cut


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, FAIL or NA
    detail: str
    cell: str = ""  # the cell the row is about; "" for the device's own rows
    priority: int = RUNS
    fix: str = ""  # what to do when it failed; the last line quotes the first failure's

    @property
    def label(self) -> str:
        return f"{self.cell}: {self.name}" if self.cell else self.name


def passed(name: str, ok: bool, detail: str, priority: int, fix: str = "", cell: str = "") -> Check:
    return Check(name, OK if ok else FAIL, detail, cell, priority, fix if not ok else "")


def guarded(name: str, priority: int, fn: Callable[[], Check], cell: str = "") -> Check:
    """One check: an exception is this row's failure (with where it was raised), not the table's."""
    try:
        row = fn()
    except Exception as err:  # noqa: BLE001 - reported in the row
        where = traceback.extract_tb(err.__traceback__)[-1]
        return Check(name, FAIL, f"{type(err).__name__}: {err} (at {where.filename}:{where.lineno})", cell,
                     priority, "the record or the file this check reads is not what the check expects: see detail")
    return Check(row.name, row.status, row.detail, cell or row.cell, row.priority, row.fix)


def fix_first(rows: list[Check]) -> Optional[Check]:
    """The failure to work on first: lowest priority, then first in the table."""
    failed = [r for r in rows if r.status == FAIL]
    return min(failed, key=lambda r: r.priority) if failed else None


def table(rows: list[Check]) -> str:
    body = [(r.cell or "-", r.name, r.status, r.detail) for r in rows]
    return tabulate(body, headers=("cell", "check", "result", "detail"), maxcolwidths=[None, 40, None, DETAIL_WIDTH],
                    disable_numparse=True)


def summary_line(rows: list[Check], elapsed_s: float) -> str:
    first = fix_first(rows)
    counts = f"{sum(r.status == OK for r in rows)} ok, {sum(r.status == FAIL for r in rows)} failed, " \
             f"{sum(r.status == NA for r in rows)} n/a in {elapsed_s:.0f} s"
    if first is None:
        return f"nothing to fix: {counts}"
    return f"fix first: {first.label}: {first.fix or first.detail} ({counts})"


def document(device: str, rates: dict[str, Any], rows: list[Check], elapsed_s: float) -> dict[str, Any]:
    """gpu_check.json (docs: the shared record schema); `ok` is null for a row that did not apply."""
    checks = [{"name": r.label, "ok": None if r.status == NA else r.status == OK, "detail": r.detail} for r in rows]
    return {"schema": SCHEMA, "device": device, "rates": rates, "checks": checks, "elapsed_s": round(elapsed_s, 1)}
