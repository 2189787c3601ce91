"""Change points in one (cell, metric) series of nightly values: where did the level move?

A pairwise rule (tonight's samples against last night's) sees only the spread inside one
run, so the drift of a shared machine between runs reads as a real change. Here the noise
is learned from the series itself, between runs: the spread of successive differences
(robust to the level shifts we are looking for, and to the odd slow night). A split of a
segment is placed where the
means on its two sides differ most (in standard errors, as CUSUM does) and counts when the median levels on its two sides differ by more than that noise
can explain (a normal tail, Bonferroni-corrected over the splits tried) and by at least a
minimum relative effect. Segments are split recursively (binary segmentation, as E-Divisive
does), then every change point is re-tested against its neighbours' segments until the set
is stable, so a point that only looked significant beside a larger change does not survive.

Two nights count at the one nearer the old level (not their mean), so one slow night on a
busy machine cannot make a change on its own; by default a change at the end of the
series needs two nights (the second confirms the first).

Values are compared on a log scale when all are positive (a step time is slower by a
fraction, not by a number of seconds), so noise and effect are both relative.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


# The median of m normal draws has variance factor(m) * sigma^2 (exact for m <= 5, the
# large-m limit pi/2m beyond), so short segments at the end of a series are not over-trusted.
_MEDIAN_VAR = {1: 1.0, 2: 0.5, 3: 0.449, 4: 0.343, 5: 0.287}
# A MAD-type scale estimate is about 37% as efficient as the standard deviation, so it
# carries the information of that fraction of its differences (Student t degrees of freedom).
_MAD_EFFICIENCY = 0.37
_SIGMA_FLOOR = 1e-4  # relative; a constant series (deterministic metric) still gets a finite z


@dataclass(frozen=True)
class DetectorSettings:
    alpha: float = 0.001  # largest Bonferroni-corrected p-value a change point may have
    min_effect: float = 0.03  # smallest relative change ever reported (3%)
    min_segment: int = 2  # points each side of an interior change point
    min_tail: int = 2  # nights after a change at the end of the series: a second night confirms it

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_effect < 0:
            raise ValueError(f"min_effect must be >= 0, got {self.min_effect}")
        if self.min_segment < 1 or self.min_tail < 1:
            raise ValueError("min_segment and min_tail must be >= 1")


@dataclass(frozen=True)
class ChangePoint:
    index: int  # first point at the new level
    before: float  # median level of the segment before, in the series' units
    after: float  # median level of the segment after
    rel_change: float  # after / before - 1 (after - before where before is 0)
    p_value: float  # Bonferroni-corrected, over the splits tried in its segment

    @property
    def confidence(self) -> float:
        return 1.0 - self.p_value


def _scale(values: Sequence[float]) -> tuple[list[float], bool]:
    if values and all(v > 0 for v in values):
        return [math.log(v) for v in values], True
    return [float(v) for v in values], False


def noise_sigma(y: Sequence[float]) -> float:
    """Between-run noise of a series from its successive differences (MAD, normal-consistent).

    A level shift spoils one difference out of many, so the median ignores it; a slow
    night spoils two. The floor keeps a constant series from dividing by zero.
    """
    diffs = [abs(b - a) for a, b in zip(y, y[1:])]
    if not diffs:
        return _SIGMA_FLOOR
    return max(1.4826 * statistics.median(diffs) / math.sqrt(2.0), _SIGMA_FLOOR)


def _median_var(m: int) -> float:
    return _MEDIAN_VAR.get(m, math.pi / (2 * m))


def _level(y: Sequence[float], a: int, b: int, ref: float) -> float:
    """A segment's level: its median, except that two nights count at the one nearer `ref`.

    The median of two is their mean, so one slow night (a busy machine) would drag it; the
    nearer night asks both to have moved, which is what a real change does.
    """
    if b - a == 2:
        return min(y[a:b], key=lambda v: abs(v - ref))
    return statistics.median(y[a:b])


@functools.cache
def _student_t() -> Any:
    """scipy.stats (about 0.8 s to import) only once a split is tested, not for every CLI that
    imports this module's settings (a bad config is answered before it)."""
    from scipy.stats import t

    return t


def _split_p(y: Sequence[float], a: int, k: int, b: int, sigma: float, df: float, tries: int) -> tuple[float, float]:
    """(difference of levels, corrected two-sided p) for the split of y[a:b] at k."""
    lo = statistics.median(y[a:k])
    diff = _level(y, k, b, lo) - lo
    if b - k == 2:  # both nights beyond: the tail probability squared
        z = abs(diff) / (sigma * math.sqrt(1.0 + _median_var(k - a)))
        p = 2.0 * float(_student_t().sf(z, df)) ** 2
    else:
        z = abs(diff) / (sigma * math.sqrt(_median_var(k - a) + _median_var(b - k)))
        p = 2.0 * float(_student_t().sf(z, df))
    return diff, min(1.0, p * tries)


def _candidates(a: int, b: int, n: int, s: DetectorSettings) -> range:
    tail = s.min_tail if b == n else s.min_segment
    return range(a + s.min_segment, b - tail + 1)


def _effect(y: Sequence[float], a: int, k: int, b: int, logged: bool) -> tuple[float, float, float]:
    lo = statistics.median(y[a:k])
    hi = _level(y, k, b, lo)
    if logged:
        return math.exp(lo), math.exp(hi), math.exp(hi - lo) - 1.0
    return lo, hi, (hi - lo) / abs(lo) if lo else hi - lo


