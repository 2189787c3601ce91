"""plan --published: every row of the shipped table of published measurements is planned, on
its cluster's hardware file, and set beside its source with the error."""

from __future__ import annotations

import json

import pytest

from bench.cli.plan import main
from bench.plan.published import DEFAULT_TABLE, plan_table


@pytest.fixture(scope="module")
def result():
    return plan_table(DEFAULT_TABLE)


def test_every_published_row_is_planned_with_its_own_layout(result):
    rows = result["rows"]
    assert len(rows) == 41 and all(r.why_not is None for r in rows)
    for r in rows:
        p = r.prediction
        assert p.world_size == r.gpus and p.strategy == "isp"
        assert p.tokens_per_s > 0 and p.step_time_s > 0 and r.error is not None
        assert f"zero1 {r.table['settings']['zero1'] if r.table['settings']['zero1'] > 0 else r.gpus // p.wp}" \
            in " ".join(p.notes)  # -1 resolved to the whole weight-data group
    # the published values are the sources' own, not predictions
    by_id = {r.id: r for r in rows}
    assert by_id["evo-throughput-zero1-8@1024/2x4"].published == 3625
    assert by_id["internlm2-256k@128/1x1"].prediction.sp == 8


def test_the_summary_states_each_goal_and_the_table_prints_its_sources(result, capsys):
    s = result["summary"]
    assert s["planned"] == 41 and set(s["kendall_tau"]) == {"internlm-7b", "internlm2-7b"}
    assert set(s["goals"]) == {"median_abs_error <= 5%", "no row beyond 15%", "every run that ran fits",
                               "Kendall tau >= 0.8 within each model"}
    assert s["median_abs_error"] == sorted(abs(r.error) for r in result["rows"])[20]
    assert main(["--published", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["rows"]) == 41 and "tp=2" in " ".join(doc["not_planned"])
    assert any("assumption" in a or "guess" in a for items in doc["assumptions"].values() for a in items)


def test_a_missing_table_is_a_clear_error(tmp_path, capsys):
    assert main(["--published", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
