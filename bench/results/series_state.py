"""Where one series stands tonight: its level, the regressions still open, a recent improvement.

A change point is an event; a regression is a state. Walking a series' change points oldest
first (bench/results/changepoint.change_points: each gives the level of the segment it starts)
follows its level night by night:

- a move to a worse level opens a regression, measured from the level it left;
- a move that brings the level back to within `min_effect` of where a regression started
  closes it (a partial fix leaves it open, smaller); a better level than any open regression's
  start is an improvement, shown and never failing;
- an acknowledgement (`history ack`, at the last night its author saw) closes every open
  regression and makes the acknowledged level the level from which later moves count.

So a regression nobody looked at stays in every later verdict until it is fixed or accepted.
Exact series (a CUDA allocator peak, counted bytes) walk every change of value, with no
minimum effect.

Stragglers: a night whose record names a straggler rank says nothing about the code. The
code's regressions are those of the series walked without those nights; a regression that only
the whole series has is straggler-only (for instance two nights in a row with a slow GPU).

Pure functions of the values: the nightly feeds them from the history DB, and
bench/results/gate_accuracy.py from simulated nights, so both judge by the same rule.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench.results.changepoint import ChangePoint, DetectorSettings, change_points

AckPoint = tuple[int, float]  # (index of the last night the acknowledger saw, acknowledged level)
MATCH_NIGHTS = 2  # a regression found without the straggler nights may start this many nights apart


def relative(before: float, after: float) -> float:
    """after / before - 1, or the plain difference where before is 0."""
    return (after - before) / abs(before) if before else after - before


def exact_changes(values: Sequence[float]) -> list[ChangePoint]:
    """Every change of value, as a change point (an exact series has no noise to learn)."""
    return [ChangePoint(i, a, b, relative(a, b), 0.0) for i, (a, b) in enumerate(zip(values, values[1:]), start=1)
            if a != b]


@dataclass(frozen=True)
class Shift:
    """One open regression (or improvement) of a series."""

    start: int  # index of the first night at the worse level
    before: float  # the level it left: where the series is back once this closes
    after: float  # the level now
    confidence: float  # 1 - corrected p of the change point that opened it (1.0 for exact series)
    straggler_only: bool = False  # gone when the nights with a straggler rank are left out

    @property
    def rel_change(self) -> float:
        return relative(self.before, self.after)


@dataclass(frozen=True)
class SeriesState:
    level: float  # the series' level tonight
    open: tuple[Shift, ...]  # open regressions, oldest first
    improvement: Shift | None  # the newest improvement, when it started within `recent` nights
    acked: bool  # an acknowledgement set the baseline of what is judged


def _worse_by(before: float, after: float, higher_is_better: bool) -> float:
    rel = relative(before, after)
    return -rel if higher_is_better else rel


def _walk(values: Sequence[float], points: Sequence[ChangePoint], higher_is_better: bool, eps: float,
          acks: Sequence[AckPoint], recent: int) -> SeriesState:
    # An acknowledgement at night p follows the change points up to p: sort it half a night later.
    events: list[tuple[float, ChangePoint | float]] = [(float(cp.index), cp) for cp in points]
    events += [(index + 0.5, level) for index, level in acks]
    level = points[0].before if points else statistics.median(values)
    opened: list[Shift] = []
    improvement: Shift | None = None
    for _, event in sorted(events, key=lambda e: e[0]):
        if not isinstance(event, ChangePoint):  # an acknowledgement
            opened, level, improvement = [], event, None
            continue
        move = _worse_by(level, event.after, higher_is_better)
        if move > eps:
            opened.append(Shift(event.index, level, event.after, event.confidence))
        elif move < -eps:
            opened = [o for o in opened if _worse_by(o.before, event.after, higher_is_better) > eps]
            improvement = Shift(event.index, level, event.after, event.confidence)
        level = event.after
    still = tuple(replace(o, after=level) for o in opened if _worse_by(o.before, level, higher_is_better) > eps)
    shown = improvement if improvement is not None and improvement.start >= len(values) - recent else None
    return SeriesState(level, still, shown, bool(acks))


def _state(values: Sequence[float], detector: DetectorSettings, recent: int, higher_is_better: bool, exact: bool,
           acks: Sequence[AckPoint]) -> SeriesState:
    if not values:
        return SeriesState(float("nan"), (), None, bool(acks))
    points = exact_changes(values) if exact else change_points(values, detector)
    return _walk(values, points, higher_is_better, 0.0 if exact else detector.min_effect, acks, recent)


def judge_values(values: Sequence[float], detector: DetectorSettings, recent: int, *, higher_is_better: bool,
                 exact: bool = False, acks: Sequence[AckPoint] = (),
                 stragglers: Sequence[bool] | None = None) -> SeriesState:
    """The state of a series (oldest night first, tonight last).

    `stragglers[i]`: night i's record named a straggler rank. Those nights are no evidence about
    the code, so the code's regressions come from the series without them (their `start` given
    as an index of the whole series); what the whole series adds, away from those by more
    than MATCH_NIGHTS, is open too, marked straggler-only.
    """
    whole = _state(values, detector, recent, higher_is_better, exact, acks)
    if not stragglers or not any(stragglers):
        return whole
    keep = [i for i, flagged in enumerate(stragglers) if not flagged]
    clean_acks = [(sum(1 for k in keep if k <= index) - 1, level) for index, level in acks]
    clean = _state([values[i] for i in keep], detector, recent, higher_is_better, exact, clean_acks)
    code = [replace(o, start=keep[o.start]) for o in clean.open]
    extra = [replace(o, straggler_only=True) for o in whole.open
             if not any(abs(c.start - o.start) <= MATCH_NIGHTS for c in code)]
    shown = replace(clean.improvement, start=keep[clean.improvement.start]) if clean.improvement else None
    return SeriesState(whole.level, tuple(sorted(code + extra, key=lambda o: o.start)), shown, bool(acks))
