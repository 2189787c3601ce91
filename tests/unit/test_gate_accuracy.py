"""The gate-accuracy harness in reduced form, on real step-time noise of this project's CPU runs.

tests/support/data/step_noise_pool.json holds the step-time samples of 5 default runs
(8 cells each) of one commit, each divided by its cell's level (docs/compare.md says how
it was made). Ten histories per row instead of the 200 the docs table uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.results.changepoint import DetectorSettings
from bench.results.gate_accuracy import Plan, changepoint_gate, main, pairwise_gate, scaled, score

POOL = Path(__file__).resolve().parents[1] / "support" / "data" / "step_noise_pool.json"
PLAN = Plan(series=10, nights=30)


@pytest.fixture(scope="module")
def real() -> list[list[float]]:
    return json.loads(POOL.read_text())["pool"]


def test_change_points_cry_wolf_far_less_than_pairwise_compare(real: list[list[float]]) -> None:
    ours = score(changepoint_gate(DetectorSettings(), recent=3), real, PLAN)
    pairwise = score(pairwise_gate(), real, PLAN)
    assert ours.noise_nights == pairwise.noise_nights == 250
    assert ours.false_per_100() <= 1.2  # at most 3 red nights in 250 noise-only nights
    assert pairwise.false_per_100() >= 10 * max(ours.false_per_100(), 1.0)


def test_on_a_quieter_machine_big_shifts_are_caught_within_two_nights(real: list[list[float]]) -> None:
    quiet = scaled(real, 0.05)  # the same nights with a twentieth of the deviation, about 2% spread
    ours = score(changepoint_gate(DetectorSettings(), recent=3), quiet, PLAN)
    assert ours.within2[0.20] >= 9 and ours.within2[0.10] >= 7
    assert ours.false_per_100() <= 1.2
    assert all(d <= 2 for d in ours.delays[0.20])


def test_command_line_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--pool", str(POOL), "--series", "2", "--noise-scale", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "| change points (ours) |" in out and "| compare (pairwise, last night) |" in out
    assert "40 real (run, cell) nights" in out
