"""The NVML overhead steps run on every rank or on none: a rank whose NVML failed must not
leave the others waiting in a collective (real gloo processes, a fake NVML library)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.worker.cell import nvml_overhead
from bench.worker.nvml import NvmlSampler
from bench.worker.timing import all_ranks_agree
from tests.support.dist_harness import run_ranks
from tests.unit.test_nvml import FakeNvml


def _one_rank_without_nvml(rank: int, world_size: int) -> tuple:
    # Rank 1's NVML fails to start; rank 0's works.
    fake = FakeNvml(init_error="NVML Shared Library Not Found" if rank == 1 else None)
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    cell = SimpleNamespace(device=torch.device("cpu"))  # never used for steps: nobody runs them
    result = nvml_overhead(cell, sampler, first=0)
    return sampler.available, result, all_ranks_agree(True), all_ranks_agree(rank == 0)


def test_overhead_steps_skipped_on_every_rank_when_one_lacks_nvml() -> None:
    (avail0, res0, yes0, mixed0), (avail1, res1, yes1, mixed1) = run_ranks(2, _one_rank_without_nvml, timeout_s=120)
    assert (avail0, avail1) == (True, False)
    assert res0 == res1 == (None, None)
    assert yes0 and yes1 and not mixed0 and not mixed1
