"""The nightly's labels, on histories of run folders: interrupted and missing cells exit 3, an
open regression stays red until `history ack`, a canary or env.json change labels the others,
a straggler night is not a code regression, a loss change fails, a newer history DB is refused."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bench.cli.main import main
from bench.results import history
from bench.results.acks import acks
from bench.results.nightly import open_regressions
from tests.support.run_factory import CELLS, edit_records, make_record, write_nights

CELL = "ws2_overlap-on"


def judge(run: Path, db: Path, *extra: str) -> dict[str, Any]:
    code = main(["nightly", "--run", str(run), "--db", str(db), "--format", "json", *extra])
    doc = json.loads((run / "nightly.json").read_text())
    assert doc["exit_code"] == code
    return doc


def record(db: Path, runs: list[Path]) -> None:
    for run in runs:
        history.record_run(db, run)


def step_verdicts(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["cell"]: s for s in doc["series"] if s["metric"] == "step_time_s"}


def test_interrupted_or_missing_cells_exit_3_never_1(tmp_path: Path) -> None:
    runs, db = write_nights(tmp_path, [1.0] * 8), tmp_path / "h.sqlite"
    record(db, runs[:6])
    # night 7: the scheduler stopped a cell that was ok on every earlier night
    edit_records(runs[6], lambda r: r.update(status="interrupted", metrics=None) if r["cell"] == "ws4_overlap-on" else None)
    doc = judge(runs[6], db)
    assert doc["exit_code"] == 3 and doc["interrupted_cells"] == ["ws4_overlap-on"] and doc["failed_cells"] == []
    assert doc["regressions"] == 0 and not [s for s in doc["series"] if s["cell"] == "ws4_overlap-on"]
    assert "## Interrupted cells" in (runs[6] / "nightly.md").read_text()
    # night 8: the runner died before its last planned cell (cells.json still lists it)
    lines = (runs[7] / "results.jsonl").read_text().splitlines()
    (runs[7] / "results.jsonl").write_text("\n".join(l for l in lines if '"ws4_overlap-off"' not in l) + "\n")
    doc = judge(runs[7], db)
    assert doc["exit_code"] == 3 and doc["missing_cells"] == ["ws4_overlap-off"] and doc["interrupted_cells"] == []
    assert "## Missing cells" in (runs[7] / "nightly.md").read_text()


def _slower(cell: str, factor: float):  # type: ignore[no-untyped-def]
    def edit(record: dict[str, Any]) -> None:
        if record["cell"] == cell and record["status"] == "ok":
            samples = [s * factor for s in record["metrics"]["step_time_s"]["samples"]]
            record["metrics"] = make_record(record["run"], cell, samples)["metrics"]
    return edit


def test_an_open_regression_stays_open_on_a_night_its_cell_is_interrupted(tmp_path: Path) -> None:
    runs, db = write_nights(tmp_path, [1.0] * 11), tmp_path / "h.sqlite"
    for run in runs[7:]:
        edit_records(run, _slower(CELL, 1.2))
    edit_records(runs[10], lambda r: r.update(status="interrupted", metrics=None) if r["cell"] == CELL else None)
    record(db, runs[:10])
    doc = judge(runs[10], db)  # nothing tonight fixed it: still red, and the cell is listed as interrupted
    assert doc["exit_code"] == 1 and doc["interrupted_cells"] == [CELL]
    mine = step_verdicts(doc)[CELL]
    assert mine["value"] is None and mine["note"].startswith(f"not measured tonight; open since {runs[7].name}")


def test_open_regression_stays_red_until_acknowledged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, db = write_nights(tmp_path, [1.0] * 8 + [1.15] * 9 + [1.32] * 2), tmp_path / "h.sqlite"
    record(db, runs[:15])
    doc = judge(runs[15], db)  # 8 nights after the step: the news-for-3-nights rule had gone quiet by now
    assert doc["exit_code"] == 1
    mine = step_verdicts(doc)[CELL]
    assert mine["status"] == "regression" and mine["note"].startswith(f"open since {runs[8].name}, +1")
    assert 0.12 < mine["change"]["rel_change"] < 0.18 and len(mine["open"]) == 1
    assert f"open since {runs[8].name}" in (runs[15] / "nightly.md").read_text()

    capsys.readouterr()
    assert main(["history", "--db", str(db), "ack", CELL, "step_time_s", "--note", "new kernel, slower by design",
                 "--by", "alice"]) == 0
    assert f"acknowledged nightly {CELL} step_time_s at run {runs[15].name} by alice" in capsys.readouterr().out
    doc = judge(runs[15], db)
    assert doc["exit_code"] == 1 and step_verdicts(doc)[CELL]["status"] == "no change"  # the others stay open
    assert main(["history", "--db", str(db), "ack", "*", "*", "--note", "all of it", "--by", "bob"]) == 0
    assert judge(runs[15], db)["exit_code"] == 0
    assert judge(runs[16], db)["exit_code"] == 0  # the acknowledged level is the baseline

    record(db, runs[17:18])
    doc = judge(runs[18], db)  # a further 15% from the acknowledged level opens a new one
    assert doc["exit_code"] == 1 and step_verdicts(doc)[CELL]["change"]["start_run"] == runs[17].name
    first = acks(db, cell=CELL, metric="step_time_s")
    assert [(a.by, a.note, a.run_name) for a in first] == [("alice", "new kernel, slower by design", runs[15].name)]
    base = CELLS[CELL][2]
    assert first[0].level == pytest.approx(1.15 * base, rel=0.03) and first[0].before == pytest.approx(base, rel=0.03)
    assert {(o.cell, o.metric, o.change.start_run) for o in open_regressions(db, "nightly")
            if o.metric == "step_time_s"} == {(c, "step_time_s", runs[17].name) for c in CELLS}
    capsys.readouterr()
    assert main(["history", "--db", str(db), "acks", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == len(acks(db)) > len(CELLS)  # bob's covered every other open series
    assert {a["by"] for a in listed} == {"alice", "bob"}
    assert main(["history", "--db", str(db), "ack", "nope*", "*", "--note", "x"]) == 2
    assert "no recorded cell matches 'nope*'" in capsys.readouterr().err


def _collectives_canary(busbw: float):  # type: ignore[no-untyped-def]
    def edit(record: dict[str, Any]) -> None:
        if record["cell"] == "ws4_overlap-off":
            record["config"]["run"].update(canary=True, kind="collectives")
            record["metrics"] = {"collectives": {"avg_busbw_gbps": busbw, "wrong": 0}}
    return edit


def test_a_canary_move_or_a_new_driver_labels_the_other_changes(tmp_path: Path) -> None:
    scales = [1.0] * 8 + [1.15] * 2  # every cell 15% slower from night 9
    runs, db = write_nights(tmp_path / "canary", scales), tmp_path / "canary.sqlite"
    for night, run in enumerate(runs, start=1):
        edit_records(run, _collectives_canary(100.0 if night <= 8 else 88.0))
    record(db, runs[:9])
    doc = judge(runs[9], db)
    assert doc["exit_code"] == 3 and doc["regressions"] == 0 and doc["canaries"] == ["ws4_overlap-off"]
    assert doc["machine_changed"] == ["canary ws4_overlap-off busbw -12%"]
    assert doc["series"][0]["cell"] == "ws4_overlap-off"  # judged first
    slow = step_verdicts(doc)
    assert set(slow) == set(CELLS) - {"ws4_overlap-off"}
    assert {(s["status"], s["change"]["label"]) for s in slow.values()} == {
        ("machine change", "machine changed: canary ws4_overlap-off busbw -12%")}
    md = (runs[9] / "nightly.md").read_text()
    assert "**Machine changed tonight:** canary ws4_overlap-off busbw -12%" in md and "## Regressions" not in md

    # No canary: env.json tells it, a new driver and another second node from night 9 on.
    moved = {"driver": "560.35.03", "nodes": [{"hostname": "node07"}, {"hostname": "node01"}]}
    runs, db = write_nights(tmp_path / "driver", scales, env_of={9: moved, 10: moved}), tmp_path / "driver.sqlite"
    record(db, runs[:9])
    doc = judge(runs[9], db)
    assert doc["exit_code"] == 3 and doc["regressions"] == 0
    assert {s["change"]["label"] for s in step_verdicts(doc).values()} == {
        "machine changed: driver 550.54 -> 560.35.03; hostnames node01 -> node01,node07"}


def test_a_level_that_outlasts_its_machine_change_is_the_code(tmp_path: Path) -> None:
    """A cluster that hands out other nodes every night: the step up came with night 9's new
    second node, but night 10 ran on yet another one and stayed up, so it is the code's (the
    test above keeps its label: there the new driver and node stay)."""
    scales = [1.0] * 8 + [1.15] * 2
    hosts = {9: {"nodes": [{"hostname": "node01"}, {"hostname": "node07"}]},
             10: {"nodes": [{"hostname": "node01"}, {"hostname": "node12"}]}}
    runs, db = write_nights(tmp_path / "rotating", scales, env_of=hosts), tmp_path / "rotating.sqlite"
    record(db, runs[:8])
    assert judge(runs[8], db)["exit_code"] == 0  # one night up: not yet a change (it needs a second)
    night10 = judge(runs[9], db)
    assert night10["exit_code"] == 1 and set(step_verdicts(night10)) == set(CELLS)
    assert {(s["status"], s["change"]["label"], s["change"]["start_run"]) for s in step_verdicts(night10).values()} \
        == {("regression", "", runs[8].name)}


NEW_DRIVER = {"driver": "560.35.03"}
NEW_NODE = {"nodes": [{"hostname": "node01"}, {"hostname": "node07"}]}


@pytest.mark.parametrize("moved, night11, label", [
    (NEW_DRIVER, {"driver": "565.57"}, "machine changed: driver 550.54 -> 560.35.03"),  # another upgrade, not back
    (NEW_NODE, {"nodes": [{"hostname": "node07"}, {"hostname": "node12"}]},  # the node that came in is still there
     "machine changed: hostnames node01 -> node01,node07")])
def test_a_machine_change_keeps_its_label_while_what_changed_stays(tmp_path: Path, moved: dict[str, Any],
                                                                    night11: dict[str, Any], label: str) -> None:
    env_of = {9: moved, 10: moved, 11: night11}
    runs, db = write_nights(tmp_path, [1.0] * 8 + [1.15] * 3, env_of=env_of), tmp_path / "h.sqlite"
    record(db, runs[:10])
    doc = judge(runs[10], db)
    assert doc["exit_code"] == 3 and doc["regressions"] == 0
    assert {(s["status"], s["change"]["label"]) for s in step_verdicts(doc).values()} == {("machine change", label)}


def _straggler(night: int, lag: float, slowed: bool):  # type: ignore[no-untyped-def]
    def edit(record: dict[str, Any]) -> None:
        if record["cell"] != "ws4_overlap-on":
            return
        if slowed:  # rank 5 drags every step of the cell: the max over ranks is 20% up
            samples = [s * 1.2 for s in record["metrics"]["step_time_s"]["samples"]]
            record["metrics"] = make_record(record["run"], record["cell"], samples)["metrics"]
        named = [{"rank": 5, "node": 0, "lag_pct": lag}] if lag > 5.0 else []
        record["metrics"]["straggler"] = {"threshold_pct": 5.0, "figure": "compute_s", "slowest":
                                          {"rank": 5, "node": 0, "lag_pct": lag}, "stragglers": named,
                                          "node_stragglers": []}
    return edit


def test_a_straggler_night_is_labelled_not_a_code_regression(tmp_path: Path) -> None:
    runs, db = write_nights(tmp_path, [1.0] * 10), tmp_path / "h.sqlite"
    for night, run in enumerate(runs, start=1):
        slow = night >= 9  # a GPU throttled on the last two nights
        edit_records(run, _straggler(night, 19.5 if slow else 1.2, slow))
    record(db, runs[:9])
    doc = judge(runs[9], db)
    mine = step_verdicts(doc)["ws4_overlap-on"]
    assert doc["exit_code"] == 3 and doc["regressions"] == 0 and mine["status"] == "straggler"
    assert mine["change"]["label"] == "straggler rank 5 (node 0), lag 19.5%" and mine["change"]["cause"] == "straggler"
    md = (runs[9] / "nightly.md").read_text()
    assert "## Straggler nights" in md
    assert "| ws4_overlap-on | rank 5 (node 0) +19.5% straggler | 5.0% |" in md  # i19a's slowest-rank line
    (labelled,) = [o for o in open_regressions(db, "nightly") if o.metric == "step_time_s"]  # from the DB alone
    assert labelled.change.label == f"straggler rank 5 (node 0), lag 19.5% on {runs[9].name}"
    for run in runs[8:]:  # the same slowdown with no straggler named: the code
        edit_records(run, lambda r: r["metrics"]["straggler"].update(stragglers=[]) if r["cell"] == "ws4_overlap-on" else None)
        history.record_run(db, run)
    doc = judge(runs[9], db)
    assert doc["exit_code"] == 1 and step_verdicts(doc)["ws4_overlap-on"]["status"] == "regression"


def test_one_straggler_night_is_labelled_and_not_judged(tmp_path: Path) -> None:
    """Only tonight names a straggler (20% slower): too soon for a change point, yet tonight's
    timings are the straggler's, so they are labelled, and the night is not judged complete."""
    runs, db = write_nights(tmp_path, [1.0] * 10), tmp_path / "h.sqlite"
    for night, run in enumerate(runs, start=1):
        edit_records(run, _straggler(night, 19.5 if night == 10 else 1.2, night == 10))
    record(db, runs[:9])
    doc = judge(runs[9], db)
    mine = {v["metric"]: v for v in doc["series"] if v["cell"] == "ws4_overlap-on"}
    assert doc["exit_code"] == 3 and doc["regressions"] == 0
    assert mine["step_time_s"]["status"] == "straggler"
    assert mine["step_time_s"]["note"] == "straggler rank 5 (node 0), lag 19.5% tonight: tonight's value is not judged as the code"
    assert mine["peak_memory_bytes"]["status"] == "no change"  # a slow rank moves timings, not memory
    assert all(v["status"] == "no change" for v in doc["series"] if v["cell"] != "ws4_overlap-on" and v["check"] != "exact")


