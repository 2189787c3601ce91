"""Synthetic but realistic run folders for the compare, history and plot tests."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from collections.abc import Callable
from typing import Any

TOKENS_PER_STEP = 8 * 4096
CELLS = {  # cell id -> (world_size, overlap, base step time s)
    "ws2_overlap-on": (2, True, 0.210),
    "ws2_overlap-off": (2, False, 0.250),
    "ws4_overlap-on": (4, True, 0.120),
    "ws4_overlap-off": (4, False, 0.150),
}


def step_summary(samples: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return {
        "median": statistics.median(samples), "p10": q[0], "p90": q[-1], "mean": statistics.fmean(samples),
        "stdev": statistics.stdev(samples), "min": min(samples), "max": max(samples), "samples": samples,
    }


def jittered(base: float, n: int = 10, jitter: float = 0.01, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [base * (1 + rng.uniform(-jitter, jitter)) for _ in range(n)]


def make_record(
    run: str,
    cell: str,
    samples: list[float],
    *,
    memory: float = 30e9,
    breakdown: bool = True,
    hidden: int = 4096,
    status: str = "ok",
) -> dict[str, Any]:
    ws, overlap, _ = CELLS[cell]
    steps = step_summary(samples)
    median = steps["median"]
    exposed = 0.02 if overlap else 0.06
    metrics: dict[str, Any] = {
        "step_time_s": steps,
        "tokens_per_s": TOKENS_PER_STEP / median,
        "loss": [10.4 - 0.1 * i for i in range(len(samples))],
        "loss_rel_tol": 1e-4,  # float32's, as the one-process loss check records it
        "peak_memory_bytes": memory,
        "mfu": 0.41 * 0.25 / median,
        "tflops_per_rank": 400.0 * 0.25 / median,
        "exposed_comm_s": exposed,
        "overlap_pct": 80.0 if overlap else 20.0,
        "comm": {"all_gather": {"bytes": 1_234_567, "busbw_gbps": 180.0}},
    }
    if breakdown:
        metrics["overlap"] = {
            "max_exposed_comm_s": exposed,
            "per_rank": [{"rank": r, "compute_s": median * 0.7, "exposed_comm_s": exposed} for r in range(ws)],
        }
    return {
        "schema_version": 1,
        "run": run,
        "cell": cell,
        "status": status,
        "swept": {"parallel.world_size": ws, "parallel.overlap": overlap},
        "config": {
            "model": {"hidden": hidden, "layers": 8, "heads": 32},
            "data": {"seq_len": 4096, "micro_batch": 8},
            "parallel": {"world_size": ws, "sp": ws, "wp": ws, "overlap": overlap},
            "run": {"name": "nightly", "out_dir": f"results/{run}", "steps": 10, "warmup": 3},
        },
        "metrics": metrics if status == "ok" else None,
        "error": None if status == "ok" else {"type": "RuntimeError", "message": "NCCL watchdog timeout\nmore"},
        "started_utc": "2025-01-01T00:00:00Z",
        "wall_s": 12.3,
    }


def default_env(**overrides: Any) -> dict[str, Any]:
    env = {
        "python": "3.11.9", "torch": "2.6.0", "cuda": "12.4", "nccl": "2.21.5", "driver": "550.54",
        "gpu": "NVIDIA H100 80GB HBM3", "hostname": "node01", "git_commit": "a" * 40, "git_dirty": False,
        "command": "run_bench.py run configs/nightly.yaml", "utc": "2025-01-01T00:00:00Z",
    }
    env.update(overrides)
    return env


def write_run(
    root: Path,
    name: str,
    *,
    scale: float | dict[str, float] = 1.0,
    jitter: float = 0.01,
    seed: int = 0,
    cells: list[str] | None = None,
    env: dict[str, Any] | None = None,
    samples: dict[str, list[float]] | None = None,
    planned: list[str] | None = None,
    **record_kw: Any,
) -> Path:
    """A run folder whose step times are the base times times `scale` (per cell if a dict).

    cells.json lists `planned` (default: the cells written), as the runner writes it before any cell."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    lines = []
    written = cells or list(CELLS)
    plan = [{"cell": c, "swept": {}, "config": {}} for c in (planned if planned is not None else written)]
    (run_dir / "cells.json").write_text(json.dumps(plan) + "\n")
    for i, cell in enumerate(written):
        factor = scale.get(cell, 1.0) if isinstance(scale, dict) else scale
        cell_samples = (samples or {}).get(cell) or jittered(CELLS[cell][2] * factor, jitter=jitter, seed=seed + i)
        lines.append(json.dumps(make_record(name, cell, cell_samples, **record_kw)))
    (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "env.json").write_text(json.dumps(env or default_env()))
    (run_dir / "config.yaml").write_text("name: nightly\nparallel:\n  world_size: [2, 4]\n")
    (run_dir / "summary.md").write_text(f"# {name}\n")
    return run_dir


def write_nights(root: Path, scales: list[float], seed: int = 0, name: str = "nightly",
                 env_of: dict[int, dict[str, Any]] | None = None, **run_kw: Any) -> list[Path]:
    """One run folder per night, step times at scale * base, with 1% between-run drift; night d
    (from 1) is stamped 2025-01-d (then February) and ran commit ddd... (its last digit, 40 times);
    env_of[d] overrides night d's env.json entries."""
    rng = random.Random(seed)
    runs = []
    for day, scale in enumerate(scales, start=1):
        drift = scale * (1.0 + rng.gauss(0.0, 0.01))
        stamp = f"2025-01-{day:02d}T00:00:00Z" if day <= 31 else f"2025-02-{day - 31:02d}T00:00:00Z"
        env = default_env(utc=stamp, git_commit=f"{day % 10}" * 40, **(env_of or {}).get(day, {}))
        runs.append(write_run(root, f"{stamp[:10].replace('-', '')}T000000Z_{name}", scale=drift, seed=10 * day,
                              env=env, **run_kw))
    return runs


def edit_records(run: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite a run's records through `change` (which edits each record in place)."""
    path = run / "results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        change(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
