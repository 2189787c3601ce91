"""Which charting library the dashboard uses, by measurement: `python -m bench.dashboard.libcompare OUT`.

Builds the same two pages with each candidate, from its pip package's own JavaScript:
- `cell`: a cell page, 6 trend charts of 365 nights each, the first with its p10-p90 band;
- `stress`: one chart of 50 series x 365 nights (every cell of a big nightly matrix at once);
then opens each from file:// in headless Chromium (bench/dashboard/measure.py) and reports
page weight (the HTML plus the script it loads), the load event and the time to the first and
to every chart drawn (performance.now(), from navigation start), and writes a screenshot of
each page for judging readability. Needs the `chart-compare` extra (bokeh, altair, vl-convert-python)
beside plotly. The figures and the choice are in docs/dashboard.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

from bench.dashboard.browser import Browser
from bench.dashboard.measure import median_timing, timed_visit, weight

NIGHTS, SERIES, CHARTS = 365, 50, 6
# Charts are drawn one after another, each after the previous one reached the screen (the next
# animation frame), as a page that shows its first chart early would; each is timed then.
DONE_JS = ("window.__charts=[];function done(){return new Promise(r=>requestAnimationFrame(()=>"
           "{window.__charts.push(performance.now());r()}))}")


def series(seed: int, n: int = NIGHTS) -> list[float]:
    """A noisy nightly step time with one 15% step, as a real history has."""
    rng = random.Random(seed)
    base = 0.2 + 0.01 * seed
    return [base * (1.15 if i > n * 0.6 else 1.0) * (1 + rng.gauss(0, 0.02)) for i in range(n)]


def band(values: list[float]) -> tuple[list[float], list[float]]:
    return [v * 0.97 for v in values], [v * 1.04 for v in values]


def dates(n: int = NIGHTS) -> list[str]:
    first = datetime.datetime(2026, 1, 1, 2, 0)
    return [(first + datetime.timedelta(days=i)).isoformat() for i in range(n)]


def write_page(out: Path, name: str, script: str, draw: str, payloads: list[dict], div_style: str = "") -> Path:
    """A page loading `script` and drawing each payload into its own div; `draw(P[i], 'c'+i)` is
    the library's call, awaited before the next chart starts."""
    divs = "".join(f"<div id='c{i}' style='{div_style}'></div>" for i in range(len(payloads)))
    calls = f"(async()=>{{for(let i=0;i<__P.length;i++){{await {draw};await done()}}}})()"
    path = out / f"{name}.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><script src='{script}'></script>"
                    f"<script>{DONE_JS}</script></head><body>{divs}<script>const __P={json.dumps(payloads)};"
                    f"{calls}</script></body></html>")
    return path


def plotly_pages(out: Path) -> dict[str, Path]:
    from plotly.offline import get_plotlyjs

    (out / "plotly.min.js").write_text(get_plotlyjs())
    x = dates()

    def fig(traces: list[dict], title: str) -> dict:
        return {"data": traces, "layout": {"title": {"text": title}, "height": 320, "hovermode": "closest",
                                           "margin": {"t": 40, "b": 40, "l": 60, "r": 20}}}

    cell = []
    for c in range(CHARTS):
        y = series(c)
        traces = [{"x": x, "y": y, "mode": "lines+markers", "name": "median", "type": "scatter"}]
        if c == 0:
            lo, hi = band(y)
            traces = [{"x": x, "y": lo, "line": {"width": 0}, "showlegend": False, "type": "scatter"},
                      {"x": x, "y": hi, "fill": "tonexty", "line": {"width": 0}, "name": "p10-p90",
                       "type": "scatter"}, *traces]
        cell.append(fig(traces, f"metric {c}"))
    stress = [fig([{"x": x, "y": series(s), "mode": "lines", "name": f"cell{s:02d}", "type": "scattergl"}
                   for s in range(SERIES)], "50 series")]
    draw = "Plotly.newPlot('c'+i,__P[i].data,__P[i].layout)"
    return {name: write_page(out, f"plotly_{name}", "plotly.min.js", draw, figs)
            for name, figs in (("cell", cell), ("stress", stress))}


