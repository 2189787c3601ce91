"""python -m bench.gpu_check [--json PATH]: check every CUDA path; see bench/gpu_check/__init__.py.

Exit status: 0 when every check passed or nothing could be checked (no CUDA: said so),
1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tabulate import tabulate

from bench.gpu_check.checks import (Check, as_json, attention_checks, cell_record_checks, guarded,
                                    nccl_trace_check, run_bench, scratch_dir)

PROFILE = ["profile.wait=0", "profile.warmup=1", "profile.active=2"]
# One cell of configs/gpu-single.yaml, shortened so the whole check stays under 5 minutes.
SINGLE_SETS = ["parallel.overlap=true", "parallel.memory_pool=false", "model.checkpoint=0.0",
               "run.warmup_steps=2", "run.measure_steps=3", "profile.enabled=true", *PROFILE,
               "profile.memory_snapshot=true", "nvml.enabled=true", "run.attention=flash"]
SINGLE_FILTER = "^ov1-mp0-ck0$"
# World size 2: the model of the GPU configs cut to 4 layers, a short sequence.
PAIR_MODEL = ["model.layers=4", "data.seq_len=4096", "data.global_batch=4", "run.warmup_steps=2",
              "run.measure_steps=3", "parallel.world_size=2"]


def why_nothing() -> Optional[str]:
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return (f"torch {torch.__version__} has no CUDA build" if built is None
                else f"torch built for CUDA {built} but no GPU is visible")
    return None


def single_gpu_checks() -> list[Check]:
    rows = guarded("flash-attn vs SDPA", attention_checks)
    record, tail = run_bench("gpu-single.yaml", SINGLE_SETS, SINGLE_FILTER, scratch_dir(), 240)
    rows += guarded("gpu-single cell", lambda: cell_record_checks(record, tail, "gpu-single (world size 1, NCCL)"))
    return rows


def pair_checks() -> list[Check]:
    rows: list[Check] = []
    isp_sets = PAIR_MODEL + ["parallel.sp=2", "parallel.wp=2", "profile.enabled=true", *PROFILE]
    record, tail = run_bench("gpu-single.yaml", isp_sets, SINGLE_FILTER, scratch_dir(), 240)
    rows += guarded("isp world 2", lambda: nccl_trace_check(record, tail, "isp sp=wp=2"))
    coll_sets = ["parallel.world_size=2", "parallel.sp=2", "parallel.wp=2", "collectives.max_bytes=64M"]
    record, tail = run_bench("collectives-gpu.yaml", coll_sets, "^wp2-ao0$", scratch_dir(), 180)
    rows.append(Check("collectives at world size 2", "ok" if record and record.get("status") == "ok" else "FAIL",
                      "" if record else tail[-300:]))
    peer_sets = PAIR_MODEL + ["parallel.sp=1", "parallel.wp=1", "parallel.strategy=fsdp2", *PROFILE]
    record, tail = run_bench("peers-gpu.yaml", peer_sets, "fsdp2", scratch_dir(), 240)
    rows += guarded("peers world 2", lambda: nccl_trace_check(record, tail, "fsdp2 world 2"))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    reason = why_nothing()
    if reason is not None:
        print(f"bench.gpu_check: nothing was checked: {reason}.")
        return 0
    start = time.perf_counter()
    print(f"bench.gpu_check on {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", flush=True)
    rows = single_gpu_checks()
    if torch.cuda.device_count() >= 2:
        rows += pair_checks()
    else:
        rows.append(Check("world size 2 (collectives, peers, NCCL kernels)", "n/a", "needs 2 GPUs"))
    print(tabulate([(r.name, r.status, r.detail) for r in rows], headers=("check", "result", "detail")))
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(as_json(rows), indent=1))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
