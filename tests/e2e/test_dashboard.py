"""The dashboard in a real headless Chromium, opened from file://.

A history of 12 nights of 4 cells, one of which slows down 25% from night 7, each judged by
`run_bench.py nightly --run` (a change stays news for 6 runs); the last one refreshes the site with --dashboard. Every page must
load with no console error and no request beyond file:// (inline data: icons are local), the
slowed cell's step-time chart must hold one point per night and its change point at night 7,
and hovering a point must show its run, commit, date and value. Screenshots go to the test's
temporary folder (and to ISP_BENCH_SHOTS when set).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from bench.cli.main import main
from bench.dashboard.browser import Browser, BrowserError, Page, beyond_local, find_chromium
from bench.results.changepoint import DetectorSettings
from bench.results.nightly import detect_all
from tests.support.run_factory import CELLS, default_env, write_run

NIGHTS, SLOW_FROM, SLOW = 12, 7, "ws2_overlap-on"
pytestmark = pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("history")
    db, out, rng = root / "h.sqlite", root / "site", random.Random(0)
    runs = []
    for day in range(1, NIGHTS + 1):
        scale = {c: 1.0 + rng.gauss(0, 0.01) for c in CELLS}
        if day >= SLOW_FROM:
            scale[SLOW] *= 1.25
        runs.append(write_run(root, f"202501{day:02d}T000000Z_nightly", scale=scale, seed=10 * day,
                              env=default_env(utc=f"2025-01-{day:02d}T00:00:00Z", git_commit=f"{day % 10}" * 40)))
    judge = ["--db", str(db), "--recent", str(NIGHTS - SLOW_FROM + 1)]  # the slowdown is still news on the last night
    for run in runs[:-1]:
        assert main(["nightly", "--run", str(run), *judge, "--format", "json"]) in (0, 1, 3)
    assert main(["nightly", "--run", str(runs[-1]), *judge, "--dashboard", str(out)]) == 1
    shots = Path(os.environ.get("ISP_BENCH_SHOTS") or root / "shots")
    return {"db": db, "out": out, "runs": runs, "shots": shots}


@pytest.fixture(scope="module")
def browser() -> Any:
    try:
        b = Browser(timeout_s=60).__enter__()
    except BrowserError as exc:  # installed but cannot start here (a missing library, no /dev/shm...)
        pytest.skip(f"chromium cannot start: {exc}")
    yield b
    b.__exit__()


def visit(browser: Browser, path: Path, charts: int = 0) -> Page:
    page = browser.new_page()
    log = page.goto(path.resolve().as_uri())
    if charts:
        page.wait_for(f"window.__charts && window.__charts.length >= {charts}")
    assert log.errors == [] and beyond_local(log.requests) == []
    assert all(u.startswith(("file://", "data:")) for u in log.requests)
    return page


def test_index_lists_every_cell_with_status_verdict_and_the_open_regression(site: dict, browser: Browser) -> None:
    page = visit(browser, site["out"] / "index.html")
    rows = json.loads(page.evaluate(
        "JSON.stringify([...document.querySelectorAll('h3 + table tr')].map(r => [...r.cells].map(c => c.innerText)))"))
    cells = {r[0]: r for r in rows if r and r[0] in CELLS}
    assert set(cells) == set(CELLS)
    assert all(r[1] == "ok" for r in cells.values())
    assert cells[SLOW][2] == "regression" and {cells[c][2] for c in CELLS if c != SLOW} == {"no change"}
    opened = [r for r in rows if r and r[0] == SLOW and len(r) == 4]  # cell, metric, since run, change
    assert any(r[1] == "step_time_s" and r[2] == site["runs"][SLOW_FROM - 1].name for r in opened)
    page.screenshot(site["shots"] / "index.png")
    page.close()


def test_cell_chart_has_one_point_per_night_and_its_change_point(site: dict, browser: Browser) -> None:
    page = visit(browser, site["out"] / "cells" / "nightly" / f"{SLOW}.html", charts=1)
    js = ("JSON.stringify(Object.fromEntries(['points', 'changes'].map(k => { const m = Bokeh.documents[0]"
          ".get_model_by_name(k + ':step_time_s'); return [k, m ? Array.from(m.data_source.data.x) : null]; })))")
    found = json.loads(page.evaluate(js))
    assert len(found["points"]) == NIGHTS  # one point per recorded night
    expected = [f for f in detect_all(site["db"], DetectorSettings())
                if f["cell"] == SLOW and f["metric"] == "step_time_s"]
    assert [f["start_run"] for f in expected] == [site["runs"][SLOW_FROM - 1].name]
    assert found["changes"] == [found["points"][SLOW_FROM - 1]]  # marked at night 7
    tip = hover(page, "step_time_s", 2)
    night3 = site["runs"][2].name
    assert f"run:\t{night3}" in tip and "commit:\t333333333333" in tip and "2025-01-03" in tip and " ms" in tip
    page.screenshot(site["shots"] / "cell.png")
    page.close()


def hover(page: Page, metric: str, index: int) -> str:
    """Move the mouse onto point `index` of a chart and return the tooltip's text."""
    where = json.loads(page.evaluate(f"""(() => {{
      const find = v => v.model.name == 'chart:{metric}' ? v : (v.child_views || []).map(find).find(Boolean);
      const v = Object.values(Bokeh.index).map(find).find(Boolean);
      v.el.scrollIntoView();
      const d = v.model.document.get_model_by_name('source:{metric}').data;
      const c = v.canvas_view.el.getBoundingClientRect();
      return JSON.stringify({{x: c.left + v.frame.x_scale.compute(d.x[{index}]), y: c.top + v.frame.y_scale.compute(d.y[{index}])}});
    }})()"""))
    page.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": where["x"], "y": where["y"]})
    return page.wait_for("""(() => { let text = ''; const walk = n => { if (n.shadowRoot) walk(n.shadowRoot);
        for (const c of n.children || []) walk(c);
        if (n.classList && [...n.classList].some(k => k.startsWith('bk-tooltip-content'))) text += n.innerText; };
      walk(document.body); return text; })()""", timeout_s=10)


def test_run_page_has_summary_changes_and_verdict(site: dict, browser: Browser) -> None:
    run = site["runs"][-1]
    (path,) = (site["out"] / "runs").glob(f"*-{run.name}.html")
    page = visit(browser, path)
    text = page.evaluate("document.body.innerText")
    assert "exit code 1: a regression" in text and SLOW in text
    assert "git_commit" in text and "1111111111" in text and "2222222222" in text  # what changed since night 11
    assert page.evaluate("document.querySelectorAll('table').length") >= 3  # verdict, summary, env diff
    page.screenshot(site["shots"] / "run.png")
    page.close()


def test_measure_reports_weight_and_load_time(site: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.dashboard import measure

    assert measure.main([str(site["out"]), "--repeat", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    by = {r[0].strip(): [c.strip() for c in r] for r in rows[2:]}  # after the header and its rule
    assert set(by) == {"index", "cell", "run"}
    bokeh_kib = (site["out"] / "assets" / "bokeh.min.js").stat().st_size / 1024
    assert float(by["cell"][2].replace(",", "")) > bokeh_kib  # the page and the script it loads
    assert float(by["cell"][4]) > 0 and by["index"][4] == "-"  # a first chart only where there are charts