def bokeh_pages(out: Path) -> dict[str, Path]:
    from bokeh.embed import json_item
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.palettes import Category20
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    (out / "bokeh.min.js").write_text(INLINE.js_raw[0])  # bokeh core; widgets/tables/mathjax are not needed
    x = [datetime.datetime.fromisoformat(d) for d in dates()]

    def chart(title: str) -> figure:
        p = figure(title=title, height=320, sizing_mode="stretch_width", x_axis_type="datetime",
                   tools="pan,wheel_zoom,box_zoom,reset")
        p.add_tools(HoverTool(tooltips=[("night", "@x{%F}"), ("value", "@y")], formatters={"@x": "datetime"}))
        return p

    cell = []
    for c in range(CHARTS):
        p, y = chart(f"metric {c}"), series(c)
        if c == 0:
            lo, hi = band(y)
            p.varea(x=x, y1=lo, y2=hi, alpha=0.3, legend_label="p10-p90")
        src = ColumnDataSource({"x": x, "y": y})
        p.line("x", "y", source=src, legend_label="median")
        p.scatter("x", "y", source=src, size=4)
        cell.append(json_item(p))
    p = chart("50 series")
    for s in range(SERIES):
        p.line(x, series(s), legend_label=f"cell{s:02d}", color=Category20[20][s % 20])
    p.add_layout(p.legend[0], "right")
    p.legend.click_policy = "hide"
    draw = "Bokeh.embed.embed_item(__P[i],'c'+i)"
    return {name: write_page(out, f"bokeh_{name}", "bokeh.min.js", draw, items)
            for name, items in (("cell", cell), ("stress", [json_item(p)]))}


def vega_pages(out: Path) -> dict[str, Path]:
    import altair as alt
    import vl_convert as vlc

    (out / "vega.js").write_text(vlc.javascript_bundle())
    x = dates()

    def rows(s: int) -> list[dict]:
        y = series(s)
        lo, hi = band(y)
        return [{"night": d, "value": v, "lo": a, "hi": b, "series": f"cell{s:02d}"} for d, v, a, b in zip(x, y, lo, hi)]

    cell = []
    for c in range(CHARTS):
        data = alt.Data(values=rows(c))
        line = alt.Chart(data).mark_line(point=True).encode(x="night:T", y=alt.Y("value:Q", scale=alt.Scale(zero=False)),
                                                            tooltip=["night:T", "value:Q"])
        chart = (alt.Chart(data).mark_area(opacity=0.3).encode(x="night:T", y="lo:Q", y2="hi:Q") + line) if c == 0 else line
        cell.append(chart.properties(width="container", height=280, title=f"metric {c}").to_dict())
    stress_rows = [r for s in range(SERIES) for r in rows(s)]
    pick = alt.selection_point(fields=["series"], bind="legend")
    stress = alt.Chart(alt.Data(values=stress_rows)).mark_line().encode(
        x="night:T", y=alt.Y("value:Q", scale=alt.Scale(zero=False)), color="series:N",
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.1)), tooltip=["series:N", "night:T", "value:Q"]
    ).add_params(pick).properties(width="container", height=280, title="50 series").to_dict()
    draw = "vegaEmbed('#c'+i,__P[i],{renderer:'canvas'})"
    return {name: write_page(out, f"vega_{name}", "vega.js", draw, specs, "width:95%")
            for name, specs in (("cell", cell), ("stress", [stress]))}


BUILDERS: dict[str, Callable[[Path], dict[str, Path]]] = {
    "plotly": plotly_pages, "vega-lite (altair)": vega_pages, "bokeh": bokeh_pages}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard.libcompare", description=__doc__)
    p.add_argument("out", type=Path, help="folder for the candidate pages and their screenshots")
    p.add_argument("--repeat", type=int, default=3, help="loads per page; the median is reported")
    args = p.parse_args(argv)
    rows = []
    with Browser(timeout_s=120) as browser:
        for lib, build in BUILDERS.items():
            folder = args.out / lib.split()[0]
            folder.mkdir(parents=True, exist_ok=True)
            for name, html in build(folder).items():
                charts = CHARTS if name == "cell" else 1
                timed_visit(browser, html, charts, folder / f"{name}.png")  # the screenshot, and a first load
                t = median_timing(browser, html, charts, args.repeat)
                rows.append((lib, name, weight(html), t.first_chart_ms, t.all_charts_ms, t.load_ms))
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| library | page | weight (MiB) | load event (ms) | first chart (ms) | all charts (ms) |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for lib, name, size, first, every, load in rows:
        print(f"| {lib} | {name} | {size / 2**20:.2f} | {load:.0f} | {first:.0f} | {every:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
