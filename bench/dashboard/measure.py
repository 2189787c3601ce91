"""Page weight and load time of dashboard pages in headless Chromium: `python -m bench.dashboard.measure DIR`.

Weight is the page plus every local script and stylesheet it references, in bytes. Times are
performance.now() readings from navigation start: the load event, and (on pages with charts)
the first and the last chart on screen, as the page's own window.__charts records them. Each
page is loaded --repeat times in a fresh tab; the median is reported. On a shared machine give
the load average beside the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.dashboard.browser import Browser, beyond_local

ASSET = re.compile(r"""(?:src|href)=["']([^"':]+\.(?:js|css))["']""")


@dataclass(frozen=True)
class Timing:
    load_ms: float
    first_chart_ms: float | None
    all_charts_ms: float | None


def weight(html: Path) -> int:
    """The page plus the local scripts and stylesheets it references."""
    assets = {(html.parent / ref).resolve() for ref in ASSET.findall(html.read_text(encoding="utf-8"))}
    return html.stat().st_size + sum(p.stat().st_size for p in assets if p.is_file())


def timed_visit(browser: Browser, html: Path, charts: int, shot: Path | None = None) -> Timing:
    """Load a page in a fresh tab and time it; errors or requests beyond file:// are a RuntimeError."""
    page = browser.new_page()
    log = page.goto(html.resolve().as_uri())
    times = page.wait_for(f"window.__charts && window.__charts.length >= {charts} && window.__charts") if charts else []
    load = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
    if shot is not None:
        page.screenshot(shot)
    page.close()
    outside = beyond_local(log.requests)
    if log.errors or outside:
        raise RuntimeError(f"{html.name}: errors {log.errors}, requests beyond file:// {outside}")
    return Timing(float(load), min(times) if times else None, max(times) if times else None)


def median_timing(browser: Browser, html: Path, charts: int, repeat: int) -> Timing:
    runs = [timed_visit(browser, html, charts) for _ in range(repeat)]

    def mid(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return Timing(statistics.median(r.load_ms for r in runs), mid([r.first_chart_ms for r in runs]),
                  mid([r.all_charts_ms for r in runs]))


def pages_to_time(site: Path) -> list[tuple[str, Path, int]]:
    """The index, the heaviest cell page and the heaviest run page of a built dashboard."""
    chosen = [("index", site / "index.html", 0)]
    for kind, folder, charts in (("cell", "cells", 1), ("run", "runs", 0)):
        found = sorted(site.joinpath(folder).rglob("*.html"), key=lambda p: p.stat().st_size)
        if found:
            chosen.append((kind, found[-1], charts))
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard.measure", description=__doc__)
    p.add_argument("site", type=Path, help="a folder written by run_bench.py dashboard")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"{args.site}: no index.html (build it with run_bench.py dashboard --out DIR)", file=sys.stderr)
        return 2
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| page | file | weight (KiB) | load event (ms) | first chart (ms) | all charts (ms) |\n"
          "| --- | --- | --- | --- | --- | --- |")
    with Browser(timeout_s=120) as browser:
        for kind, html, charts in pages_to_time(args.site):
            t = median_timing(browser, html, charts, args.repeat)
            show = (lambda v: "-" if v is None else f"{v:.0f}")
            print(f"| {kind} | {html.relative_to(args.site)} | {weight(html) / 1024:,.0f} | {t.load_ms:.0f} | "
                  f"{show(t.first_chart_ms)} | {show(t.all_charts_ms)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
