"""Change-point detection on synthetic nightly series with known steps."""

from __future__ import annotations

import random

import pytest

from bench.results.changepoint import DetectorSettings, detect, latest_change, noise_sigma


def noisy(n: int, level: float, sd: float, rng: random.Random) -> list[float]:
    return [level * (1.0 + rng.gauss(0.0, sd)) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_known_step_gives_its_start_run(seed: int) -> None:
    rng = random.Random(seed)
    series = noisy(20, 1.0, 0.02, rng) + noisy(6, 1.15, 0.02, rng)
    points = detect(series)
    assert [p.index for p in points] == [20]
    assert points[0].rel_change == pytest.approx(0.15, abs=0.03)
    assert points[0].confidence > 0.999


@pytest.mark.parametrize("seed", range(20))
def test_noise_only_gives_no_change_point(seed: int) -> None:
    assert detect(noisy(40, 1.0, 0.05, random.Random(100 + seed))) == []


def test_improvement_is_a_negative_change() -> None:
    rng = random.Random(7)
    points = detect(noisy(15, 2.0, 0.01, rng) + noisy(5, 1.6, 0.01, rng))
    assert [p.index for p in points] == [15]
    assert points[0].rel_change == pytest.approx(-0.2, abs=0.02)


def test_two_steps_are_both_found() -> None:
    rng = random.Random(3)
    series = noisy(12, 1.0, 0.01, rng) + noisy(12, 1.2, 0.01, rng) + noisy(12, 1.0, 0.01, rng)
    assert [p.index for p in detect(series)] == [12, 24]


def test_change_below_min_effect_is_not_reported() -> None:
    # A constant series: any step is infinitely significant, so only the effect floor decides.
    assert detect([1.0] * 10 + [1.02] * 5) == []
    assert [p.index for p in detect([1.0] * 10 + [1.02] * 5, DetectorSettings(min_effect=0.01))] == [10]


def test_latest_change_only_while_recent() -> None:
    rng = random.Random(11)
    base = noisy(20, 1.0, 0.01, rng)
    stepped = base + noisy(8, 1.3, 0.01, rng)
    assert latest_change(stepped[:21], recent=3) is None  # one slow night may be a busy machine
    assert latest_change(stepped[:22], recent=3).index == 20  # the second confirms it
    assert latest_change(stepped[:21], DetectorSettings(min_tail=1), recent=3).index == 20
    assert latest_change(stepped[:23], recent=3).index == 20
    assert latest_change(stepped, recent=3) is None  # eight nights on it is old news
    assert latest_change(base, recent=3) is None


def test_noise_sigma_ignores_a_level_shift() -> None:
    rng = random.Random(5)
    flat = [rng.gauss(0.0, 0.1) for _ in range(40)]
    shifted = flat[:20] + [v + 5.0 for v in flat[20:]]
    assert noise_sigma(shifted) == pytest.approx(noise_sigma(flat), rel=0.25)


def test_one_slow_night_is_not_a_change() -> None:
    rng = random.Random(2)
    base = noisy(20, 1.0, 0.02, rng)
    assert latest_change([*base, 1.5, 1.0]) is None  # a spike then back: the nearer night decides
    assert latest_change([*base, 1.0, 1.5]) is None
    assert latest_change([*base, 1.2, 1.25]).index == 20


def test_tonights_change_names_its_first_night() -> None:
    """Three nights at the new level in a short series: segmentation cannot establish the split
    yet, tonight's test (the last two nights) finds it, and the start is moved back to night 8."""
    values = [0.2122, 0.2080, 0.2083, 0.2106, 0.2074, 0.2104, 0.2105, 0.2501, 0.2488, 0.2525]
    assert detect(values) == []
    cp = latest_change(values)
    assert cp is not None and cp.index == 7 and 0.17 < cp.rel_change < 0.21
    assert latest_change(values[:9]) is not None and latest_change(values[:9]).index == 7
