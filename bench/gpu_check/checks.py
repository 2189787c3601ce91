"""The individual checks of `python -m bench.gpu_check`; each returns `Check` rows."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[2]
FLASH_TOL = 2e-2  # bf16 outputs of two exact kernels differ by a few bf16 rounding steps (2^-8)


@dataclass
class Check:
    name: str
    status: str  # "ok", "FAIL" or "n/a"
    detail: str


def _ok(name: str, passed: bool, detail: str) -> Check:
    return Check(name, "ok" if passed else "FAIL", detail)


def attention_checks() -> list[Check]:
    """flash-attn against SDPA on packed documents with GQA in bf16 (outputs and gradients)."""
    from isp_core.attention import attention_backend, local_attention

    try:
        attention_backend("flash", "cuda", torch.bfloat16)
    except RuntimeError as err:
        return [Check("flash-attn vs SDPA", "FAIL", str(err))]
    rows = []
    for head_dim in (128, 36):  # 36: flash pads it to 40 and hands back a slice
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 2048, 16, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(1, 2048, 4, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        bounds = [0, 300, 301, 1100, 2048]  # four documents, one of a single token
        cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        outs, grads = {}, {}
        for backend in ("flash", "sdpa"):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = local_attention(*leaves, cu_seqlens=cu, max_seqlen=longest, backend=backend)
            out.float().square().sum().backward()
            outs[backend], grads[backend] = out.float(), [t.grad.float() for t in leaves]
        err_out = (outs["flash"] - outs["sdpa"]).abs().max().item()
        err_grad = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
                       for a, b in zip(grads["flash"], grads["sdpa"]))
        rows.append(_ok(f"flash-attn vs SDPA, packed GQA 16/4 heads, D={head_dim}, bf16",
                        err_out < FLASH_TOL and err_grad < FLASH_TOL,
                        f"max |out diff| {err_out:.2e}, max grad diff / max grad {err_grad:.2e} (tol {FLASH_TOL})"))
    return rows


def run_bench(config: str, sets: list[str], filt: Optional[str], results: Path, timeout_s: float) -> tuple[Optional[dict], str]:
    """Run one config through run_bench.py; (its first record, or None, and the output tail)."""
    cmd = [sys.executable, str(REPO / "run_bench.py"), str(REPO / "configs" / config),
           "--results-dir", str(results)] + [f"--set={s}" for s in sets]
    if filt:
        cmd += ["--filter", filt]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    tail = (done.stdout + done.stderr)[-1500:]
    runs = sorted(results.glob("*/results.jsonl"))
    if not runs:
        return None, tail
    records = [json.loads(line) for line in runs[-1].read_text().splitlines() if line.strip()]
    for record in records:  # trace paths are recorded relative to the run folder
        metrics = record.get("metrics") or {}
        metrics["traces"] = [str(runs[-1].parent / t) for t in metrics.get("traces") or []]
    return (records[0] if records else None), tail


def kernel_names(trace_path: str) -> list[str]:
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    return [e["name"] for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]


def snapshot_check(path: Optional[str]) -> Check:
    """The snapshot must be what torch.cuda._memory_viz reads: segments and device_traces,
    with Python frames (stacks="python") and a trace plot it can render."""
    name = "memory snapshot loads in memory_viz"
    if not path:
        return Check(name, "FAIL", "no memory_snapshot in the record")
    from torch.cuda import _memory_viz

    with open(path, "rb") as f:
        snap = pickle.load(f)
    if not {"segments", "device_traces"} <= set(snap):
        return Check(name, "FAIL", f"keys {sorted(snap)}")
    events = [e for trace in snap["device_traces"] for e in trace]
    frames = [fr for e in events for fr in e.get("frames", [])]
    html = _memory_viz.trace_plot(snap)
    python_frames = any(str(fr.get("filename", "")).endswith(".py") for fr in frames)
    return _ok(name, bool(events) and python_frames and len(html) > 1000,
               f"{len(snap['segments'])} segments, {len(events)} events, python frames {python_frames}")


def cell_record_checks(record: Optional[dict], tail: str, label: str) -> list[Check]:
    """MFU, energy per token, flash kernels, memory snapshot of a world-size-1 cell."""
    if record is None or record.get("status") != "ok":
        why = (record or {}).get("error") or tail
        return [Check(f"{label} cell runs", "FAIL", str(why)[-300:])]
    m = record["metrics"]
    rows = [Check(f"{label} cell runs", "ok", f"{m['step_time_s']['median']:.3f} s/step, "
                                             f"attention {m.get('attention', {}).get('backend')}")]
    mfu = m.get("mfu")
    rows.append(_ok("MFU within (0, 1)", isinstance(mfu, float) and 0 < mfu < 1,
                    f"mfu {mfu}, peak {m.get('peak_tflops')} TFLOP/s ({m.get('mfu_reason', '')})"))
    rows.append(energy_check(m, record["config"]))
    traces = m.get("traces") or []
    names = [n for t in traces for n in kernel_names(t)]
    flash = [n for n in names if "flash" in n.lower()]
    rows.append(_ok("trace holds flash-attn kernels", bool(flash),
                    f"{len(flash)} flash / {len(names)} kernels in {len(traces)} trace(s)"))
    rows.append(snapshot_check(m.get("memory_snapshot")))
    return rows


def energy_check(metrics: dict, config: dict) -> Check:
    name = "energy/token = energy/step / tokens/step"
    nvml = metrics.get("nvml") or {}
    if not nvml.get("available"):
        return Check(name, "FAIL", f"NVML not available: {nvml.get('reason')}")
    per_rank = [r for r in nvml["per_rank"] if r]
    per_step = sum(r["energy_per_step_j"] for r in per_rank)
    tokens = metrics["tokens_per_step"]
    want, got = per_step / tokens, nvml.get("energy_per_token_j")
    passed = isinstance(got, float) and abs(got - want) <= 1e-9 * max(abs(want), 1e-30) + 1e-12
    return _ok(name, passed, f"{got} J vs {per_step:.3f} J / {tokens} tokens = {want}")


def nccl_trace_check(record: Optional[dict], tail: str, label: str) -> list[Check]:
    if record is None or record.get("status") != "ok":
        why = (record or {}).get("error") or tail
        return [Check(f"{label} runs", "FAIL", str(why)[-300:])]
    traces = record["metrics"].get("traces") or []
    names = [n for t in traces for n in kernel_names(t)]
    nccl = [n for n in names if "nccl" in n.lower()]
    return [Check(f"{label} runs", "ok", f"{record['metrics']['step_time_s']['median']:.3f} s/step"),
            _ok(f"{label} traces hold NCCL kernels", bool(nccl), f"{len(nccl)} NCCL / {len(names)} kernels")]


def guarded(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """A check that raises is a failed row, not a crashed command."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported in the table
        return [Check(name, "FAIL", f"{type(err).__name__}: {err}"[:300])]


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="gpu_check_"))


def as_json(rows: list[Check]) -> list[dict[str, Any]]:
    return [row.__dict__ for row in rows]
