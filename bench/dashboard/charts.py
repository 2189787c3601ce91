"""One interactive Bokeh trend chart per (cell, metric), as a JSON item the page embeds.

Bokeh was chosen by measurement (docs/dashboard.md). Its JavaScript is copied from the
installed bokeh package (bokehjs_path), so the Python and JavaScript versions always match
and no page loads anything from a CDN. Models carry names the browser tests look up:
`points:METRIC` (one point per recorded night), `changes:METRIC`, `acks:METRIC`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bokeh.embed import json_item
from bokeh.layouts import gridplot
from bokeh.models import AdaptiveTicker, ColumnDataSource, HoverTool, NumeralTickFormatter, OpenURL, Span, TapTool
from bokeh.plotting import figure
from bokeh.util.paths import bokehjs_path

from bench.dashboard.judgements import Mark
from bench.dashboard.model import Series

BOKEH_JS = "bokeh.min.js"
COLORS = {"regression": "#c62828", "improvement": "#2e7d32", "acknowledged": "#6a1b9a"}
TOOLTIPS = [("run", "@run"), ("commit", "@commit"), ("date", "@date"), ("value", "@label")]


def copy_bokeh_js(assets: Path) -> Path:
    """The installed bokeh's own bokeh.min.js into the site's assets folder."""
    assets.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(bokehjs_path() / "js" / BOKEH_JS, assets / BOKEH_JS))


@dataclass(frozen=True)
class RunAxis:
    """x is the run's place among its configuration's runs, so nights are evenly spaced (five runs
    on one afternoon do not pile up at one date) and every chart of a page shares the same x."""
    position: dict[int, int]  # run id -> x
    labels: dict[int, str]  # x -> tick label (the run's date)

    @classmethod
    def of(cls, runs: list[dict[str, Any]]) -> RunAxis:
        labels = {i: "" for i in range(-3, len(runs) + 3)}  # ticks in the padding name no run
        labels.update({i: (r["utc"] or "")[:10] for i, r in enumerate(runs)})
        return cls({r["id"]: i for i, r in enumerate(runs)}, labels)


def label(value: float, series: Series) -> str:
    return f"{value * series.trend.scale:.4g} {series.trend.unit}"


def _source(series: Series, axis: RunAxis, run_pages: dict[int, str]) -> ColumnDataSource:
    pts = series.points
    scale = series.trend.scale
    data: dict[str, list[Any]] = {
        "x": [axis.position[p.run_id] for p in pts], "y": [p.value * scale for p in pts], "run": [p.run for p in pts],
        "commit": [p.commit[:12] or "unknown" for p in pts], "date": [p.utc for p in pts],
        "label": [label(p.value, series) for p in pts], "page": [run_pages.get(p.run_id, "") for p in pts],
    }
    if series.trend.band:
        data["lo"] = [p.lo * scale if p.lo is not None else p.value * scale for p in pts]
        data["hi"] = [p.hi * scale if p.hi is not None else p.value * scale for p in pts]
    return ColumnDataSource(data, name=f"source:{series.metric}")


def _marks(fig: Any, series: Series, axis: RunAxis, marks: list[Mark], name: str) -> None:
    """A dashed line at the first run of each change, and a hoverable marker on its point."""
    if not marks:
        return
    pts = series.points
    xs = [axis.position[pts[m.index].run_id] for m in marks]
    for x, m in zip(xs, marks):
        fig.add_layout(Span(location=x, dimension="height", line_color=COLORS.get(m.kind, "#555"),
                            line_dash="dashed" if m.kind != "acknowledged" else "dotted", line_width=2))
    src = ColumnDataSource({"x": xs, "y": [pts[m.index].value * series.trend.scale for m in marks],
                            "text": [m.text for m in marks], "run": [m.run for m in marks],
                            "color": [COLORS.get(m.kind, "#555") for m in marks]}, name=f"{name}-source:{series.metric}")
    glyph = fig.scatter("x", "y", source=src, marker="triangle" if name == "changes" else "diamond", size=14,
                        color="color", legend_label="change point" if name == "changes" else "acknowledged",
                        name=f"{name}:{series.metric}")
    fig.add_tools(HoverTool(renderers=[glyph], tooltips=[("run", "@run"), ("", "@text")]))


def trend_figure(series: Series, axis: RunAxis, run_pages: dict[int, str], x_range: Any = None) -> Any:
    """The chart of one series; charts of one page share `x_range`, so zooming one zooms all."""
    unit = series.trend.unit
    extra = {"x_range": x_range} if x_range is not None else {}
    fig = figure(title=series.trend.title, height=240, sizing_mode="stretch_width",
                 tools="pan,xwheel_zoom,box_zoom,reset,save", x_axis_label="run (start date)",
                 y_axis_label=unit, name=f"chart:{series.metric}", **extra)
    fig.yaxis.formatter = NumeralTickFormatter(format="0,0.[000]")  # 160,000 rather than 1.600e+5
    fig.xaxis.ticker = AdaptiveTicker(min_interval=1, mantissas=[1, 2, 5])  # whole runs only
    fig.xaxis.major_label_overrides = axis.labels
    src = _source(series, axis, run_pages)
    if series.trend.band:
        fig.varea("x", y1="lo", y2="hi", source=src, fill_alpha=0.25, fill_color="#1565c0", legend_label="p10-p90")
    fig.line("x", "y", source=src, line_width=2, color="#1565c0")
    legend = {"legend_label": "median"} if series.trend.band else {}  # a lone series needs no legend
    size = 7 if len(series.points) <= 60 else 4  # a year of nights stays a line, not a ribbon of dots
    points = fig.scatter("x", "y", source=src, size=size, color="#1565c0", name=f"points:{series.metric}", **legend)
    fig.add_tools(HoverTool(renderers=[points], tooltips=TOOLTIPS), TapTool(renderers=[points], callback=OpenURL(url="@page")))
    _marks(fig, series, axis, series.changes, "changes")
    _marks(fig, series, axis, series.acks, "acks")
    if fig.legend:
        fig.add_layout(fig.legend[0], "right")  # beside the plot, never over the points
        fig.legend.click_policy = "hide"
    return fig


def cell_item(series: list[Series], axis: RunAxis, run_pages: dict[int, str]) -> dict[str, Any]:
    """Every chart of a cell page in one column whose plot areas line up, as a bokeh JSON item."""
    figs: list[Any] = []
    for s in series:
        figs.append(trend_figure(s, axis, run_pages, figs[0].x_range if figs else None))
    grid = gridplot([[f] for f in figs], sizing_mode="stretch_width", merge_tools=True, toolbar_location="right")
    return json_item(grid)
