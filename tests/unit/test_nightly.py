"""run_bench.py nightly: exit codes 0/1/2/3, the run a regression started at, exact checks, metadata."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from bench.cli.main import main
from bench.results import history
from tests.support.run_factory import default_env, edit_records, write_nights, write_run


def nights(tmp_path: Path, scales: list[float], seed: int = 0) -> list[Path]:
    return write_nights(tmp_path, scales, seed)


def nightly(run: Path, db: Path, *extra: str) -> int:
    return main(["nightly", "--run", str(run), "--db", str(db), "--min-history", "5", *extra])


def judge_all(runs: list[Path], db: Path) -> list[int]:
    return [nightly(run, db, "--format", "json") for run in runs]


def test_steady_history_exits_3_then_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, db = nights(tmp_path, [1.0] * 8), tmp_path / "h.sqlite"
    assert judge_all(runs, db) == [3] * 5 + [0] * 3  # K = 5 earlier runs before a verdict
    doc = json.loads((runs[-1] / "nightly.json").read_text())
    assert doc["exit_code"] == 0 and doc["regressions"] == 0
    assert "nothing regressed" in (runs[-1] / "nightly.md").read_text()
    assert {s["status"] for s in doc["series"]} == {"no change"}


def test_slowdown_names_the_night_it_started(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, db = nights(tmp_path, [1.0] * 8 + [1.25] * 3), tmp_path / "h.sqlite"
    codes = judge_all(runs, db)
    assert codes[:9] == [3] * 5 + [0] * 4  # the first slow night alone is not enough
    assert codes[9] == 1 and codes[10] == 1
    doc = json.loads((runs[9] / "nightly.json").read_text())
    slow = [s for s in doc["series"] if s["metric"] == "step_time_s"]
    assert all(s["status"] == "regression" for s in slow) and len(slow) == 4
    assert {s["change"]["start_run"] for s in slow} == {runs[8].name}
    assert all(0.2 < s["change"]["rel_change"] < 0.3 and s["change"]["confidence"] > 0.999 for s in slow)
    faster = [s for s in doc["series"] if s["metric"] == "tokens_per_s"]
    assert all(s["status"] == "regression" for s in faster)  # fewer tokens/s is worse too
    # laid beside what changed that night: night 9 ran commit 999..., night 8 commit 888...
    assert {json.dumps(s["change"]["changed"]) for s in slow} == {json.dumps({"git_commit": ["8" * 40, "9" * 40]})}
    md = (runs[9] / "nightly.md").read_text()
    assert "## Regressions" in md and "git_commit 8888888888 -> 9999999999" in md


def test_speedup_is_an_improvement_not_a_failure(tmp_path: Path) -> None:
    runs, db = nights(tmp_path, [1.0] * 8 + [0.8] * 2), tmp_path / "h.sqlite"
    assert judge_all(runs, db)[-1] == 0
    doc = json.loads((runs[-1] / "nightly.json").read_text())
    assert doc["improvements"] >= 4 and doc["regressions"] == 0


def test_cuda_peak_memory_is_an_exact_check(tmp_path: Path) -> None:
    runs, db = nights(tmp_path, [1.0] * 7), tmp_path / "h.sqlite"
    for i, run in enumerate(runs):
        bump = 4096 if i == 6 else 0  # 4 KiB more on the last night: no statistics needed

        def cuda(record: dict, bump: int = bump) -> None:
            record["config"]["run"]["device"] = "cuda"
            record["metrics"]["peak_memory_bytes"] += bump
        edit_records(run, cuda)
    assert judge_all(runs, db)[-1] == 1
    doc = json.loads((runs[-1] / "nightly.json").read_text())
    peaks = [s for s in doc["series"] if s["metric"] == "peak_memory_bytes"]
    assert {(s["check"], s["status"]) for s in peaks} == {("exact", "regression")}
    assert {s["change"]["start_run"] for s in peaks} == {runs[-1].name}


def test_bytes_differing_from_the_formula_fail_at_once(tmp_path: Path) -> None:
    runs, db = nights(tmp_path, [1.0] * 2), tmp_path / "h.sqlite"

    def wrong(record: dict) -> None:
        record["metrics"]["comm"]["matches_prediction"] = record["cell"] != "ws2_overlap-on"
    edit_records(runs[1], wrong)
    assert judge_all(runs, db) == [3, 1]  # short history, yet wrong bytes are wrong
    doc = json.loads((runs[1] / "nightly.json").read_text())
    bad = [s for s in doc["series"] if s["status"] == "regression"]
    assert [(s["cell"], s["metric"]) for s in bad] == [("ws2_overlap-on", "comm.matches_prediction")]


def test_cell_failing_after_ok_history_is_a_regression(tmp_path: Path) -> None:
    runs, db = nights(tmp_path, [1.0] * 6), tmp_path / "h.sqlite"
    edit_records(runs[-1], lambda r: r.update(status="failed", metrics=None) if r["cell"] == "ws4_overlap-on" else None)
    assert judge_all(runs, db)[-1] == 1
    doc = json.loads((runs[-1] / "nightly.json").read_text())
    assert doc["failed_cells"] == [{"cell": "ws4_overlap-on", "status": "failed", "ok_before": True}]


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    assert nightly(tmp_path / "missing", db) == 2
    run = nights(tmp_path, [1.0])[0]
    (run / "results.jsonl").write_text('{"schema_version": 1, "cell": "x"}\n')
    assert nightly(run, db) == 2
    assert "results.jsonl:1: record lacks required key(s): status" in capsys.readouterr().err
    assert main(["nightly", "--run", str(run), "--min-history", "0"]) == 2
    assert main(["nightly", "config.yaml", "--run", str(run)]) == 2
    assert main(["nightly", "--help"]) == 0 and main(["history", "detect", "--help"]) == 0
    db.write_text("not a database")
    good = nights(tmp_path / "b", [1.0])[0]
    assert nightly(good, db) == 2


def test_history_keeps_run_metadata_and_migrates_old_dbs(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:  # the first schema, before cuda/nccl/gpu_count/nnodes
        conn.executescript(
            "CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, path TEXT NOT NULL UNIQUE,"
            " utc TEXT, git_commit TEXT, hostname TEXT, torch TEXT, gpu TEXT, driver TEXT, config_name TEXT);"
            "INSERT INTO runs (name, path, utc, config_name) VALUES ('old', '/gone', '2024-12-31', 'nightly');")
    run = write_run(tmp_path, "20250101T000000Z_nightly", env=default_env(gpu_count=8, nnodes=2))
    history.record_run(db, run)
    old, new = history.list_runs(db)
    assert old["name"] == "old" and old["nnodes"] is None
    assert (new["git_commit"], new["torch"], new["cuda"], new["nccl"], new["driver"], new["gpu"]) == (
        "a" * 40, "2.6.0", "12.4", "2.21.5", "550.54", "NVIDIA H100 80GB HBM3")
    assert (new["gpu_count"], new["nnodes"]) == ("8", "2")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == history.SCHEMA_VERSION
        statuses = conn.execute("SELECT cell, status FROM cell_status ORDER BY cell").fetchall()
    assert len(statuses) == 4 and {s for _, s in statuses} == {"ok"}


def test_history_detect_and_plot_mark_the_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, db = nights(tmp_path, [1.0] * 8 + [1.25] * 4), tmp_path / "h.sqlite"
    for run in runs:
        history.record_run(db, run)
    assert main(["history", "detect", "--db", str(db), "--format", "json"]) == 0
    found = json.loads(capsys.readouterr().out)
    steps = [f for f in found if f["metric"] == "step_time_s"]
    assert len(steps) == 4 and {(f["start_run"], f["kind"], f["index"]) for f in steps} == {(runs[8].name, "regression", 8)}
    assert not [f for f in found if f["metric"] == "peak_memory_bytes"]  # constant: no change
    assert main(["history", "detect", "--db", str(db)]) == 0
    assert runs[8].name in capsys.readouterr().out
    out = tmp_path / "plots"
    assert main(["history", "plot", "--db", str(db), "--config", "nightly", "--metric", "step_time_s",
                 "--cell", "ws2_overlap-on", "--out", str(out)]) == 0
    assert (out / "trend_ws2_overlap-on_step_time_s.png").stat().st_size > 0
