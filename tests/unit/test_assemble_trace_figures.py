"""Rank 0 assembles overlap and per-kind times from the figures each rank computed from its
own trace; it never opens another rank's trace file (a cluster need not share a disk)."""

from __future__ import annotations

import pytest
import torch

from bench.config.cell import CellConfig
from bench.metrics.assemble import assemble_metrics
from bench.metrics.measurement import Measurement, RankMeasurement
from bench.metrics.trace_figures import trace_figures


def _trace(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> dict:
    """A tiny CUDA-style trace: NCCL kernels and one compute kernel name (microseconds)."""
    kernel = lambda name, s, e: {"ph": "X", "cat": "kernel", "name": name, "ts": s, "dur": e - s}  # noqa: E731
    return {"traceEvents": [kernel("ncclDevKernel_AllGather_RING_LL", s, e) for s, e in comm]
            + [kernel("ampere_bf16_gemm", s, e) for s, e in compute]}


def test_assembly_reads_each_rank_figures_not_their_files(tmp_path) -> None:
    config = CellConfig.from_dict({"parallel": {"world_size": 2, "sp": 2, "wp": 2},
                                   "profile": {"enabled": True, "wait": 0, "warmup": 0, "active": 2}})
    # Rank 0: 100 us of all-gather, half hidden behind compute; rank 1: 100 us, none hidden.
    figures = [trace_figures(_trace([(0, 100)], [(50, 200)]), "cuda", steps=2),
               trace_figures(_trace([(0, 100)], [(100, 200)]), "cuda", steps=2)]
    missing = [str(tmp_path / f"rank{r}.json.gz") for r in range(2)]  # never written
    ranks = [RankMeasurement([1.0, 1.0], {}, {"peak_rss_bytes": 1},
                             profile={"traces": [missing[r]], "active_steps": 2, "figures": figures[r]})
             for r in range(2)]
    metrics = assemble_metrics(config, Measurement([0.1, 0.1], 0, ranks), torch.device("cpu"))
    per_rank = metrics["overlap"]["per_rank"]
    # per step: 50 and 100 us exposed over 2 steps
    assert [o["exposed_comm_s"] for o in per_rank] == pytest.approx([25e-6, 50e-6], rel=1e-12)
    assert metrics["exposed_comm_s"] == pytest.approx(50e-6) and metrics["overlap_pct"] == 0.0
    assert metrics["comm_time_s"]["all_gather"] == pytest.approx(50e-6)
    assert metrics["traces"] == missing
