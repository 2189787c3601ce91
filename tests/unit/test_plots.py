"""plots: the PNGs are written, valid, and say when the breakdown is missing."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
from tests.support.run_factory import write_run

from bench.results import plots
from bench.results.history import history_points, record_run
from bench.results.records import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 0 and pixels.shape[1] > 0


def test_write_run_plots(tmp_path: Path) -> None:
    run = write_run(tmp_path, "20250101T000000Z_nightly")
    paths = plots.write_run_plots(run)
    assert [p.name for p in paths] == ["step_time.png", "time_breakdown.png", "scaling.png"]
    for path in paths:
        assert path.parent == run / "plots"
        _assert_png(path)


def test_breakdown_falls_back_to_step_time(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, "r", breakdown=False))
    run.records = {c: r for c, r in run.records.items() if c.startswith("ws2")}
    for rec in run.records.values():
        del rec["metrics"]["exposed_comm_s"]
    fig = plots.breakdown_figure(run)
    assert fig is not None and "no compute/communication breakdown" in fig.axes[0].get_title()
    assert plots.scaling_figure(run) is None  # one world size: nothing to scale


def test_breakdown_parts_add_up(tmp_path: Path) -> None:
    rec = load_run(write_run(tmp_path, "r", cells=["ws2_overlap-off"])).records["ws2_overlap-off"]
    compute, exposed, other = plots.time_breakdown(rec)
    step = rec["metrics"]["step_time_s"]["median"]
    assert compute == step * 0.7 and exposed == 0.06 and abs(compute + exposed + other - step) < 1e-12


def test_trend_plot(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    for day in (1, 2):
        record_run(db, write_run(tmp_path, f"2025010{day}T000000Z_nightly", scale=1 + day / 10, seed=day))
    points = history_points(db, "ws4_overlap-on", "peak_memory_bytes")
    path = plots.plot_trend(points, {}, {}, "ws4_overlap-on", "peak_memory_bytes", tmp_path / "out", "bytes")
    _assert_png(path)
