"""Tables from a run's records: the console table, summary.md and results.csv.

Reads only RUN_DIR/results.jsonl (plus config.yaml for the baseline rule and env.json for the
header), never logs, so it can be re-run on any finished or half-finished run:
`python -c "import bench.results.report as r; print(r.write_summary('results/RUN'))"`.
Columns are data: append a `Column` to COLUMNS (MFU, exposed comm, energy...) and every
report picks it up; a metric a record lacks shows as MISSING.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tabulate import tabulate

from bench.metrics import phases
from bench.results.records import flatten, is_canary, latest, lookup, number, read_records  # noqa: F401 - read_records re-exported
from bench.results.straggler_line import slowest_rank_line

MISSING = "—"
Record = dict[str, Any]


@dataclass(frozen=True)
class Column:
    header: str
    # (record, its baseline record or None) -> cell text, or None for MISSING
    value: Callable[[Record, Record | None], str | None]
    optional: bool = False  # hidden when no row has a value
    best: tuple[str, str] | None = None  # (metric, "min" | "max"): the best cell is marked BEST


def metric(record: Record | None, dotted: str) -> Any:
    """A metric by dotted path ('step_time_s.median'), or None when absent."""
    return lookup((record or {}).get("metrics"), dotted)


def step_time(record: Record, _: Record | None) -> str | None:
    """'0.512 s [0.501-0.533]': median and p10-p90, three significant digits, always seconds."""
    median, p10, p90 = (number(metric(record, f"step_time_s.{k}")) for k in ("median", "p10", "p90"))
    if median is None:
        return None
    spread = f" [{p10:.3g}-{p90:.3g}]" if p10 is not None and p90 is not None else ""
    return f"{median:.3g} s{spread}"


def speedup(record: Record, base: Record | None) -> str | None:
    if is_canary(record.get("config")):  # a machine probe is compared across nights, not with a baseline cell
        return None
    if base is None:
        return "n/a"
    if base is record:
        return "baseline"
    mine, theirs = number(metric(record, "step_time_s.median")), number(metric(base, "step_time_s.median"))
    return f"{theirs / mine:.2f}x" if mine and theirs else "n/a"


def _scaled(dotted: str, scale: float, fmt: str) -> Callable[[Record, Record | None], str | None]:
    def value(record: Record, _: Record | None) -> str | None:
        x = number(metric(record, dotted))
        return None if x is None else format(x / scale, fmt)
    return value


def _flag(dotted: str) -> Callable[[Record, Record | None], str | None]:
    def value(record: Record, _: Record | None) -> str | None:
        x = metric(record, dotted)
        return None if x is None else ("yes" if x else "NO")
    return value


BEST = " *"  # marks the best value of a column (legend under the table)

COLUMNS: list[Column] = [
    Column("cell", lambda r, _: r.get("cell")),
    Column("status", lambda r, _: r.get("status")),
    Column("step time", step_time, best=("step_time_s.median", "min")),
    Column("speed-up", speedup),
    Column("tokens/s", _scaled("tokens_per_s", 1.0, ",.0f"), best=("tokens_per_s", "max")),
    Column("TFLOP/s/rank", _scaled("tflops_per_rank", 1.0, ".3g"), optional=True, best=("tflops_per_rank", "max")),
    Column("MFU %", _scaled("mfu", 0.01, ".1f"), optional=True, best=("mfu", "max")),
    Column("peak mem (MiB)", _scaled("peak_memory_bytes", 2**20, ",.0f"), best=("peak_memory_bytes", "min")),
    Column("comm MiB/step", _scaled("comm.bytes_per_step", 2**20, ",.2f"), optional=True),
    Column("exposed comm (ms)", _scaled("exposed_comm_s", 1e-3, ",.1f"), optional=True,
           best=("exposed_comm_s", "min")),
    Column("overlap %", _scaled("overlap_pct", 1.0, ".1f"), optional=True, best=("overlap_pct", "max")),
    Column("energy/token (mJ)", _scaled("nvml.energy_per_token_j", 1e-3, ".3g"), optional=True,
           best=("nvml.energy_per_token_j", "min")),
    Column("comm / roofline", _scaled("roofline.ratio", 1.0, ".2f"), optional=True),
    Column("busbw GB/s (collectives)", _scaled("collectives.avg_busbw_gbps", 1.0, ".3g"), optional=True),
    Column("max skew % (collectives)", _scaled("collectives.max_skew_pct", 1.0, ".1f"), optional=True),
    Column("slowest rank (compute vs median)", lambda r, _: slowest_rank_line(r.get("metrics")), optional=True),
    Column("bytes = formula", _flag("comm.matches_prediction"), optional=True),
    Column("loss = reference", _flag("loss_matches_reference"), optional=True),
    Column("error", lambda r, _: (r.get("error") or {}).get("reason"), optional=True),
]


def baselines(records: list[Record], rule: dict[str, Any]) -> dict[str, Record | None]:
    """Each cell's baseline: the cell with the same swept values except `rule`'s keys, which
    take the rule's values. A cell that already has them is its own baseline."""
    if not rule:
        return {r["cell"]: None for r in records}
    keys = sorted({k for r in records for k in r.get("swept", {})} | set(rule))

    def view(r: Record) -> tuple[Any, ...]:
        flat = flatten(r.get("config") or {})
        return tuple(r.get("swept", {}).get(k, flat.get(k)) for k in keys)

    compared = [r for r in records if not is_canary(r.get("config"))]  # a machine probe is nobody's baseline
    by_view = {view(r): r for r in compared}
    out: dict[str, Record | None] = {r["cell"]: None for r in records}
    for r in compared:
        target = tuple(rule.get(k, v) for k, v in zip(keys, view(r), strict=True))
        out[r["cell"]] = by_view.get(target)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def table(run_dir: Path | str, tablefmt: str = "simple") -> str:
    run_dir = Path(run_dir)
    records = latest(read_records(run_dir))
    rule = _read_yaml(run_dir / "config.yaml").get("baseline") or {}
    base = baselines(records, rule if isinstance(rule, dict) else {})
    grid = [[col.value(r, base.get(r["cell"])) for col in COLUMNS] for r in records]
    _mark_best(records, grid)
    shown = [i for i, col in enumerate(COLUMNS) if not col.optional or any(row[i] is not None for row in grid)]
    rows = [[MISSING if row[i] is None else row[i] for i in shown] for row in grid]
    return tabulate(rows, headers=[COLUMNS[i].header for i in shown], tablefmt=tablefmt, disable_numparse=True)


