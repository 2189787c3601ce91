"""history: SQLite round trip, idempotent recording, median of the last N, compare --against-history."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from tests.support.run_factory import default_env, write_run

from bench.cli import compare
from bench.cli import history as history_cli
from bench.results import history
from bench.results.records import load_run


def _record_nightlies(tmp_path: Path, db: Path, scales: list[float]) -> list[Path]:
    runs = []
    for day, scale in enumerate(scales, start=1):
        run = write_run(tmp_path, f"2025010{day}T000000Z_nightly", scale=scale, seed=10 * day,
                        env=default_env(utc=f"2025-01-0{day}T00:00:00Z", git_commit=f"{day}" * 40))
        history.record_run(db, run)
        runs.append(run)
    return runs


def test_record_list_and_query_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "results" / "history.sqlite"
    first, second = _record_nightlies(tmp_path, db, [1.0, 1.1])
    runs = history.list_runs(db)
    assert [r["name"] for r in runs] == [first.name, second.name]
    assert runs[0]["config_name"] == "nightly" and runs[0]["cells"] == 4
    assert runs[1]["git_commit"] == "2" * 40 and runs[0]["gpu"] == "NVIDIA H100 80GB HBM3"

    cell, metric = "ws2_overlap-on", "step_time_s"
    newest, oldest = history.history_points(db, cell, metric)
    expected = [load_run(r).records[cell]["metrics"][metric] for r in (first, second)]
    assert oldest.value == expected[0]["median"] and newest.value == expected[1]["median"]
    assert newest.samples == expected[1]["samples"]  # samples survive the JSON column
    assert history.median_of_last(db, cell, metric, 2) == pytest.approx((oldest.value + newest.value) / 2)
    assert history.median_of_last(db, cell, metric, 1) == newest.value
    assert history.median_of_last(db, cell, metric, 5, before_utc="2025-01-02T00:00:00Z") == oldest.value
    assert history.median_of_last(db, cell, metric, 5, config_name="other") is None
    assert history.median_of_last(db, cell, "comm.all_gather.busbw_gbps", 2) == 180.0  # every number is kept
    pooled = history.pooled_samples([oldest, newest])
    assert pooled is not None and len(pooled) == 20


def test_recording_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    run = write_run(tmp_path, "20250101T000000Z_nightly")
    first_id = history.record_run(db, run)
    assert history.record_run(db, run) == first_id
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM cell_metrics").fetchone()[0]
    # A resumed run appends a record; recording again replaces that run's rows.
    lines = (run / "results.jsonl").read_text().splitlines()
    (run / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    history.record_run(db, run)
    assert len(history.list_runs(db)) == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM cell_metrics").fetchone()[0] == rows // 2


def test_compare_against_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    _record_nightlies(tmp_path, db, [1.0, 1.01, 0.99])
    same = write_run(tmp_path, "20250104T000000Z_nightly", seed=99, env=default_env(utc="2025-01-04T00:00:00Z"))
    history.record_run(db, same)  # recording before comparing must not compare the run with itself
    assert compare.main(["--against-history", "3", str(same), "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "median of last 3 recorded runs of 'nightly'" in text and "no regression" in text

    slow = write_run(tmp_path, "20250105T000000Z_nightly", scale={"ws4_overlap-on": 1.2}, seed=77,
                     env=default_env(utc="2025-01-05T00:00:00Z"))
    code = compare.main(["--against-history", "3", str(slow), "--db", str(db), "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    slower = {(r["cell"], r["metric"]) for r in report["rows"] if r["verdict"] == "slower"}
    assert slower == {("ws4_overlap-on", "step_time_s"), ("ws4_overlap-on", "tokens_per_s")}
    assert {d["key"] for d in report["env_diff"]} >= {"git_commit"}


def test_against_history_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path, "20250101T000000Z_nightly")
    assert compare.main(["--against-history", "3", str(run), "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "history DB not found" in capsys.readouterr().err
    empty_db = tmp_path / "empty.sqlite"
    history.record_run(empty_db, write_run(tmp_path, "20250101T000000Z_other", cells=["ws2_overlap-on"]))
    assert compare.main(["--against-history", "3", str(run), "--db", str(empty_db)]) == 0
    assert "no recorded history" in capsys.readouterr().out


def test_history_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    assert history_cli.main(["--db", str(db), "list"]) == 0
    assert "no history DB" in capsys.readouterr().out
    runs = [write_run(tmp_path, f"2025010{d}T000000Z_nightly", scale=1 + d / 100, seed=d,
                      env=default_env(utc=f"2025-01-0{d}T00:00:00Z")) for d in (1, 2, 3)]
    assert history_cli.main(["record", *map(str, runs), "--db", str(db)]) == 0
    assert history_cli.main(["--db", str(db)]) == 0  # list is the default
    listing = capsys.readouterr().out
    assert all(r.name in listing for r in runs)
    out = tmp_path / "trends"
    assert history_cli.main(["--db", str(db), "plot", "--cell", "ws2_overlap-on", "--metric", "step_time_s", "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["trend_ws2_overlap-on_step_time_s.png"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.jsonl").write_text("not json\n")
    assert history_cli.main(["--db", str(db), "record", str(bad)]) == 2
    assert f"{bad / 'results.jsonl'}:1:" in capsys.readouterr().err
