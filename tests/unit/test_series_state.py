"""series_state: a regression opens, stays open, closes when the level is back or acknowledged;
straggler nights explain only what is gone without them."""

from __future__ import annotations

import random

import pytest

from bench.results.changepoint import DetectorSettings
from bench.results.series_state import judge_values

D = DetectorSettings()


def series(*levels: tuple[float, int], seed: int = 1, spread: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, spread)) for level, n in levels for _ in range(n)]


def state(values: list[float], **kw):  # type: ignore[no-untyped-def]
    return judge_values(values, D, 3, higher_is_better=False, **kw)


def test_a_regression_stays_open_until_the_level_is_back() -> None:
    values = series((1.0, 20), (1.15, 12), (1.0, 4))
    assert state(values[:21]).open == ()  # one slow night is not a change
    for n in (22, 25, 32):
        (shift,) = state(values[:n]).open
        assert shift.start == 20 and shift.rel_change == pytest.approx(0.15, abs=0.02)
    back = state(values[:34])  # the fix, confirmed on its second night, is shown as an improvement
    assert back.open == () and back.improvement is not None and back.improvement.start == 32
    assert state(values).open == ()


def test_a_partial_fix_leaves_it_open_and_smaller() -> None:
    (shift,) = state(series((1.0, 20), (1.20, 6), (1.08, 4))).open
    assert shift.start == 20 and shift.rel_change == pytest.approx(0.08, abs=0.02)


def test_an_acknowledged_level_is_the_baseline() -> None:
    values = series((1.0, 20), (1.15, 10), (1.32, 2))
    assert state(values[:30], acks=[(24, 1.15)]).open == ()
    (shift,) = state(values, acks=[(24, 1.15)]).open  # +15% again, measured from the acknowledged level
    assert shift.start == 30 and shift.before == 1.15 and shift.rel_change == pytest.approx(0.15, abs=0.02)


def test_improvements_never_open_and_higher_is_better_flips() -> None:
    faster = series((1.0, 20), (0.8, 3))
    assert state(faster).open == () and state(faster).improvement is not None
    assert len(judge_values(faster, D, 3, higher_is_better=True).open) == 1  # a rate that fell


def test_exact_series_open_on_any_rise() -> None:
    peaks = [100.0] * 10 + [104.0] * 3
    (shift,) = state(peaks, exact=True).open
    assert shift.start == 10 and shift.confidence == 1.0 and shift.before == 100.0
    assert state([*peaks, 100.0], exact=True).open == ()


def test_straggler_nights_explain_only_what_is_gone_without_them() -> None:
    base = series((1.0, 20))
    two = [*base, 1.2, 1.21]
    (shift,) = state(two, stragglers=[False] * 20 + [True, True]).open
    assert shift.straggler_only
    (shift,) = state(two).open
    assert not shift.straggler_only  # no straggler named: the code
    code = series((1.0, 20), (1.15, 6))  # a code regression, then one straggler night on top
    code[-1] *= 1.2
    (shift,) = state(code, stragglers=[False] * 25 + [True]).open
    assert shift.start == 20 and not shift.straggler_only
