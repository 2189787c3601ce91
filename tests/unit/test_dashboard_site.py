"""The dashboard's site without a browser: what it refuses, what it reads, how marks are drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli.main import main
from bench.dashboard.charts import RunAxis, trend_figure
from bench.dashboard.judgements import Mark
from bench.dashboard.model import TRENDS, Point, Series, read_site
from bench.results import history
from tests.support.run_factory import default_env, write_run


def nights(root: Path, n: int, edit=None) -> list[Path]:  # type: ignore[no-untyped-def]
    runs = []
    for day in range(1, n + 1):
        run = write_run(root, f"202502{day:02d}T000000Z_nightly", seed=day,
                        env=default_env(utc=f"2025-02-{day:02d}T00:00:00Z"))
        if edit:
            path = run / "results.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines()]
            for r in records:
                edit(r, day)
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(run)
    return runs


def test_a_folder_it_did_not_write_is_refused_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    (run,) = nights(tmp_path, 1)
    history.record_run(db, run)
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "keep.jpg").write_text("x")
    assert main(["dashboard", "--db", str(db), "--out", str(mine)]) == 2
    assert "is not a dashboard" in capsys.readouterr().err and (mine / "keep.jpg").read_text() == "x"
    assert main(["dashboard", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "site")]) == 2
    assert "history DB not found" in capsys.readouterr().err and not (tmp_path / "site").exists()
    # nightly refuses it before judging anything: no nightly.json, nothing recorded
    assert main(["nightly", "--run", str(run), "--db", str(tmp_path / "n.sqlite"), "--dashboard", str(mine)]) == 2
    assert not (run / "nightly.json").exists() and not (tmp_path / "n.sqlite").exists()
    # a folder it wrote is replaced whole on the next build
    site = tmp_path / "site"
    assert main(["dashboard", "--db", str(db), "--out", str(site)]) == 0
    (site / "stale.html").write_text("old")
    assert main(["dashboard", "--db", str(db), "--out", str(site)]) == 0
    assert not (site / "stale.html").exists() and (site / "assets" / "bokeh.min.js").stat().st_size > 100_000


def test_plan_error_is_one_more_trend_when_records_carry_it(tmp_path: Path) -> None:
    def plan(record: dict, day: int) -> None:
        record["metrics"]["plan"] = {"available": True, "hardware": "h100",
                                     "step_time_s": {"predicted": 0.2, "measured": 0.21, "rel_error": 0.05 * day}}

    db = tmp_path / "h.sqlite"
    for run in nights(tmp_path, 3, plan):
        history.record_run(db, run)
    (config,) = read_site(db)
    series = {s.metric: s for s in config.cells[0].series}
    assert [p.value for p in series["plan.step_time_s.rel_error"].points] == pytest.approx([0.05, 0.10, 0.15])
    assert "plan.peak_memory_bytes.rel_error" not in series  # charted only when recorded
    assert len(series["step_time_s"].points) == 3 and series["step_time_s"].points[0].lo is not None


def test_a_collectives_canary_is_charted_by_its_bus_bandwidth_alone(tmp_path: Path) -> None:
    def canary(record: dict, day: int) -> None:
        if record["cell"] == "ws4_overlap-off":  # a nightly's collectives canary (configs/gpu-nightly-8.yaml)
            record["config"]["run"].update(canary=True, kind="collectives")
            record["metrics"] = {"collectives": {"avg_busbw_gbps": 100.0 + day, "wrong": 0}}

    db = tmp_path / "h.sqlite"
    for run in nights(tmp_path, 3, canary):
        history.record_run(db, run)
    (config,) = read_site(db)
    cells = {c.cell: c for c in config.cells}
    probe = cells["ws4_overlap-off"]
    assert [(s.metric, [p.value for p in s.points]) for s in probe.series] == [
        ("collectives.avg_busbw_gbps", [101.0, 102.0, 103.0])]  # no empty training charts
    trained = {s.metric for s in cells["ws4_overlap-on"].series}
    assert "step_time_s" in trained and "collectives.avg_busbw_gbps" not in trained


def test_acknowledged_changes_and_change_points_are_drawn_where_they_start() -> None:
    points = [Point(i, f"run{i}", f"2025-03-{i + 1:02d}T00:00:00", "c" * 40, 0.2 + 0.05 * (i >= 3), 0.19, 0.3)
              for i in range(6)]
    series = Series(TRENDS[0], "step_time_s", points, changes=[Mark(3, "run3", "regression", "+25%")],
                    acks=[Mark(3, "run3", "acknowledged", "by ana: new kernel")])
    fig = trend_figure(series, RunAxis({i: 10 + i for i in range(6)}, {}), {})
    (points_glyph,) = [r for r in fig.renderers if r.name == "points:step_time_s"]
    for name in ("changes", "acks"):
        (glyph,) = [r for r in fig.renderers if r.name == f"{name}:step_time_s"]
        assert list(glyph.data_source.data["x"]) == [13]  # at the run the change starts
    assert len(points_glyph.data_source.data["y"]) == 6 and points_glyph.data_source.data["y"][0] == pytest.approx(200)
    hover = [t for t in fig.tools if getattr(t, "renderers", None) == [points_glyph]]
    assert [name for name, _ in hover[0].tooltips] == ["run", "commit", "date", "value"]
