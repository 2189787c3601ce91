"""What gpu_check measures on the GPU itself, before any cell: whether there is a GPU to check,
its power limit, the bf16 and float32 GEMM rates, the attention kernel's rate, and flash-attn's
outputs and gradients against SDPA's.

Rates are model FLOPs per second: a GEMM of n x n by n x n is 2 n^3; attention forward and
backward over P causally attended (query, key) pairs is 12 x heads x head_dim x P, the
convention of the suite's model FLOPs (bench/metrics/formulas.py) and of bench/plan/compute.py.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import torch

from bench.gpu_check.rows import CORRECT, FAIL, NA, OK, SETUP, SPEED, Check, passed

GEMM_N = 8192
GEMM_MIN_OF_PEAK = 0.5  # cuBLAS reaches ~70-80% of an H100's dense bf16 peak at 8192^3; below half, clocks are capped
ATTN_MIN_OF_GEMM = 0.1  # flash-attn 2 reaches ~40-60% of the GEMM rate fwd+bwd at head_dim 128
ATTN_SHAPE = {"heads": 16, "kv_heads": 4, "head_dim": 128, "docs": 4, "doc_len": 4096}
FLASH_TOL = 2e-2  # bf16 outputs of two exact kernels differ by a few bf16 rounding steps (2^-8)
TIMED_S = 0.25  # each rate is timed over about this long, after a warm-up


def no_gpu_decision(cuda_build: Optional[str], torch_version: str, device_count: int, init_error: Optional[str],
                    visible: Optional[str]) -> Optional[tuple[int, str]]:
    """None when there is a GPU to check; else (exit status, the line to print). A CPU build of
    torch has nothing to check (0: CI runs it); a CUDA build that sees no GPU is a broken GPU
    machine (1), and the line says what torch said and where to look."""
    if device_count > 0:
        return None
    if cuda_build is None:
        return 0, (f"bench.gpu_check: nothing was checked: torch {torch_version} is a CPU build (no CUDA); "
                   "on a GPU machine install torch for its CUDA first")
    shown = "unset" if visible is None else repr(visible)
    return 1, (f"bench.gpu_check: FAILED: torch {torch_version} is built for CUDA {cuda_build} but sees no GPU: "
               f"{init_error or 'torch.cuda.device_count() is 0'} (CUDA_VISIBLE_DEVICES {shown}); check that "
               f"nvidia-smi lists a GPU, that the driver supports CUDA {cuda_build}, and CUDA_VISIBLE_DEVICES")


def gpu_facts() -> tuple[Optional[str], str, int, Optional[str], Optional[str]]:
    """The arguments of `no_gpu_decision` for this process."""
    count, error = 0, None
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
            count = torch.cuda.device_count()
        except Exception as err:  # noqa: BLE001 - the reason is what gets printed
            error = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return torch.version.cuda, torch.__version__, count, error, os.environ.get("CUDA_VISIBLE_DEVICES")


def power_limit_w() -> Optional[float]:
    """The enforced power limit of GPU 0 in watts, or None when NVML cannot say."""
    try:
        import pynvml

        from bench.worker.nvml import local_device_ids

        pynvml.nvmlInit()
        try:
            (device_id,) = local_device_ids()
            handle = (pynvml.nvmlDeviceGetHandleByUUID(device_id) if isinstance(device_id, str)
                      else pynvml.nvmlDeviceGetHandleByIndex(device_id))
            return pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0  # NVML: milliwatts
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no limit: the power check uses its fixed band and says so
        return None


def cuda_seconds(fn: Callable[[], Any]) -> float:
    """Seconds per call of `fn` on the current stream: warm-up, then about TIMED_S of calls."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    iters = max(3, math.ceil(TIMED_S / max(start.elapsed_time(end) / 1000, 1e-6)))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def matmul_tflops(dtype: torch.dtype, n: int = GEMM_N) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    return 2 * n ** 3 / cuda_seconds(lambda: torch.mm(a, b, out=out)) / 1e12


