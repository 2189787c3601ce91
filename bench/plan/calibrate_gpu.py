"""Measured compute rates for a GPU hardware file, from what a GPU run measured.

Two sources, both optional, at least one needed:
  gpu_check.json  `python -m bench.gpu_check` times a large GEMM and the attention kernel per
                  dtype: {"rates": {"matmul_tflops": {dtype: x}, "attention_tflops": {dtype: y}}}
                  (schema isp-bench-gpu-check/1)
  a profiled world-size-1 training cell on CUDA: its trace's GPU kernels sorted into matmul
                  (cuBLAS/CUTLASS GEMMs) and attention (flash-attn, SDPA's kernels); the work the
                  planner counts for each class (bench/plan/calibrate.py's work_per_step) over the
                  kernels' seconds per profiled step. Kernel time is device time, so unlike the CPU
                  calibration nothing is rescaled: launch gaps stay out of the rates.
The cell's shapes are the training's own, so its rates win for its dtype; gpu_check's fill the
other dtypes. They go into `compute.measured` of a copy of the base hardware file (the one given,
or the shipped file whose `device.matches` names the recorded GPU), which keeps its datasheet
figures for everything else; `notes.calibrated_on` says where each rate came from.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import yaml

from bench.plan.calibrate import work_per_step

SCHEMA = "isp-bench-gpu-check/1"
HARDWARE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"
_MATMUL = ("gemm", "cutlass", "xmma", "cublas", "nvjet", "gemv")
_ATTENTION = ("flash", "fmha", "attention", "sdpa")


def kernel_class(name: str) -> str | None:
    low = name.lower()
    if "nccl" in low:
        return None
    if any(k in low for k in _ATTENTION):
        return "attention"
    if any(k in low for k in _MATMUL):
        return "matmul"
    return "other"


def kernel_seconds(trace: dict[str, Any]) -> tuple[dict[str, float], int]:
    """Seconds per class over the trace's kernels, and its number of profiled steps."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = len({e["name"] for e in events if e["name"].startswith("ProfilerStep")})
    if not steps:
        raise ValueError("the trace has no ProfilerStep events")
    out = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        if e.get("cat") == "kernel" and (cls := kernel_class(e["name"])) is not None:
            out[cls] += e["dur"] * 1e-6
    return out, steps


def cell_rates(record: dict[str, Any], config: Any) -> dict[str, float]:
    path = Path((record.get("metrics") or {}).get("traces", [None])[0] or "")
    if not path.is_absolute():
        path = Path(record.get("run_dir", ".")) / path
    with gzip.open(path, "rt") as f:
        seconds, steps = kernel_seconds(json.load(f))
    work = work_per_step(config)
    out = {}
    for cls in ("matmul", "attention"):
        if seconds[cls] > 0:
            out[f"{cls}_tflops"] = work[cls] / (seconds[cls] / steps) / 1e12
    if not out:
        raise ValueError(f"cell {record.get('cell')}: its trace has no GEMM or attention kernels")
    return out


def read_gpu_check(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("rates"), dict):
        raise ValueError(f"{path}: not a gpu_check.json (schema {SCHEMA} with rates)")
    return doc


def base_document(gpu: str | None, hardware: Path | None) -> tuple[dict[str, Any], str]:
    from bench.plan.hardware import load_hardware

    if hardware is not None:
        return yaml.safe_load(hardware.read_text()), str(hardware)
    for path in sorted(HARDWARE_DIR.glob("*.yaml")):
        if gpu and load_hardware(path).describes(gpu):
            return yaml.safe_load(path.read_text()), str(path)
    raise ValueError(f"no shipped hardware file describes the recorded GPU {gpu!r} (configs/hardware/*.yaml, "
                     "device.matches); allowed: --hardware FILE to start from")


def calibrate(records: list[dict[str, Any]], configs: dict[str, Any], env: dict[str, Any],
              checks: list[tuple[Path, dict[str, Any]]], hardware: Path | None) -> dict[str, Any]:
    """The hardware document with compute.measured filled; `configs`: cell id -> CellConfig."""
    gpu = env.get("gpu") or next((d.get("device") for _, d in checks), None)
    doc, base = base_document(gpu, hardware)
    doc = copy.deepcopy(doc)
    measured: dict[str, dict[str, float]] = {}
    used: list[str] = []
    for path, check in checks:
        for key in ("matmul_tflops", "attention_tflops"):
            for dtype, rate in (check["rates"].get(key) or {}).items():
                measured.setdefault(dtype, {})[key] = float(rate)
        used.append(f"{path}: gpu_check {check.get('device')}")
    cells = [r for r in records if r.get("status") == "ok" and r["cell"] in configs
             and configs[r["cell"]].run.device == "cuda" and configs[r["cell"]].parallel.world_size == 1
             and (r.get("metrics") or {}).get("traces")]
    for record in cells[:1]:  # one cell: its shapes are the training's
        config = configs[record["cell"]]
        measured.setdefault(config.run.dtype, {}).update(cell_rates(record, config))
        used.append(f"{record.get('run')}/{record['cell']}: kernels of its profiled steps")
    if not used:
        raise ValueError("no gpu_check.json and no ok, profiled world-size-1 CUDA training cell in the run(s); "
                         "allowed: the scratch folder of `python -m bench.gpu_check`, or a run of "
                         "configs/gpu-single.yaml with profile.enabled")
    doc["name"] = f"{doc.get('name', 'gpu')}-calibrated"
    doc.setdefault("compute", {})["measured"] = {d: {k: round(v, 2) for k, v in r.items()} for d, r in measured.items()}
    doc["notes"] = {**(doc.get("notes") or {}), "calibrated_from": base, "calibrated_on": used}
    return doc
