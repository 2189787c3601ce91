"""The cells gpu_check runs, through run_bench.py like any sweep, and the checks each one gets.

    main      configs/gpu-check-main.yaml      one profiled cell: every record check, the
                                               TFLOP/s bounds, NVML energy and power, the snapshot
    variants  configs/gpu-check-variants.yaml  world size 1: the memory pool, checkpoint 0.5 and 1,
                                               wp_unit block, head gathered, ddp, fsdp2, ulysses
    pair      configs/gpu-check-pair.yaml      two GPUs or more: isp and fsdp2 at world size 2
                                               (NCCL kernels in their traces), a collectives cell

Every training cell must match its loss reference and its counted bytes, and run flash-attn
where it is installed. Progress lines of run_bench.py are shown as they come.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench.gpu_check import record_checks as rc
from bench.gpu_check.rows import CORRECT, KERNELS, MEASUREMENT, NA, RUNS, SPEED, Check, guarded
from bench.results.records import RecordError, load_records
from bench.sweep.processes import kill_tree
from bench.sweep.runner import RESULTS, saved_cell_ids

REPO = Path(__file__).resolve().parents[2]
TAIL_CHARS = 3000


@dataclass(frozen=True)
class Sweep:
    label: str
    config: str  # under configs/
    timeout_s: float  # the whole sweep; each cell also has its own run.timeout_s


MAIN = Sweep("main", "gpu-check-main.yaml", 240)
VARIANTS = Sweep("variants", "gpu-check-variants.yaml", 300)
PAIR = Sweep("pair", "gpu-check-pair.yaml", 300)


def command(sweep: Sweep, results: Path) -> list[str]:
    return [sys.executable, str(REPO / "run_bench.py"), str(REPO / "configs" / sweep.config),
            "--results-dir", str(results), "--grace-s", "10"]


def _pump(proc: subprocess.Popen[str], tail: collections.deque[str]) -> None:
    for line in proc.stdout or []:
        tail.append(line)
        if line.startswith("[") or " cell(s) -> " in line:  # progress, and where the run folder is
            print(f"  | {line.rstrip()}", flush=True)


def run_sweep(sweep: Sweep, scratch: Path) -> list[rc.CellRun]:
    """Run the sweep's config; one CellRun per planned cell (a cell with no record included)."""
    results = scratch / sweep.label
    cmd = command(sweep, results)
    shown = " ".join(cmd)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    reader = threading.Thread(target=_pump, args=(proc, tail), daemon=True)
    reader.start()
    try:
        code: object = proc.wait(timeout=sweep.timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc, grace_s=15)  # run_bench records the running cell as interrupted on SIGTERM
        code = f"killed after {sweep.timeout_s:.0f} s"
    reader.join(timeout=10)
    output = f"(exit {code}) " + "".join(tail)[-TAIL_CHARS:]
    return cell_runs(results, output, shown)


def cell_runs(results: Path, output: str, shown: str) -> list[rc.CellRun]:
    """The newest run folder under `results`, read back: its planned cells and their records."""
    runs = sorted(p for p in results.glob("*") if (p / "cells.json").is_file()) if results.is_dir() else []
    if not runs:
        return [rc.CellRun(f"({results.name})", None, None, output, shown)]
    run_dir = runs[-1]
    try:
        records = load_records(run_dir / RESULTS) if (run_dir / RESULTS).exists() else {}
    except RecordError as err:
        return [rc.CellRun(f"({results.name})", None, run_dir, f"{err}; {output}", shown)]
    return [rc.CellRun(cell, records.get(cell), run_dir, output, f"{shown} --filter '^{cell}$'")
            for cell in saved_cell_ids(run_dir)]


CellCheck = tuple[str, int, Callable[[rc.CellRun], Check]]
TRAINING: list[CellCheck] = [("loss = reference", CORRECT, rc.loss_matches),
                             ("counted bytes = formula", CORRECT, rc.bytes_match),
                             ("attention is flash", KERNELS, rc.attention_is_flash)]


def main_checks(gemm_tflops: Optional[float], power_limit_w: Optional[float]) -> list[CellCheck]:
    return TRAINING + [
        ("trace holds flash-attn kernels", KERNELS, rc.flash_kernels_traced),
        ("TFLOP/s per rank within GEMM bounds", SPEED, lambda c: rc.tflops_in_bounds(c, gemm_tflops)),
        ("NVML sampled the steps", MEASUREMENT, rc.nvml_sampled),
        ("energy from the NVML counter", MEASUREMENT, rc.energy_from_counter),
        ("energy = mean power x time", MEASUREMENT, rc.energy_agrees_with_power),
        ("power plausible under load", MEASUREMENT, lambda c: rc.power_plausible(c, power_limit_w)),
        ("snapshot events = max_memory_allocated", MEASUREMENT, rc.snapshot_matches_peak)]


def checks_for(c: rc.CellRun, extra: list[CellCheck]) -> list[CellCheck]:
    """What a cell of the variants or pair sweep gets: by what it is, from its record."""
    config = (c.record or {}).get("config") or {}
    if (config.get("run") or {}).get("kind") == "collectives":
        return [("collectives correct", CORRECT, rc.collectives_correct)]
    pair = (config.get("parallel") or {}).get("world_size", 1) > 1
    return TRAINING + ([("trace holds NCCL kernels", KERNELS, rc.nccl_kernels_traced)] if pair else []) + extra


def rows_for(c: rc.CellRun, checks: list[CellCheck]) -> list[Check]:
    """The cell's 'runs' row, then one row per check (each guarded on its own); when the cell
    did not run, one row names the checks not made rather than failing each again."""
    out = [guarded("runs", RUNS, lambda: rc.runs(c), c.cell)]
    if not c.ran:
        names = ", ".join(name for name, _, _ in checks)
        return out + [Check("its other checks", NA, f"not made, the cell did not run: {names}", c.cell, RUNS)]
    return out + [guarded(name, priority, lambda check=check: check(c), c.cell) for name, priority, check in checks]