def attention_tflops() -> tuple[float, str]:
    """(TFLOP/s of the attention kernel the cells run, forward and backward, packed documents
    with GQA in bf16; that kernel's name)."""
    from isp_core.attention import attention_backend, local_attention

    s = ATTN_SHAPE
    backend = attention_backend("auto", "cuda", torch.bfloat16).name
    tokens = s["docs"] * s["doc_len"]
    q = torch.randn(1, tokens, s["heads"], s["head_dim"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, tokens, s["kv_heads"], s["head_dim"], device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    cu = torch.arange(0, tokens + 1, s["doc_len"], device="cuda", dtype=torch.int32)
    grad = torch.randn_like(q)

    def fwd_bwd() -> None:
        out = local_attention(q, k, v, cu_seqlens=cu, max_seqlen=s["doc_len"], backend=backend)
        torch.autograd.grad(out, (q, k, v), grad)

    pairs = s["docs"] * s["doc_len"] * (s["doc_len"] + 1) // 2
    return 12 * s["heads"] * s["head_dim"] * pairs / cuda_seconds(fwd_bwd) / 1e12, backend


def gemm_row(dtype: str, rate: float, peak: Optional[float], bf16_rate: Optional[float]) -> Check:
    name = f"{dtype} GEMM {GEMM_N}^3"
    if dtype != "bfloat16":  # no datasheet peak without tensor cores in the table: below bf16 is all we know
        return passed(name, 0 < rate < (bf16_rate or math.inf), f"{rate:.1f} TFLOP/s (below the bf16 rate "
                      f"{bf16_rate})", SPEED, "a float32 GEMM at or above the bf16 one means the timing is wrong")
    if peak is None:
        return Check(name, NA, f"{rate:.1f} TFLOP/s; not judged: {torch.cuda.get_device_name(0)!r} has no peak "
                     "in bench/metrics/formulas.py PEAK_TFLOPS", "", SPEED)
    low, high = GEMM_MIN_OF_PEAK * peak, 1.05 * peak
    return passed(name, low <= rate <= high, f"{rate:.1f} TFLOP/s; allowed {low:.0f}..{high:.0f} "
                  f"({GEMM_MIN_OF_PEAK:g}..1.05 x the {peak:g} TFLOP/s dense peak)", SPEED,
                  "the GPU runs below half its datasheet: check nvidia-smi -q -d PERFORMANCE,CLOCK,POWER "
                  "for throttling, a power cap or another process")


def attention_row(rate: float, backend: str, gemm: Optional[float]) -> Check:
    s = ATTN_SHAPE
    what = f"{backend}, {s['docs']} documents of {s['doc_len']}, {s['heads']}/{s['kv_heads']} heads of {s['head_dim']}"
    if gemm is None:
        return Check("attention fwd+bwd rate", FAIL, f"{rate:.1f} TFLOP/s ({what}); no GEMM rate to judge it by",
                     "", SPEED, "fix the GEMM timing first")
    low = ATTN_MIN_OF_GEMM * gemm
    return passed("attention fwd+bwd rate", low <= rate <= gemm, f"{rate:.1f} TFLOP/s ({what}); allowed "
                  f"{low:.0f}..{gemm:.0f} ({ATTN_MIN_OF_GEMM:g}..1 x the bf16 GEMM rate)", SPEED,
                  "the attention kernel is far slower than the GEMMs around it: see the flash-attn rows")


def flash_vs_sdpa(head_dim: int) -> Check:
    """flash-attn against SDPA on packed documents with GQA in bf16, outputs and gradients."""
    from isp_core.attention import local_attention

    name = f"flash-attn = SDPA, packed GQA 16/4 heads, D={head_dim}"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 2048, 16, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, 2048, 4, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    bounds = [0, 300, 301, 1100, 2048]  # four documents, one of a single token
    cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
    outs, grads = {}, {}
    for backend in ("flash", "sdpa"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = local_attention(*leaves, cu_seqlens=cu, max_seqlen=max(b - a for a, b in zip(bounds, bounds[1:])),
                              backend=backend)
        out.float().square().sum().backward()
        outs[backend], grads[backend] = out.float(), [t.grad.float() for t in leaves]
    err_out = (outs["flash"] - outs["sdpa"]).abs().max().item()
    err_grad = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
                   for a, b in zip(grads["flash"], grads["sdpa"]))
    return passed(name, err_out < FLASH_TOL and err_grad < FLASH_TOL, f"max |out diff| {err_out:.2e}, max grad "
                  f"diff / max grad {err_grad:.2e} (tolerance {FLASH_TOL})", CORRECT,
                  "flash-attn and SDPA disagree on this GPU: a wrong flash-attn build for it", "")


def flash_setup_row() -> Check:
    """Whether flash-attn runs here; when it does not, its comparison rows cannot run either."""
    from isp_core.attention import attention_backend

    try:
        chosen = attention_backend("flash", "cuda", torch.bfloat16)
    except RuntimeError as err:
        return Check("flash-attn runs", FAIL, str(err), "", SETUP,
                     "pip install -e '.[flash]' (built for this torch and CUDA); the GPU configs expect it")
    return Check("flash-attn runs", OK, chosen.reason, "", SETUP)
