"""The two JSON exports: PyTorch OSS benchmark database records and github-action-benchmark's
custom tools (docs/export.md has every field's mapping and where the format is documented)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.results.export_common import SUITE, Value, as_text, facts, values, write_json
from bench.results.records import Run, lookup, metric_value

MODEL_KEYS = ("hidden", "layers", "heads", "kv_heads", "vocab", "mlp_hidden", "checkpoint")


def _strings(mapping: dict[str, Any]) -> dict[str, str]:
    # The database's extra_info columns are Map(String, String).
    return {k: as_text(v) for k, v in mapping.items()}


def pytorch_oss_records(run: Run) -> list[dict[str, Any]]:
    """One record per ok cell and exported metric, in the benchmark database's v3 layout."""
    out = []
    for cell, record in run.ok_records().items():
        cfg = record.get("config") or {}
        benchmark = {"name": f"{SUITE} {run.config_name}", "mode": "training",
                     "dtype": str(lookup(cfg, "run.dtype") or ""), "extra_info": facts(run, record)}
        model = {"name": cell, "type": "llama-class transformer (isp_core)", "origins": [SUITE],
                 "extra_info": _strings({k: lookup(cfg, f"model.{k}") for k in MODEL_KEYS})}
        for v in values(record):
            metric: dict[str, Any] = {
                "name": v.metric.name, "benchmark_values": v.samples or [v.value],
                # The v3 table's metric tuple has no unit column: the unit travels in extra_info.
                "extra_info": _strings({"unit": v.metric.unit, "value": repr(v.value),
                                        "higher_is_better": "true" if v.metric.higher_is_better else "false"}),
            }
            if v.predicted is not None:
                metric["target_value"] = v.predicted  # what the planner predicted for this cell
            out.append({"benchmark": benchmark, "model": model, "metric": metric})
    return out


def write_pytorch_oss(run: Run, out: Path) -> list[Path]:
    # The uploader reads every *.json of a folder, each a list of records.
    return [write_json(out / f"{run.name}.json", pytorch_oss_records(run))]


def _range(v: Value, record: dict[str, Any]) -> tuple[float, float] | None:
    if v.metric.path == "step_time_s":
        lo, hi = metric_value(record, "step_time_s.p10"), metric_value(record, "step_time_s.p90")
        return (lo, hi) if lo is not None and hi is not None else None
    return v.spread()


def gab_entry(run: Run, record: dict[str, Any], v: Value) -> dict[str, Any]:
    """{name, unit, value, range, extra}; range is '± half the p10-p90 width', the form the
    action parses, and extra states p10 and p90 themselves with the run it came from."""
    entry: dict[str, Any] = {"name": f"{run.config_name}/{record['cell']}/{v.metric.name}", "unit": v.metric.unit,
                             "value": v.value}
    spread = _range(v, record)
    lines = []
    if spread is not None:
        entry["range"] = f"± {(spread[1] - spread[0]) / 2:.6g}"
        lines.append(f"p10 {spread[0]:.6g}, p90 {spread[1]:.6g} {v.metric.unit}")
    about = facts(run, record)
    lines += [f"run {run.name}", f"commit {about['env.git_commit'] or 'unknown'}",
              f"{about['strategy']} {about['layout']} on {about['device']}"]
    entry["extra"] = "\n".join(lines)
    return entry


def gab_entries(run: Run) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(smaller is better, bigger is better) entries, one per ok cell and exported metric."""
    smaller, bigger = [], []
    for record in run.ok_records().values():
        for v in values(record):
            (bigger if v.metric.higher_is_better else smaller).append(gab_entry(run, record, v))
    return smaller, bigger


def write_gab(run: Run, out: Path) -> list[Path]:
    """Two files, one per tool: customSmallerIsBetter and customBiggerIsBetter."""
    smaller, bigger = gab_entries(run)
    return [write_json(out / "smaller_is_better.json", smaller), write_json(out / "bigger_is_better.json", bigger)]
