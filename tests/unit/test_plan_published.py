"""plan --published: every row of the shipped table of published measurements is planned, on
its cluster's hardware file, and set beside its source with the error."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest

from bench.cli.plan import main
from bench.plan.hardware import load_hardware
from bench.plan.published import DEFAULT_TABLE, HARDWARE_DIR, plan_table, scaled_compute


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


@pytest.fixture(scope="module")
def one_node():
    return plan_table(DEFAULT_TABLE, one_node=True)


def test_one_node_calibration_zeroes_the_median_of_each_files_one_node_rows(result, one_node):
    cal = one_node["calibration"]
    assert set(cal) == {r.table["hardware"] for r in result["rows"]}
    by_id = {r.id: r for r in one_node["rows"]}
    plain = {r.id: r for r in result["rows"]}
    for name, c in cal.items():
        hw = load_hardware(HARDWARE_DIR / name)
        rows = [by_id[i] for i in c["rows"]]
        assert rows and all(r.gpus <= hw.gpus_per_node and r.table["hardware"] == name for r in rows)
        assert abs(statistics.median(r.error for r in rows)) < 1e-3
        assert c["efficiency"] == pytest.approx({k: v * c["factor"] for k, v in hw.efficiency.items()})
        # every row of the file is planned on the scaled rates: slower GPUs, fewer tokens per GPU
        for r in one_node["rows"]:
            if r.table["hardware"] == name:
                assert (r.predicted < plain[r.id].predicted) == (c["factor"] < 1)
    # the goals are judged on the rows that were not calibrated on; all rows are summarised beside
    used = {i for c in cal.values() for i in c["rows"]}
    assert one_node["summary"]["planned"] == 41 - len(used) == 36
    assert one_node["summary_all_rows"]["planned"] == 41
    assert one_node["summary"]["median_abs_error"] == pytest.approx(
        statistics.median(abs(r.error) for r in one_node["rows"] if r.id not in used))


def test_one_node_calibration_refuses_a_file_with_measured_rates_and_prints_its_factors(capsys):
    hw = load_hardware(HARDWARE_DIR / "a100-sxm4-80gb-roce4x100.yaml")
    with pytest.raises(ValueError, match="a100-sxm4-80gb-roce4x100.yaml: carries measured compute rates"):
        scaled_compute(dataclasses.replace(hw, measured={"bfloat16": {"matmul_tflops": 200.0}}), 0.9)
    assert main(["--published", "--one-node"]) == 0
    out = capsys.readouterr().out
    assert "one-node calibration" in out and "(calibration row)" in out
    assert "the other rows (the goals are judged on these): 36 of 36 rows planned" in out
    assert main(["--one-node"]) == 2 and "--published" in capsys.readouterr().err


def test_one_node_calibration_refuses_a_cluster_without_a_one_node_row(tmp_path):
    import yaml

    doc = yaml.safe_load(DEFAULT_TABLE.read_text())
    table = doc["tables"][0]
    doc["tables"] = [{**table, "rows": [r for r in table["rows"] if r[0] > 8]}]
    path = tmp_path / "scale-out-only.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"scale-out-only.yaml: a100-sxm4-80gb-roce4x100.yaml has no row on one node"):
        plan_table(path, one_node=True)
    assert plan_table(path)["summary"]["planned"] == 7  # without --one-node the rows are planned as ever
