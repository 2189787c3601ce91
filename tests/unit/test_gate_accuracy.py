"""The gate-accuracy harness in reduced form, on real step-time noise of this project's CPU runs.

tests/support/data/step_noise_pool.json holds the step-time samples of 5 default runs
(8 cells each) of one commit, each divided by its cell's level (docs/compare.md says how
it was made). Ten histories per row instead of the 200 the docs table uses; the straggler and
preempted nights are the harness's own draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.results.changepoint import DetectorSettings
from bench.results.gate_accuracy import Plan, changepoint_gate, main, nightly_gate, pairwise_gate, scaled, score

POOL = Path(__file__).resolve().parents[1] / "support" / "data" / "step_noise_pool.json"


@pytest.fixture(scope="module")
def real() -> list[list[float]]:
    return json.loads(POOL.read_text())["pool"]


CLEAN = Plan(series=10, nights=30, straggler_rate=0.0, preempt_rate=0.0)


def test_change_points_cry_wolf_far_less_than_pairwise_compare(real: list[list[float]]) -> None:
    ours = score(nightly_gate(DetectorSettings(), recent=3), real, CLEAN)
    pairwise = score(pairwise_gate(), real, CLEAN)
    assert ours.noise_nights == pairwise.noise_nights == 250
    assert ours.false_per_100() <= 1.2  # at most 3 red nights in 250 noise-only nights
    assert pairwise.false_per_100() >= 10 * max(ours.false_per_100(), 1.0)


def test_on_a_quieter_machine_big_shifts_are_caught_within_two_nights(real: list[list[float]]) -> None:
    quiet = scaled(real, 0.05)  # the same nights with a twentieth of the deviation, about 2% spread
    ours = score(nightly_gate(DetectorSettings(), recent=3), quiet, CLEAN)
    assert ours.within2[0.20] >= 9 and ours.within2[0.10] >= 7
    assert ours.false_per_100() <= 1.2
    assert all(d <= 2 for d in ours.delays[0.20])


def test_straggler_and_preempted_nights_are_not_false_alarms(real: list[list[float]]) -> None:
    quiet = scaled(real, 0.02)  # about 1% spread, where stragglers stand out most
    busy = Plan(series=10, nights=30, straggler_rate=0.3, preempt_rate=0.1)  # 3 in 10: pairs of them happen
    ours = score(nightly_gate(DetectorSettings(), recent=3), quiet, busy)
    before = score(changepoint_gate(DetectorSettings(), recent=3), quiet, busy)
    assert ours.noise_straggler > 0 and ours.noise_red <= 1  # labelled, not red
    assert before.noise_red >= 5 * max(ours.noise_red, 1)  # the previous rule called them regressions
    # Caught by the second clean night in each history that has two among its five simulated
    # nights (two of these ten have one), later in calendar nights.
    assert ours.within2_clean[0.20] >= 8 and ours.within2_clean[0.20] > ours.within2[0.20]


def test_command_line_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--pool", str(POOL), "--series", "2", "--noise-scale", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "| nightly (ours: open regressions, stragglers left out) |" in out
    assert "| compare (pairwise, last night) |" in out
    assert "40 real (run, cell) nights" in out and "10% of nights with a straggler" in out and "10% preempted" in out