def _loss(curve: list[float], seed: int | None = None):  # type: ignore[no-untyped-def]
    def edit(record: dict[str, Any]) -> None:
        if record["cell"] == CELL:
            record["metrics"]["loss"] = curve
            if seed is not None:
                record["config"]["data"] = {**record["config"]["data"], "seed": seed}
    return edit


def test_a_loss_change_fails_the_nightly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, db = write_nights(tmp_path, [1.0] * 6), tmp_path / "h.sqlite"
    curve = [10.4 - 0.1 * i for i in range(10)]
    edit_records(runs[1], _loss([c * (1 + 1e-5) for c in curve]))  # within float32's 1e-4
    changed = curve[:2] + [c * (1 + 1e-3) for c in curve[2:]]  # step 3 on: a numerics change
    for run in runs[3:5]:
        edit_records(run, _loss(changed))
    edit_records(runs[5], _loss(changed, seed=7))
    assert judge(runs[0], db)["exit_code"] == 3
    record(db, runs[1:3])
    doc = judge(runs[3], db)  # too little history for timings, yet a wrong loss is wrong
    (loss,) = [s for s in doc["series"] if s["metric"] == "loss" and s["cell"] == CELL]
    assert doc["exit_code"] == 1 and loss["status"] == "regression" and loss["check"] == "loss curve"
    assert loss["note"].startswith("loss changed at step 3: 10.2 -> 10.2102 (relative 1.0e-03 > 0.0001, float32)")
    assert {s["status"] for s in doc["series"] if s["metric"] == "loss" and s["cell"] != CELL} == {"no change"}
    doc = judge(runs[4], db)
    (loss,) = [s for s in doc["series"] if s["metric"] == "loss" and s["cell"] == CELL]
    assert doc["exit_code"] == 1 and loss["change"]["start_run"] == runs[3].name
    assert main(["history", "--db", str(db), "ack", CELL, "loss", "--note", "new reduction order"]) == 0
    assert judge(runs[4], db)["exit_code"] == 3  # the acknowledged curve is the reference now
    doc = judge(runs[5], db)  # another seed: another curve, not compared
    (loss,) = [s for s in doc["series"] if s["metric"] == "loss" and s["cell"] == CELL]
    assert loss["status"] == "too little history" and "same config and seed" in loss["note"]


def test_a_history_newer_than_the_code_is_refused_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run,) = write_nights(tmp_path, [1.0])
    db = tmp_path / "h.sqlite"
    history.record_run(db, run)
    newer = history.SCHEMA_VERSION + 5
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()
    before = db.read_bytes()
    for argv in (["history", "--db", str(db), "list"], ["history", "--db", str(db), "record", str(run)],
                 ["history", "--db", str(db), "ack", "*", "*", "--note", "x"],
                 ["nightly", "--run", str(run), "--db", str(db)],
                 ["compare", "--against-history", "3", str(run), "--db", str(db)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"schema version {newer} is newer than this code's version {history.SCHEMA_VERSION}" in err, argv
    assert db.read_bytes() == before
