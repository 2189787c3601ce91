"""A cell's loss curve against the last nights' (same config and seed): a correctness check.

The same code on the same tokens gives the same losses up to the dtype's rounding, so each
night's curve is compared, step by step, with a reference night's:
|night - reference| <= tol * |reference|, tol being the dtype's tolerance of
bench/metrics/loss_check.py (REL_TOL; the record's `loss_rel_tol` where it ran the check).

Which nights: those of the configuration whose loss key (history_rows.LOSS_KEYS: the model,
the data and its seed, the layout, dtype, learning rate and warm-up) equals tonight's. The
reference is the first of them, or the night an acknowledgement of the cell's `loss` series
was made after (`history ack CELL loss`). A night beyond the tolerance opens a correctness
regression, `loss changed at step k`, that stays open until a night matches the reference
again or the new curve is acknowledged. Unlike timings it needs no statistics: one earlier
night with the same key is enough to judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bench.results.history import LOSS
from bench.results.nightly_series import (MACHINE, NO_CHANGE, REGRESSION, TOO_LITTLE, Change, Context,
                                          SeriesVerdict)
from bench.results.series_state import Shift, relative

CHECK = "loss curve"


@dataclass(frozen=True)
class LossNight:
    run_id: int
    run_name: str
    utc: str | None
    curve: list[float]
    key: str | None  # the loss key (JSON) of the cell that night
    tol: float | None  # the record's loss_rel_tol, when it ran the one-process check


def loss_nights(ctx: Context, cell: str) -> list[LossNight]:
    """The cell's recorded loss curves up to the judged night, oldest first."""
    rows = ctx.db.execute(
        "SELECT r.id, r.name, r.utc, m.samples_json, s.loss_key, t.value FROM cell_metrics m "
        "JOIN runs r ON r.id = m.run_id LEFT JOIN cell_status s ON s.run_id = m.run_id AND s.cell = m.cell "
        "LEFT JOIN cell_metrics t ON t.run_id = m.run_id AND t.cell = m.cell AND t.metric = 'loss_rel_tol' "
        "WHERE m.cell = ? AND m.metric = ? AND r.config_name = ? ORDER BY r.utc, r.id",
        (cell, LOSS, ctx.config_name)).fetchall()
    nights = [LossNight(r[0], r[1], r[2], json.loads(r[3]) if r[3] else [], r[4], r[5]) for r in rows]
    night = ctx.night
    older = [n for n in nights if n.run_id != night.run_id and (n.utc or "") <= (night.utc or "")]
    return [*older, *(n for n in nights if n.run_id == night.run_id)]


def tolerance(night: LossNight) -> tuple[float, str]:
    """(relative tolerance, dtype) of a night's curve."""
    dtype = str(((json.loads(night.key) if night.key else {}).get("run") or {}).get("dtype") or "float32")
    if night.tol is not None:
        return night.tol, dtype
    from bench.metrics.loss_check import REL_TOL  # imports torch: only when a record lacks loss_rel_tol

    return REL_TOL.get(dtype, REL_TOL["float32"]), dtype


def first_difference(curve: list[float], reference: list[float], tol: float) -> int | None:
    """The first step (0-based) where the curves differ beyond tol, over the steps both have."""
    for k, (a, b) in enumerate(zip(curve, reference)):
        if abs(a - b) > tol * max(abs(b), 1e-30):
            return k
    return None


def _walk(same: list[LossNight], acked_at: set[int], tol: float) -> tuple[LossNight, int | None]:
    """(the reference night, index of the night the open difference started at, or None)."""
    reference, opened = same[0], None
    for i, night in enumerate(same):
        if i and first_difference(night.curve, reference.curve, tol) is None:
            opened = None
        elif i and opened is None:
            opened = i
        if i in acked_at:  # the acknowledged night's curve is the reference from here on
            reference, opened = night, None
    return reference, opened


def judge_loss(ctx: Context, cell: str) -> SeriesVerdict | None:
    nights = loss_nights(ctx, cell)
    if not nights:
        return None
    latest = nights[-1]
    measured = latest.run_id == ctx.night.run_id
    same = [n for n in nights if n.key == latest.key]
    earlier = len(same) - measured
    if earlier < 1:
        return SeriesVerdict(cell, LOSS, CHECK, TOO_LITTLE, 0, latest.curve[-1],
                             note="no earlier night with the same config and seed") if measured else None
    tol, dtype = tolerance(latest)
    acked_at = {i for i, _ in ctx.ack_points(cell, LOSS, same) if i >= 0}
    reference, opened = _walk(same, acked_at, tol)
    value = latest.curve[-1] if measured else None
    if opened is None:
        return SeriesVerdict(cell, LOSS, CHECK, NO_CHANGE, earlier, value,
                             note=f"matches {reference.run_name} within {tol:g} ({dtype})") if measured else None
    k = first_difference(latest.curve, reference.curve, tol)
    assert k is not None  # the newest night differs, or the walk would have closed it
    before, after = reference.curve[k], latest.curve[k]
    change: Change = ctx.change(same, Shift(opened, before, after, 1.0), cell, LOSS, canary=False)
    note = (f"loss changed at step {k + 1}: {before:.6g} -> {after:.6g} (relative {abs(relative(before, after)):.1e}"
            f" > {tol:g}, {dtype}) against {reference.run_name}")
    status = MACHINE if change.cause == "machine" else REGRESSION
    return SeriesVerdict(cell, LOSS, CHECK, status, earlier, value, change,
                         note if measured else f"not measured tonight; {note}", (change,))
