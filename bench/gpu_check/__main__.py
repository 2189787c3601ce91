"""python -m bench.gpu_check [--out DIR]: check every CUDA path; see bench/gpu_check/__init__.py.

Exit status: 0 when every check passed, or with a CPU build of torch (nothing to check: said so);
1 when a check failed, or when a CUDA build of torch sees no GPU (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bench.gpu_check import device
from bench.gpu_check.rows import CORRECT, FAIL, NA, RUNS, SETUP, SPEED, Check, document, guarded, summary_line, table
from bench.gpu_check.sweeps import MAIN, PAIR, VARIANTS, checks_for, main_checks, rows_for, run_sweep
from bench.metrics.formulas import lookup_peak_tflops

GOAL_S = 300  # the whole check on one H100/H200 (designed for; not yet timed on one)


def measured(name: str, fn: Callable[[], Any], rows: list[Check]) -> Any:
    """fn(), or None with a failed row saying why: one timing that raises costs its row only."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported in the table
        rows.append(Check(name, FAIL, f"{type(err).__name__}: {err}", "", SPEED, "the timing itself failed: see detail"))
        return None


def device_rows() -> tuple[dict[str, dict[str, float]], list[Check]]:
    """(rates for gpu_check.json, rows): the GEMMs, the attention kernel, flash-attn against SDPA."""
    rows: list[Check] = []
    rates: dict[str, dict[str, float]] = {"matmul_tflops": {}, "attention_tflops": {}}
    peak = lookup_peak_tflops(torch.cuda.get_device_name(0), "bfloat16")
    for dtype in ("bfloat16", "float32"):
        rate = measured(f"{dtype} GEMM", lambda: device.matmul_tflops(getattr(torch, dtype)), rows)
        if rate is not None:
            rates["matmul_tflops"][dtype] = rate
            bf16 = rates["matmul_tflops"].get("bfloat16")
            rows.append(guarded(f"{dtype} GEMM", SPEED, lambda: device.gemm_row(dtype, rate, peak, bf16)))
    gemm = rates["matmul_tflops"].get("bfloat16")
    timed = measured("attention fwd+bwd rate", device.attention_tflops, rows)
    if timed is not None:
        rates["attention_tflops"]["bfloat16"] = timed[0]
        rows.append(guarded("attention fwd+bwd rate", SPEED, lambda: device.attention_row(timed[0], timed[1], gemm)))
    setup = guarded("flash-attn runs", SETUP, device.flash_setup_row)
    rows.append(setup)
    if setup.status != FAIL:
        rows += [guarded(f"flash-attn = SDPA, D={d}", CORRECT, lambda d=d: device.flash_vs_sdpa(d)) for d in (128, 36)]
    torch.cuda.empty_cache()  # the cells get the memory
    return rates, rows


def cell_rows(scratch: Path, gemm: Optional[float], limit_w: Optional[float]) -> list[Check]:
    rows: list[Check] = []
    sweeps = [MAIN, VARIANTS] + ([PAIR] if torch.cuda.device_count() >= 2 else [])
    for sweep in sweeps:
        print(f"{sweep.label}: configs/{sweep.config}", flush=True)
        for run in run_sweep(sweep, scratch):
            checks = main_checks(gemm, limit_w) if sweep is MAIN else checks_for(run, [])
            rows += rows_for(run, checks)
    if torch.cuda.device_count() < 2:
        rows.append(Check("world size 2 (NCCL collectives, peers)", NA, f"needs 2 GPUs, {torch.cuda.device_count()} "
                          "visible: on one GPU every group has one rank", "", RUNS))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the scratch folder (default: a new one under the temp folder)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    decision = device.no_gpu_decision(*device.gpu_facts())
    if decision is not None:
        code, line = decision
        print(line, flush=True)
        return code
    scratch = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    scratch.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0)
    print(f"bench.gpu_check on {torch.cuda.device_count()} x {name}; scratch folder {scratch} (the run folders "
          "and gpu_check.json)", flush=True)
    rates, rows = device_rows()
    rows += cell_rows(scratch, rates["matmul_tflops"].get("bfloat16"), device.power_limit_w())
    elapsed = time.perf_counter() - start
    print(table(rows))
    print(f"took {elapsed:.0f} s (goal: under {GOAL_S} s on one H100/H200); scratch folder {scratch}")
    out = scratch / "gpu_check.json"
    out.write_text(json.dumps(document(name, rates, rows, elapsed), indent=1) + "\n")
    print(f"rates and rows: {out}")
    print(summary_line(rows, elapsed), flush=True)
    return 1 if any(r.status == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
