"""PNG plots of one run and of a cell's history, drawn headless.

Figures are built with matplotlib's object API on an explicit Agg canvas rather
than through pyplot: that needs no display, touches no global backend state (so
importing this module cannot change how a notebook that imports it draws), and
leaks no figures in long-lived processes.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.results.records import Run, load_run, metric_value

if TYPE_CHECKING:
    from bench.results.history import HistoryPoint

WORLD_SIZE = "parallel.world_size"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _scale(unit: str) -> tuple[float, str]:
    """Factor and axis label that make a metric readable."""
    return {"s": (1e3, "ms"), "bytes": (1 / 2**30, "GiB"), "tok/s": (1.0, "tokens/s")}.get(unit, (1.0, unit))


def _cell_height(n_cells: int) -> float:
    return max(3.0, 0.4 * n_cells + 1.5)


def step_time_figure(run: Run) -> Figure | None:
    """(a) median step time per cell, whiskers from p10 to p90."""
    rows = []
    for cell, rec in run.ok_records().items():
        med = metric_value(rec, "step_time_s")  # a timing summary stands for its median
        if med is None:
            continue
        lo = metric_value(rec, "step_time_s.p10")
        hi = metric_value(rec, "step_time_s.p90")
        rows.append((cell, med * 1e3, (med - lo) * 1e3 if lo is not None else 0.0, (hi - med) * 1e3 if hi is not None else 0.0))
    if not rows:
        return None
    fig = _figure(8, _cell_height(len(rows)))
    ax = fig.add_subplot()
    y = range(len(rows))
    ax.barh(y, [r[1] for r in rows], xerr=[[r[2] for r in rows], [r[3] for r in rows]], capsize=3, color="tab:blue")
    ax.set_yticks(list(y), [r[0] for r in rows])
    ax.invert_yaxis()  # first cell on top, as in the tables
    ax.set_xlabel("step time (ms), median with p10-p90")
    ax.set_title(f"Step time per cell: {run.name}")
    return fig


def time_breakdown(rec: dict[str, Any]) -> tuple[float, float, float] | None:
    """(compute, exposed communication, other) seconds per step, or None if not recorded.

    Compute is the mean over ranks of overlap.per_rank[i].compute_s; exposed comm is
    the slowest rank's (overlap.max_exposed_comm_s), since that rank sets the step time.
    """
    metrics = rec.get("metrics") or {}
    step = metric_value(rec, "step_time_s")
    exposed = metric_value(rec, "overlap.max_exposed_comm_s")
    if exposed is None:
        exposed = metric_value(rec, "exposed_comm_s")
    overlap = metrics.get("overlap") if isinstance(metrics.get("overlap"), dict) else {}
    per_rank = [r.get("compute_s") for r in overlap.get("per_rank") or [] if isinstance(r, dict)]
    per_rank = [float(c) for c in per_rank if isinstance(c, (int, float))]
    compute = statistics.fmean(per_rank) if per_rank else metric_value(rec, "overlap.compute_s")
    if compute is None:
        compute = metric_value(rec, "compute_s")
    if step is None or exposed is None or compute is None:
        return None
    return compute, exposed, max(step - compute - exposed, 0.0)


def breakdown_figure(run: Run) -> Figure | None:
    """(b) stacked compute / exposed comm / other per cell; plain step time where not recorded."""
    rows = []
    for cell, rec in run.ok_records().items():
        step = metric_value(rec, "step_time_s")
        if step is not None:
            rows.append((cell, step, time_breakdown(rec)))
    if not rows:
        return None
    fig = _figure(8, _cell_height(len(rows)))
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    missing = sum(1 for r in rows if r[2] is None)
    if missing == len(rows):
        ax.barh(y, [r[1] * 1e3 for r in rows], color="tab:gray", label="step time")
        ax.set_title(f"Step time only (no compute/communication breakdown recorded): {run.name}")
    else:
        parts = [r[2] or (0.0, 0.0, r[1]) for r in rows]  # unbroken cells: all "other"
        left = [0.0] * len(rows)
        for i, (label, color) in enumerate((("compute", "tab:blue"), ("exposed comm", "tab:red"), ("other", "tab:gray"))):
            widths = [p[i] * 1e3 for p in parts]
            ax.barh(y, widths, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, widths)]
        note = f" ({missing} cells without breakdown shown as other)" if missing else ""
        ax.set_title(f"Step time breakdown{note}: {run.name}")
    ax.set_yticks(y, [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time per step (ms)")
    ax.legend(loc="lower right")
    return fig


def _swept(rec: dict[str, Any]) -> dict[str, Any]:
    swept = dict(rec.get("swept") or {})
    if WORLD_SIZE not in swept:
        parallel = (rec.get("config") or {}).get("parallel") or {}
        if isinstance(parallel, dict) and "world_size" in parallel:
            swept[WORLD_SIZE] = parallel["world_size"]
    return swept


def scaling_figure(run: Run) -> Figure | None:
    """(c) tokens/s and peak memory vs world size, one line per setting of the other swept keys."""
    series: dict[str, list[tuple[float, float | None, float | None]]] = defaultdict(list)
    for rec in run.ok_records().values():
        swept = _swept(rec)
        ws = swept.pop(WORLD_SIZE, None)
        if not isinstance(ws, (int, float)):
            continue
        label = ", ".join(f"{k}={v}" for k, v in sorted(swept.items())) or "all"
        series[label].append((float(ws), metric_value(rec, "tokens_per_s"), metric_value(rec, "peak_memory_bytes")))
    if len({p[0] for pts in series.values() for p in pts}) < 2:
        return None  # a single world size has no scaling to show
    fig = _figure(11, 4.5)
    ax_tp, ax_mem = fig.subplots(1, 2)
    for label, pts in sorted(series.items()):
        pts.sort()
        tp = [(x, v) for x, v, _ in pts if v is not None]
        mem = [(x, m / 2**30) for x, _, m in pts if m is not None]
        if tp:
            ax_tp.plot(*zip(*tp), marker="o", label=label)
        if mem:
            ax_mem.plot(*zip(*mem), marker="o", label=label)
    sizes = sorted({p[0] for pts in series.values() for p in pts})
    for ax, ylabel in ((ax_tp, "tokens/s"), (ax_mem, "peak memory (GiB)")):
        ax.set_xlabel("world size")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)  # world sizes double, so doubling gets equal spacing
        ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    ax_tp.legend(fontsize="small")
    fig.suptitle(f"Scaling: {run.name}")
    return fig


def write_run_plots(run_dir: Path | str) -> list[Path]:
    """Write the run's PNGs into run_dir/plots/ and return the paths written."""
    run = load_run(run_dir)
    out = Path(run_dir) / "plots"
    figures = {
        "step_time.png": step_time_figure(run),
        "time_breakdown.png": breakdown_figure(run),
        "scaling.png": scaling_figure(run),
    }
    return [_save(fig, out / name) for name, fig in figures.items() if fig is not None]


