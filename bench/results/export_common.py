"""What every export format reads from a run folder, the same way (bench/results/export.py).

Every format is built from the same reading of the run: its ok records (the newest per cell),
its env.json and its config name, and the same table of exported metrics below. A run folder
that is missing, unreadable or torn (a crash cut its last record) is an ExportError before
anything is written, and files are written whole (a temporary name, then a rename).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.results.records import RecordError, Run, load_run, lookup, metric_samples, metric_value
from bench.results.torn import torn_tail

SUITE = "isp-bench"


class ExportError(Exception):
    """Bad input for an export (exit 2); str() names the file and the reason."""


@dataclass(frozen=True)
class ExportedMetric:
    name: str  # the exported name
    path: str  # dotted path in a record's metrics
    unit: str
    higher_is_better: bool


# What every format exports per cell, when the record has it (a null MFU on CPU is left out).
METRICS: tuple[ExportedMetric, ...] = (
    ExportedMetric("step_time_s", "step_time_s", "s", False),
    ExportedMetric("tokens_per_s", "tokens_per_s", "tokens/s", True),
    ExportedMetric("mfu", "mfu", "ratio", True),
    ExportedMetric("tflops_per_rank", "tflops_per_rank", "TFLOP/s", True),
    ExportedMetric("peak_memory_bytes", "peak_memory_bytes", "bytes", False),
    ExportedMetric("exposed_comm_s", "exposed_comm_s", "s", False),
    ExportedMetric("overlap_pct", "overlap_pct", "%", True),
    ExportedMetric("energy_per_token_j", "nvml.energy_per_token_j", "J/token", False),
    ExportedMetric("comm_bytes_per_step", "comm.bytes_per_step", "bytes", False),
    # The planner's error against this run (metrics.plan, issue 21), |predicted - measured| / measured.
    ExportedMetric("plan_step_time_rel_error", "plan.step_time_s.rel_error", "ratio", False),
    ExportedMetric("plan_peak_memory_rel_error", "plan.peak_memory_bytes.rel_error", "ratio", False),
    ExportedMetric("plan_exposed_comm_rel_error", "plan.exposed_comm_s.rel_error", "ratio", False),
)
ENV_FACTS = ("gpu", "gpu_count", "cuda", "nccl", "driver", "torch", "git_commit", "git_dirty", "hostname", "nnodes")


@dataclass(frozen=True)
class Value:
    metric: ExportedMetric
    value: float
    samples: list[float] | None  # per measured step, where the metric has them
    predicted: float | None = None  # the planner's figure for it, where there is one

    def spread(self) -> tuple[float, float] | None:
        """p10 and p90 of the per-step samples (linear interpolation, as the records' own)."""
        if self.metric.path == "step_time_s" or not self.samples or len(self.samples) < 2:
            return None
        q = statistics.quantiles(self.samples, n=10, method="inclusive")
        return q[0], q[-1]


def load_exportable(run_dir: Path | str) -> Run:
    """The run, or an ExportError saying why it cannot be exported (nothing is written then)."""
    run_dir = Path(run_dir)
    results = run_dir / "results.jsonl"
    if results.is_file() and (torn := torn_tail(results)) is not None:
        raise ExportError(f"{results}:{torn.line}: torn record (a write cut short by a crash; "
                          f"run_bench.py --resume {run_dir} sets it aside and runs its cell again)")
    try:
        run = load_run(run_dir)
    except RecordError as exc:
        raise ExportError(str(exc)) from None
    if not run.ok_records():
        raise ExportError(f"{results}: no cell finished ok, nothing to export")
    return run


def values(record: dict[str, Any]) -> list[Value]:
    out = []
    for m in METRICS:
        value = metric_value(record, m.path)
        if value is None:
            continue
        stem = m.path.rsplit(".", 1)[0] if m.path.startswith("plan.") else None
        samples = None if stem else metric_samples(record, m.path)
        predicted = None if stem else metric_value(record, f"plan.{m.path}.predicted")
        out.append(Value(m, value, samples, predicted))
    return out


def as_text(value: Any) -> str:
    """Map(String, String) values: strings as they are, anything else as JSON, None as ''."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def layout(record: dict[str, Any]) -> str:
    p = (record.get("config") or {}).get("parallel") or {}
    return f"world_size={p.get('world_size')} sp={p.get('sp')} wp={p.get('wp')}"


def facts(run: Run, record: dict[str, Any]) -> dict[str, str]:
    """What a consumer needs beside a number: the swept keys, strategy, layout, device, env."""
    cfg = record.get("config") or {}
    out = {f"swept.{k}": as_text(v) for k, v in sorted((record.get("swept") or {}).items())}
    out.update({
        "config": run.config_name, "run": run.name, "cell": record["cell"],
        "strategy": as_text(lookup(cfg, "parallel.strategy")), "layout": layout(record),
        "device": as_text(lookup(cfg, "run.device")), "backend": as_text(lookup(cfg, "run.backend")),
        "attention": as_text(lookup(record.get("metrics"), "attention.backend")),
        "started_utc": as_text(record.get("started_utc")),
    })
    out.update({f"env.{k}": as_text(run.env.get(k)) for k in ENV_FACTS})
    return out


def write_json(path: Path, payload: Any) -> Path:
    """Write whole or not at all: a temporary file beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