def _mark_best(records: list[Record], grid: list[list[str | None]]) -> None:
    """Append BEST to the best ok value of each column that has a direction (ties all marked)."""
    for i, col in enumerate(COLUMNS):
        if col.best is None:
            continue
        name, direction = col.best
        values = [(number(metric(r, name)), row) for r, row in zip(records, grid, strict=True)
                  if r.get("status") == "ok" and not is_canary(r.get("config"))]
        values = [(v, row) for v, row in values if v is not None and row[i] is not None]
        if len(values) < 2:
            continue
        target = (min if direction == "min" else max)(v for v, _ in values)
        for v, row in values:
            if v == target:
                row[i] = f"{row[i]}{BEST}"


def write_csv(run_dir: Path | str) -> Path:
    """results.csv: one row per cell, swept keys, then every scalar metric (lists dropped)."""
    run_dir = Path(run_dir)
    records = latest(read_records(run_dir))
    swept = list(dict.fromkeys(k for r in records for k in r.get("swept", {})))
    first = ["step_time_s.median", "step_time_s.p10", "step_time_s.p90", "tokens_per_s", "peak_memory_bytes"]
    flats = [{k: v for k, v in flatten(r.get("metrics") or {}).items() if not isinstance(v, (list, dict))}
             for r in records]
    extra = [k for k in dict.fromkeys(k for f in flats for k in f) if k not in first]
    header = ["cell", "status", *swept, *first, *extra, "wall_s", "error"]
    path = run_dir / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r, flat in zip(records, flats, strict=True):
            writer.writerow([r["cell"], r.get("status"), *(r.get("swept", {}).get(k) for k in swept),
                             *(flat.get(k) for k in first + extra), r.get("wall_s"),
                             (r.get("error") or {}).get("reason")])
    return path


