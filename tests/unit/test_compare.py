"""compare: the verdict rule, exit codes and what is shown around the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.support.run_factory import CELLS, default_env, jittered, make_record, write_run

from bench.cli import compare
from bench.results.records import RecordError, load_run, metric_samples, metric_value
from bench.results.verdict import METRICS_BY_NAME, judge


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:
    code = compare.main([*argv, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def _verdicts(report: dict, metric: str) -> dict[str, str]:
    return {r["cell"]: r["verdict"] for r in report["rows"] if r["metric"] == metric}


def test_identical_runs_no_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, new = write_run(tmp_path, "20250101T000000Z_a"), write_run(tmp_path, "20250102T000000Z_b")
    code, report = _json(capsys, [str(base), str(new)])
    assert code == 0
    assert report["rows"] and {r["verdict"] for r in report["rows"]} == {"no change"}
    assert report["config_diff"] == []  # run names/out dirs differ but are identity, not config
    assert {r["metric"] for r in report["rows"]} >= {"step_time_s", "tokens_per_s", "peak_memory_bytes", "mfu"}


def test_twenty_percent_slower_regresses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_run(tmp_path, "base")
    new = write_run(tmp_path, "new", scale={"ws2_overlap-on": 1.2, "ws4_overlap-off": 1.2}, seed=100)
    code, report = _json(capsys, [str(base), str(new)])
    assert code == 1 and report["regressed"]
    steps = _verdicts(report, "step_time_s")
    assert steps == {"ws2_overlap-on": "slower", "ws4_overlap-off": "slower",
                     "ws2_overlap-off": "no change", "ws4_overlap-on": "no change"}
    assert _verdicts(report, "tokens_per_s")["ws2_overlap-on"] == "slower"  # backed by per-step rates
    row = next(r for r in report["rows"] if r["cell"] == "ws2_overlap-on" and r["metric"] == "step_time_s")
    assert row["ratio"] == pytest.approx(1.2, rel=0.02) and row["p_value"] < 0.01


def test_faster_is_not_a_regression(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, new = write_run(tmp_path, "base"), write_run(tmp_path, "new", scale=0.8, seed=7)
    code, report = _json(capsys, [str(base), str(new)])
    assert code == 0
    assert set(_verdicts(report, "step_time_s").values()) == {"faster"}


def test_small_change_within_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, new = write_run(tmp_path, "base"), write_run(tmp_path, "new", scale=1.02, seed=50)
    code, report = _json(capsys, [str(base), str(new)])
    assert code == 0
    assert set(_verdicts(report, "step_time_s").values()) == {"no change"}


def test_large_change_in_noisy_samples_is_not_significant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cell = "ws2_overlap-on"
    noisy = [0.1, 0.5, 0.2, 0.9, 0.3, 0.7, 0.4, 1.0, 0.6, 0.8]  # median 0.55, spread 10x
    base = write_run(tmp_path, "base", cells=[cell], samples={cell: noisy})
    new = write_run(tmp_path, "new", cells=[cell], samples={cell: [s * 1.1 for s in reversed(noisy)]})
    code, report = _json(capsys, [str(base), str(new)])
    row = next(r for r in report["rows"] if r["metric"] == "step_time_s")
    assert row["ratio"] == pytest.approx(1.1) and row["p_value"] > 0.05
    assert row["verdict"] == "no change" and "not significant" in row["note"]
    assert code == 0


def test_threshold_option_and_no_samples_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_run(tmp_path, "base")
    new = write_run(tmp_path, "new", scale=1.2, seed=100, memory=36e9)
    code, report = _json(capsys, [str(base), str(new), "--threshold", "step_time_s=25", "--threshold", "tokens_per_s=25%",
                                  "--threshold", "mfu=25", "--threshold", "peak_memory_bytes=30"])
    assert code == 0  # 20% slower and 20% more memory, but thresholds were raised to 25% and 30%
    code, report = _json(capsys, [str(base), str(new), "--threshold", "step_time_s=25", "--threshold", "tokens_per_s=25",
                                  "--threshold", "mfu=25"])
    assert code == 1
    assert set(_verdicts(report, "peak_memory_bytes").values()) == {"more (no samples)"}
    assert set(_verdicts(report, "step_time_s").values()) == {"no change"}


def test_mismatched_and_failed_cells_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_run(tmp_path, "base", cells=["ws2_overlap-on", "ws2_overlap-off", "ws4_overlap-on"])
    new = write_run(tmp_path, "new", cells=["ws2_overlap-on", "ws2_overlap-off", "ws4_overlap-off"])
    # The new run failed one cell, then a resume re-ran another one: the last line wins.
    with (new / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(make_record("new", "ws2_overlap-off", [0.25] * 3, status="timeout")) + "\n")
    code, report = _json(capsys, [str(base), str(new)])
    assert report["only_in_base"] == ["ws4_overlap-on"] and report["only_in_new"] == ["ws4_overlap-off"]
    assert report["failed"] == [{"cell": "ws2_overlap-off", "base_status": "ok", "new_status": "timeout",
                                 "regressed": True, "error": "RuntimeError: NCCL watchdog timeout"}]
    assert code == 1  # ok before, timed out now
    assert compare.main([str(base), str(new)]) == 1
    text = capsys.readouterr().out
    assert "Only in base" in text and "ws4_overlap-on" in text and "timeout" in text


def test_env_and_config_differences_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_run(tmp_path, "base")
    new = write_run(tmp_path, "new", hidden=8192,
                    env=default_env(torch="2.7.0", gpu="NVIDIA H200", git_commit="b" * 40, hostname="node02"))
    compare.main([str(base), str(new)])
    text = capsys.readouterr().out
    header = text.split("cell ")[0]  # differences come before the table
    assert "torch: 2.6.0 -> 2.7.0" in header and "gpu: NVIDIA H100 80GB HBM3 -> NVIDIA H200" in header
    assert "hostname: node01 -> node02" in header and "git_commit" in header and "driver" not in header
    assert "model.hidden: 4096 -> 8192 (all 4 cells)" in header
    assert compare.main([str(base), str(new), "--format", "md"]) in (0, 1)
    md = capsys.readouterr().out
    assert "#### Environment differences" in md and "| cell" in md


def test_corrupt_results_exit_2_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, new = write_run(tmp_path, "base"), write_run(tmp_path, "new")
    lines = (new / "results.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a record cut off mid-write
    (new / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert compare.main([str(base), str(new)]) == 2
    err = capsys.readouterr().err
    assert f"{new / 'results.jsonl'}:3: not valid JSON" in err and "Traceback" not in err

    (new / "results.jsonl").write_text('{"schema_version": 1, "status": "ok"}\n')
    assert compare.main([str(base), str(new)]) == 2
    assert "results.jsonl:1: record lacks required key(s): cell" in capsys.readouterr().err


def test_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_run(tmp_path, "base")
    assert compare.main([str(base), str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert compare.main([str(base), str(tmp_path / "empty")]) == 2
    assert "results.jsonl: results file not found" in capsys.readouterr().err
    assert compare.main([str(base)]) == 2  # one run needs --against-history
    assert compare.main([str(base), str(base), "--threshold", "bogus=5"]) == 2
    capsys.readouterr()


def test_records_helpers(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, "20250101T000000Z_nightly2", cells=["ws2_overlap-on"])
    run = load_run(run_dir)
    rec = run.records["ws2_overlap-on"]
    assert run.config_name == "nightly" and run.utc == "2025-01-01T00:00:00Z"
    assert metric_value(rec, "step_time_s") == metric_value(rec, "step_time_s.median")
    assert metric_value(rec, "comm.all_gather.busbw_gbps") == 180.0
    assert metric_value(rec, "nope.missing") is None and metric_samples(rec, "peak_memory_bytes") is None
    assert metric_samples(rec, "step_time_s.p90") == rec["metrics"]["step_time_s"]["samples"]
    rates = metric_samples(rec, "tokens_per_s")
    assert rates is not None and len(rates) == 10
    with pytest.raises(RecordError) as exc:
        load_run(tmp_path / "missing")
    assert exc.value.line is None


def test_judge_rule_edges() -> None:
    spec = METRICS_BY_NAME["exposed_comm_s"]
    assert judge(spec, 0.0, 0.0005, None, None, 0.05).word == "no change"  # under the absolute floor
    noisy = judge(spec, 0.0, 0.05, None, None, 0.05)  # trace-derived, no samples: shown, never gated
    assert noisy.word == "worse (no samples, not gated)" and not noisy.regressed
    memory = judge(METRICS_BY_NAME["peak_memory_bytes"], 1e9, 1.2e9, None, None, 0.05)
    assert memory.word == "more (no samples)" and memory.regressed  # deterministic: the threshold gates
    time = METRICS_BY_NAME["step_time_s"]
    few = judge(time, 1.0, 1.5, [1.0, 1.0], [1.5, 1.5], 0.05)  # 2 vs 2 samples can never reach p < 0.05
    assert few.word == "no change" and not few.regressed
    many = judge(time, 1.0, 1.5, jittered(1.0, seed=1), jittered(1.5, seed=2), 0.05)
    assert many.word == "slower" and many.regressed
    assert len(CELLS) == 4


def test_energy_per_token_is_read_where_the_record_keeps_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """metrics.nvml.energy_per_token_j (bench/metrics/assemble.py), shown beside the others."""
    runs = []
    for name, energy in (("base", 0.50), ("new", 0.60)):
        run = write_run(tmp_path, name)
        lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
        for record in lines:
            record["metrics"]["nvml"] = {"available": True, "energy_per_token_j": energy}
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs.append(run)
    _, report = _json(capsys, [str(r) for r in runs])
    rows = [r for r in report["rows"] if r["metric"] == "nvml.energy_per_token_j"]
    assert len(rows) == len(CELLS) and all(r["ratio"] == pytest.approx(1.2) for r in rows), rows
