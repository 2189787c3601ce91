"""Write the static site: `run_bench.py dashboard --out DIR` and `nightly --dashboard DIR`.

The site is built in a staging folder beside DIR and swapped in whole, so a browser on DIR
never sees half a refresh. DIR must be new, empty, or a dashboard this module wrote (it holds
MARKER); anything else is refused rather than replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.dashboard import pages
from bench.dashboard.charts import copy_bokeh_js
from bench.dashboard.model import read_site
from bench.dashboard.templates import STYLE, render
from bench.results.changepoint import DetectorSettings

MARKER = ".isp-bench-dashboard"


class DashboardError(Exception):
    """Bad input for the dashboard (exit 2)."""


@dataclass(frozen=True)
class Built:
    out: Path
    configs: int
    cells: int
    runs: int
    pages: int


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise DashboardError(f"{out}: exists and is not a dashboard written by run_bench.py dashboard "
                             f"(no {MARKER} in it); choose a new or empty folder")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _pages(stage: Path, db: Path, settings: DetectorSettings) -> Built:
    configs = read_site(db, settings)
    stamp = {"generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "db": str(db)}
    copy_bokeh_js(stage / "assets")
    _write(stage / "assets" / "style.css", STYLE)
    _write(stage / "index.html", render("index", title="ISP Bench dashboard", items="", **stamp,
                                        **pages.index_context(configs)))
    count = 1
    for config in configs:
        for cell in config.cells:
            ctx = pages.cell_context(cell, config.runs)
            _write(stage / pages.cell_href(cell), render("cell", title=f"{cell.cell} ({config.name})", **stamp, **ctx))
            count += 1
        for i, run in enumerate(config.runs):
            ctx = pages.run_context(config, i)
            _write(stage / pages.run_href(run), render("run", title=run["name"], items="", **stamp, **ctx))
            count += 1
    (stage / MARKER).write_text("written by run_bench.py dashboard; the folder is replaced whole on refresh\n")
    return Built(stage, len(configs), sum(len(c.cells) for c in configs), sum(len(c.runs) for c in configs), count)


def build(db: Path, out: Path, settings: DetectorSettings | None = None) -> Built:
    if not db.is_file():
        raise DashboardError(f"{db}: history DB not found (record runs with: run_bench.py history record RUN_DIR)")
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        built = _pages(stage, db, settings or DetectorSettings())
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Built(out, built.configs, built.cells, built.runs, built.pages)