def trend_figure(
    points: list[HistoryPoint], lo: dict[int, float], hi: dict[int, float], cell: str, metric: str, unit: str = "",
    changes: Sequence[tuple[int, str]] = (),
) -> Figure:
    """(d) one metric of one cell across recorded runs, oldest first; p10-p90 whiskers where known.

    changes: (index of the first run at the new level, "regression" or "improvement"), drawn
    as a dashed line just before that run, red or green.
    """
    factor, label = _scale(unit)
    fig = _figure(max(6.0, 0.5 * len(points) + 3), 4)
    ax = fig.add_subplot()
    x = list(range(len(points)))
    values = [p.value * factor for p in points]
    err_lo = [(p.value - lo[p.run_id]) * factor if p.run_id in lo else 0.0 for p in points]
    err_hi = [(hi[p.run_id] - p.value) * factor if p.run_id in hi else 0.0 for p in points]
    ax.errorbar(x, values, yerr=[err_lo, err_hi], marker="o", capsize=3)
    step = max(1, len(points) // 20)  # keep run labels legible on long histories
    ax.set_xticks(x[::step], [p.run_name for p in points][::step], rotation=45, ha="right", fontsize="small")
    ax.set_ylabel(f"{metric} ({label})" if label else metric)
    ax.set_title(f"{metric} over recorded runs: {cell}")
    for index, kind in changes:
        color = "tab:red" if kind == "regression" else "tab:green"
        ax.axvline(index - 0.5, color=color, linestyle="--", label=f"{kind} from {points[index].run_name}")
    if changes:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def plot_trend(
    points: list[HistoryPoint], lo: dict[int, float], hi: dict[int, float], cell: str, metric: str, out_dir: Path,
    unit: str = "", changes: Sequence[tuple[int, str]] = (),
) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"trend_{cell}_{metric}")
    return _save(trend_figure(points, lo, hi, cell, metric, unit, changes), Path(out_dir) / f"{safe}.png")