class _Series:
    def __init__(self, values: Sequence[float], settings: DetectorSettings) -> None:
        self.y, self.logged = _scale(values)
        self.n = len(self.y)
        self.s = settings
        self.sigma = noise_sigma(self.y)
        self.df = max(1.0, _MAD_EFFICIENCY * (self.n - 1))
        self.prefix = [0.0]
        for v in self.y:
            self.prefix.append(self.prefix[-1] + v)

    def _mean(self, a: int, b: int) -> float:
        return (self.prefix[b] - self.prefix[a]) / (b - a)

    def test(self, a: int, k: int, b: int, tries: int) -> ChangePoint | None:
        _, p = _split_p(self.y, a, k, b, self.sigma, self.df, tries)
        before, after, rel = _effect(self.y, a, k, b, self.logged)
        if p >= self.s.alpha or abs(rel) < self.s.min_effect:
            return None
        return ChangePoint(k, before, after, rel, p)

    def earliest_start(self, a: int, fresh: ChangePoint) -> ChangePoint:
        """Tonight's split is tested at a fixed place (the last `min_tail` nights); the change may
        have started earlier: move it back over the nights nearer the new level than the old,
        as long as the split still holds, so the report names the first night at the new level."""
        lo = statistics.median(self.y[a:fresh.index])
        hi = _level(self.y, fresh.index, self.n, lo)
        k = fresh.index
        while k - 1 - a >= self.s.min_segment and abs(self.y[k - 1] - hi) < abs(self.y[k - 1] - lo):
            k -= 1
        return fresh if k == fresh.index else (self.test(a, k, self.n, 1) or fresh)

    def best_split(self, a: int, b: int) -> ChangePoint | None:
        ks = _candidates(a, b, self.n, self.s)
        if not ks:
            return None
        # Means place the split (a median of a segment that straddles the step ignores the
        # straddling points, so it cannot tell k from k - 2); medians then judge it.
        k = max(ks, key=lambda j: abs(self._mean(j, b) - self._mean(a, j))
                * math.sqrt((j - a) * (b - j) / (b - a)))
        return self.test(a, k, b, len(ks))

    def segment(self, a: int, b: int) -> list[int]:
        found = self.best_split(a, b)
        if found is None:
            return []
        return [*self.segment(a, found.index), found.index, *self.segment(found.index, b)]

    def prune(self, points: list[int]) -> list[ChangePoint]:
        """Re-test each point between its neighbours; drop the weakest failure and repeat."""
        while True:
            bounds = [0, *points, self.n]
            tested = []
            for i, k in enumerate(points):
                a, b = bounds[i], bounds[i + 2]
                tested.append((k, self.test(a, k, b, max(1, len(_candidates(a, b, self.n, self.s))))))
            failed = [k for k, cp in tested if cp is None]
            if not failed:
                return [cp for _, cp in tested if cp is not None]
            points = [k for k in points if k != failed[0]]


def detect(values: Sequence[float], settings: DetectorSettings | None = None) -> list[ChangePoint]:
    """Change points of a series (oldest value first), oldest first."""
    series = _Series(values, settings or DetectorSettings())
    if series.n < 2:
        return []
    return series.prune(series.segment(0, series.n))


def evaluate_splits(values: Sequence[float], points: Sequence[int], settings: DetectorSettings | None = None
                    ) -> list[ChangePoint]:
    """Given split positions from another method (PELT), the same size, p and effect tests."""
    series = _Series(values, settings or DetectorSettings())
    return series.prune(sorted(k for k in set(points) if 0 < k < series.n))


def _with_tonight(values: Sequence[float], s: DetectorSettings) -> tuple[list[ChangePoint], ChangePoint | None]:
    """(the change points of binary segmentation, tonight's fresh change or None)."""
    series = _Series(values, s)
    if series.n < 2:
        return [], None
    points = series.prune(series.segment(0, series.n))
    k = series.n - s.min_tail
    older = [p for p in points if p.index < k]
    a = older[-1].index if older else 0
    fresh = series.test(a, k, series.n, 1) if k - a >= s.min_segment else None
    return points, (fresh if fresh is None else series.earliest_start(a, fresh))


def change_points(values: Sequence[float], settings: DetectorSettings | None = None) -> list[ChangePoint]:
    """Every change point of a series, oldest first, tonight's question answered at the end.

    The older points come from binary segmentation over the whole series. Tonight's question
    is whether the newest nights that can confirm a change (`min_tail` of them) have left the
    level since the last older change point: one split, tested on its own (no Bonferroni
    factor), so a step is caught on its second night. Each point's `after` is the level of
    the segment it starts, so walking the list gives the series' level night by night.
    """
    s = settings or DetectorSettings()
    points, fresh = _with_tonight(values, s)
    if fresh is None:
        return points
    return [*(p for p in points if p.index < fresh.index), fresh]


def latest_change(values: Sequence[float], settings: DetectorSettings | None = None, recent: int = 3
                  ) -> ChangePoint | None:
    """Tonight's fresh change, else a change point that started within the last `recent` values.

    A change established by binary segmentation over the whole series stays news while it
    started within the last `recent` values; older ones stay listed by `history detect`.
    (The nightly keeps a regression open beyond that: bench/results/series_state.py.)
    """
    points, fresh = _with_tonight(values, settings or DetectorSettings())
    if fresh is not None:
        return fresh
    return points[-1] if points and points[-1].index >= len(values) - recent else None
