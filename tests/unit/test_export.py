"""run_bench.py export: a real run's records in every format, read back by each consumer's rules.

TensorBoard files are read by TensorBoard's own EventAccumulator. The two JSON formats have no
reader to run here, so they are checked against their documented fields: the PyTorch OSS
benchmark database's v3 table (pytorch/test-infra, oss_ci_benchmark_v3) and github-action-
benchmark's BenchmarkResult (src/extract.ts) with the regular expression its range parser uses.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

from bench.cli.main import main
from bench.results.records import load_run

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "run_cpu_default"
CELLS = ("ov0-mp0-ck0-ws1", "ov1-mp0-ck0-ws2")

# The v3 table's columns these records fill (ClickHouse types): every key the export writes
# must be one of them, with a value of that type.
STR, F32, MAP, STRS, F32S = "String", "Float32", "Map(String, String)", "Array(String)", "Array(Float32)"
V3 = {
    "benchmark": {"name": STR, "mode": STR, "dtype": STR, "extra_info": MAP},
    "model": {"name": STR, "type": STR, "backend": STR, "origins": STRS, "extra_info": MAP},
    "metric": {"name": STR, "benchmark_values": F32S, "target_value": F32, "extra_info": MAP},
}
REQUIRED = {"benchmark": ("name",), "model": ("name",), "metric": ("name", "benchmark_values")}
GAB_RANGE = re.compile(r"(?P<prefix>(\+-|±)\s*)(?P<value>\d.+)")  # github-action-benchmark extractRangeInfo.ts


def float32(x: float) -> bool:
    return math.isfinite(x) and math.isfinite(struct.unpack("f", struct.pack("f", x))[0])


def is_type(value: object, kind: str) -> bool:
    if kind == STR:
        return isinstance(value, str)
    if kind == F32:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float32(value)
    if kind == MAP:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if kind == STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, list) and bool(value) and all(is_type(v, F32) for v in value)


def export(tmp_path: Path, fmt: str, run: Path = FIXTURE) -> Path:
    out = tmp_path / fmt
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    return out


def test_pytorch_oss_records_fit_the_v3_table(tmp_path: Path) -> None:
    (path,) = export(tmp_path, "pytorch-oss").glob("*.json")
    records = json.loads(path.read_text())
    run = load_run(FIXTURE)
    for record in records:
        assert set(record) == set(V3)
        for part, columns in V3.items():
            assert set(record[part]) <= set(columns), f"{part} has keys the table lacks"
            assert all(record[part].get(k) for k in REQUIRED[part])
            for key, value in record[part].items():
                assert is_type(value, columns[key]), (part, key, value)
    by = {(r["model"]["name"], r["metric"]["name"]): r for r in records}
    assert len(by) == len(records)  # one record per cell and metric
    for cell in CELLS:
        rec = run.records[cell]["metrics"]
        step = by[(cell, "step_time_s")]
        assert step["metric"]["benchmark_values"] == rec["step_time_s"]["samples"]  # the per-step samples
        assert step["metric"]["extra_info"]["unit"] == "s"
        tokens = by[(cell, "tokens_per_s")]["metric"]["benchmark_values"]
        assert len(tokens) == len(rec["step_time_s"]["samples"]) and sorted(tokens)[2] == pytest.approx(rec["tokens_per_s"])
        assert (cell, "mfu") not in by  # null on CPU: not exported as a number
        info = step["benchmark"]["extra_info"]
        assert info["swept.parallel.world_size"] == str(run.records[cell]["swept"]["parallel.world_size"])
        assert info["strategy"] == "isp" and info["layout"].startswith("world_size=")
        assert info["env.git_commit"] == run.env["git_commit"] and info["env.gpu"] == "" and "env.nccl" in info
        assert step["benchmark"]["dtype"] == "float32" and step["benchmark"]["mode"] == "training"


def test_planner_prediction_is_the_target_value(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    lines[0]["metrics"]["plan"] = {"available": True, "hardware": "cpu",
                                   "step_time_s": {"predicted": 0.15, "measured": 0.167, "rel_error": 0.1}}
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path,) = export(tmp_path, "pytorch-oss", run).glob("*.json")
    by = {(r["model"]["name"], r["metric"]["name"]): r["metric"] for r in json.loads(path.read_text())}
    assert by[(CELLS[0], "step_time_s")]["target_value"] == 0.15
    assert by[(CELLS[0], "plan_step_time_rel_error")]["benchmark_values"] == [0.1]
    assert "target_value" not in by[(CELLS[1], "step_time_s")]


def test_github_action_benchmark_files_follow_benchmark_result(tmp_path: Path) -> None:
    out = export(tmp_path, "github-action-benchmark")
    smaller = json.loads((out / "smaller_is_better.json").read_text())
    bigger = json.loads((out / "bigger_is_better.json").read_text())
    run = load_run(FIXTURE)
    for entry in smaller + bigger:  # interface BenchmarkResult {name; value; range?; unit; extra?}
        assert set(entry) <= {"name", "value", "range", "unit", "extra"}
        assert isinstance(entry["name"], str) and isinstance(entry["unit"], str)
        assert isinstance(entry["value"], (int, float)) and not isinstance(entry["value"], bool)
        assert all(isinstance(entry.get(k, ""), str) for k in ("range", "extra"))
    names = [e["name"] for e in smaller + bigger]
    assert len(set(names)) == len(names)
    assert {n.rsplit("/", 1)[1] for n in (e["name"] for e in bigger)} <= {"tokens_per_s", "tflops_per_rank", "overlap_pct"}
    for cell in CELLS:
        step = next(e for e in smaller if e["name"] == f"cpu-default/{cell}/step_time_s")
        summary = run.records[cell]["metrics"]["step_time_s"]
        assert step["value"] == summary["median"]
        match = GAB_RANGE.match(step["range"])
        assert match and float(match["value"]) == pytest.approx((summary["p90"] - summary["p10"]) / 2, rel=1e-5)
        assert f"commit {run.env['git_commit']}" in step["extra"]


def test_tensorboard_events_read_back_by_event_accumulator(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = export(tmp_path, "tensorboard")
    assert sorted(p.name for p in out.iterdir()) == sorted(CELLS)  # one TensorBoard run per cell
    run = load_run(FIXTURE)
    for cell in CELLS:
        acc = EventAccumulator(str(out / cell))
        acc.Reload()
        rec = run.records[cell]["metrics"]
        steps = acc.Scalars("step/step_time_s")
        assert [e.step for e in steps] == list(range(1, len(rec["step_time_s"]["samples"]) + 1))
        assert [e.value for e in steps] == pytest.approx(rec["step_time_s"]["samples"], rel=1e-6)
        assert [e.value for e in acc.Scalars("step/loss")] == pytest.approx(rec["loss"], rel=1e-6)
        assert len(acc.Scalars("step/tokens_per_s")) == len(steps)
        assert acc.Scalars("cell/peak_memory_bytes")[0].value == pytest.approx(rec["peak_memory_bytes"], rel=1e-6)
        assert acc.Scalars("cell/exposed_comm_s")[0].value == pytest.approx(rec["exposed_comm_s"], rel=1e-6)
        assert "cell/mfu" not in acc.Tags()["scalars"]  # null on CPU
        assert "cell/text_summary" in acc.Tags()["tensors"]


def torn(tmp_path: Path) -> Path:
    run = tmp_path / "torn"
    shutil.copytree(FIXTURE, run)
    with open(run / "results.jsonl", "a") as f:
        f.write('{"schema_version": 1, "cell": "ov1-mp1-ck0-ws2", "status": "o')  # a crash mid-write
    return run


@pytest.mark.parametrize("fmt", ["pytorch-oss", "github-action-benchmark", "tensorboard"])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    for run, why in ((tmp_path / "missing", "run folder not found"), (torn(tmp_path / fmt), "torn record")):
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
        assert why in capsys.readouterr().err and not out.exists()
    assert main(["export", str(FIXTURE), "--format", "csv", "--out", str(out)]) == 2
    assert "invalid choice: 'csv'" in capsys.readouterr().err and not out.exists()


def test_tensorboard_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    out = tmp_path / "tb"
    assert main(["export", str(FIXTURE), "--format", "tensorboard", "--out", str(out)]) == 2
    assert 'pip install -e ".[tensorboard]"' in capsys.readouterr().err and not out.exists()
