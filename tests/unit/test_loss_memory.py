"""The vocab-parallel loss: exact against PyTorch's cross-entropy, and at most one float32
[tokens, V] tensor alive at any time (measured with the CPU allocator's own events)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from isp_core.loss import vocab_parallel_cross_entropy

T, V = 512, 4096
FP32_COPY = T * V * 4


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes held by the CPU allocator while `fn` runs, above what was held before
    (from the profiler's [memory] events, whose 'Total Allocated' is the running total)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, T, V, generator=gen) * 3).to(dtype).requires_grad_()
    return logits, torch.randint(0, V, (1, T), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [FP32_COPY // 7, 2**30])
def test_loss_and_gradient_equal_cross_entropy(dtype: torch.dtype, chunk_bytes: int) -> None:
    logits, target = _inputs(dtype)
    loss = vocab_parallel_cross_entropy(logits, target, None, chunk_bytes=chunk_bytes)
    weights = torch.rand(1, T)  # a non-uniform upstream gradient
    (loss * weights).sum().backward()
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), reduction="none").view(1, T)
    (ref * weights).sum().backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: the gradient's own rounding
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, atol=tol, rtol=0.01)
    assert logits.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_at_most_one_float32_copy(dtype: torch.dtype) -> None:
    logits, target = _inputs(dtype)
    chunk = FP32_COPY // 8

    def step() -> None:
        vocab_parallel_cross_entropy(logits, target, None, chunk_bytes=chunk).mean().backward()

    peak = cpu_peak_bytes(step)
    # The gradient itself (logits' dtype) plus one float32 chunk plus per-token vectors;
    # the former version held a shifted copy, exp/softmax and a clone: >= 2 float32 copies.
    grad_bytes = T * V * logits.element_size()
    assert peak <= grad_bytes + chunk + 64 * T * 4, (peak, grad_bytes, chunk)
    assert peak <= FP32_COPY * 1.2