def _header(run_dir: Path, records: list[Record]) -> list[str]:
    env = {}
    try:
        env = json.loads((run_dir / "env.json").read_text())
    except (OSError, ValueError):
        pass
    name = _read_yaml(run_dir / "config.yaml").get("name", run_dir.name)
    counts = {s: sum(r.get("status") == s for r in records) for s in ("ok", "failed", "timeout", "interrupted")}
    def env_get(key: str) -> Any:
        return MISSING if env.get(key) is None else env[key]

    return [
        f"# ISP Bench: {name}", "",
        f"- run: `{run_dir.name}`, started {env_get('utc')}",
        f"- cells: {len(records)} ({', '.join(f'{n} {s}' for s, n in counts.items())})",
        f"- host: {env_get('hostname')}, {env_get('platform')}, {env_get('cpu_count')} CPUs",
        f"- python {env_get('python')}, torch {env_get('torch')}, CUDA {env_get('cuda')}, NCCL {env_get('nccl')}, "
        f"GPU {env_get('gpu')}, driver {env_get('driver')}",
        f"- git: {env_get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}",
        "",
    ]


def write_summary(run_dir: Path | str) -> str:
    """Write summary.md and results.csv for the run; return the console table."""
    run_dir = Path(run_dir)
    records = latest(read_records(run_dir))
    lines = _header(run_dir, records) + [table(run_dir, "github"), "",
                                          f"`{BEST.strip()}` marks the best value of a column among the ok cells.", ""]
    lines += _time_spent(records)
    lines += _plots(run_dir)
    lines += _slowest_ranks(records)
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        lines += ["## Failures", ""]
        lines += [f"- `{r['cell']}`: {(r.get('error') or {}).get('reason', MISSING)} "
                  f"(log: `{(r.get('error') or {}).get('log_file', MISSING)}`)" for r in failed]
        lines.append("")
    (run_dir / "summary.md").write_text("\n".join(lines))
    write_csv(run_dir)
    return f"{table(run_dir)}\n{phases.timed_share(records)}"


def _time_spent(records: list[Record]) -> list[str]:
    """Where each cell's time went (metrics.phases_s, bench/metrics/phases.py) and the sweep's timed share."""
    lines = ["## Where the time went", ""]
    lines += [f"- `{r['cell']}`: {phases.breakdown(r)}" for r in records]
    return lines + ["", phases.timed_share(records), ""]


def _slowest_ranks(records: list[Record]) -> list[str]:
    """Each cell's slowest rank, its node and its lag (the table's column, with the threshold)."""
    rows = [(r, line) for r in records if (line := slowest_rank_line(r.get("metrics"))) is not None]
    if not rows:
        return []
    lines = ["## Slowest rank per cell", "",
             "Compute time (the step outside collective waits) of each cell's slowest rank against the median "
             "rank's; `straggler` past `run.straggler_pct`.", ""]
    lines += [f"- `{r['cell']}`: {line} (threshold {r['metrics']['straggler']['threshold_pct']:g}%)" for r, line in rows]
    return lines + [""]


def _plots(run_dir: Path) -> list[str]:
    """PNG plots of the run, embedded in summary.md; a plotting failure never loses the summary."""
    try:
        from bench.results.plots import write_run_plots

        paths = write_run_plots(run_dir)
    except Exception as err:  # noqa: BLE001 - matplotlib missing or a record it cannot draw
        return [f"(plots not drawn: {type(err).__name__}: {err})", ""]
    lines = ["## Plots", ""] if paths else []
    for path in paths:
        lines += [f"![{path.stem}]({path.relative_to(run_dir)})", ""]
    return lines
