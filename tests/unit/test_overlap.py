"""bench.metrics.overlap: interval arithmetic with known answers, trace rules, and a real gloo trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.metrics.overlap import (
    comm_time_by_kind,
    cpu_compute_events,
    intersect_len,
    intervals_from_chrome_trace,
    nccl_kind,
    overlap_stats,
    union,
)

REPO = Path(__file__).resolve().parents[2]


# -- interval arithmetic ------------------------------------------------------


def test_union_merges_sorts_and_drops_empty():
    assert union([(5, 8), (0, 2), (1, 3), (3, 3)]) == [(0, 3), (5, 8)]
    assert union([(0, 1), (1, 2)]) == [(0, 2)]  # touching intervals merge
    assert union([]) == []
    with pytest.raises(ValueError):
        union([(2, 1)])


@pytest.mark.parametrize(
    "comm,compute,overlapped,pct",
    [
        ([(0, 1)], [(2, 3)], 0.0, 0.0),  # disjoint
        ([(0, 10)], [(2, 3), (5, 7)], 3.0, 30.0),  # compute nested in comm
        ([(2, 3)], [(0, 10)], 1.0, 100.0),  # comm nested in compute
        ([(0, 4)], [(3, 6)], 1.0, 25.0),  # partial overlap
        ([(5, 8), (0, 2), (1, 3)], [(2, 6)], 2.0, 100 * 2 / 6),  # unsorted, self-overlapping
        ([(0, 4), (2, 6)], [(1, 2), (1, 3)], 2.0, 100 * 2 / 6),  # duplicates counted once
        ([(0, 1)], [], 0.0, 0.0),  # no compute
    ],
)
def test_overlap_stats_known_answers(comm, compute, overlapped, pct):
    s = overlap_stats(comm, compute)
    assert s["overlapped_s"] == pytest.approx(overlapped)
    assert s["overlap_pct"] == pytest.approx(pct)
    assert s["exposed_comm_s"] == pytest.approx(s["comm_s"] - overlapped)
    assert intersect_len(comm, compute) == pytest.approx(overlapped)


def test_overlap_without_comm_is_none():
    s = overlap_stats([], [(0, 1)])
    assert s["comm_s"] == 0.0 and s["overlap_pct"] is None and s["compute_s"] == 1.0


# -- trace rules on synthetic events -----------------------------------------


def _x(name, ts, dur, cat="cpu_op", tid=1, args=None):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args or {}}


def test_cuda_kernels_split_by_nccl_name():
    trace = {
        "traceEvents": [
            _x("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 0, 100, "kernel", 7),
            _x("sm90_xmma_gemm_bf16bf16_bf16f32", 50, 100, "kernel", 8),
            _x("Memcpy HtoD (Pageable -> Device)", 0, 500, "gpu_memcpy", 7),
            _x("aten::mm", 0, 1000),  # CPU side: not a kernel
        ]
    }
    comm, compute = intervals_from_chrome_trace(trace, "cuda")
    assert comm == [pytest.approx((0.0, 100e-6))] and compute == [pytest.approx((50e-6, 150e-6))]
    assert overlap_stats(comm, compute)["overlap_pct"] == pytest.approx(50.0)
    assert comm_time_by_kind(trace)["all_gather"] == pytest.approx(100e-6)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("ncclKernel_AllReduce_RING_LL_Sum_bfloat16(ncclWorkElem)", "all_reduce"),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(x)", "reduce_scatter"),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "all_to_all"),
        ("ncclDevKernel_Broadcast_RING_LL(x)", "broadcast"),
    ],
)
def test_nccl_kind(name, kind):
    assert nccl_kind(name) == kind


def test_cpu_rules_top_level_bookkeeping_and_gloo_reduce_scatter():
    events = [
        _x("ProfilerStep#3", 0, 1000, "user_annotation"),
        _x("c10d::_reduce_scatter_base_", 10, 30, args={"Input Dims": [[4], [8], [], []]}),
        _x("aten::clone", 12, 20),  # inside the c10d op: not top-level
        _x("gloo:all_reduce", 40, 100, "user_annotation", tid=2, args={"Input Dims": [[8]]}),
        _x("aten::matmul", 50, 40),
        _x("aten::mm", 52, 36),  # nested in matmul
        _x("aten::empty", 95, 1),  # bookkeeping
        _x("c10d::allreduce_", 200, 5, args={"Input Dims": [[[3]], [], []]}),
        _x("gloo:all_reduce", 210, 50, "user_annotation", tid=2, args={"Input Dims": [[3]]}),
        _x("gloo:barrier", 300, 10, "user_annotation", tid=2),  # timer sync: not comm
        _x("aten::add", 5, 1, tid=2),  # other thread: not compute
    ]
    trace = {"traceEvents": events}
    assert [e["name"] for e in cpu_compute_events(events)] == ["aten::matmul"]
    comm, compute = intervals_from_chrome_trace(trace, "cpu")
    assert len(comm) == 2 and compute == [pytest.approx((50e-6, 90e-6))]
    kinds = comm_time_by_kind(trace)
    assert kinds["reduce_scatter"] == pytest.approx(100e-6)
    assert kinds["all_reduce"] == pytest.approx(50e-6)
    assert kinds["all_gather"] == 0.0 and kinds["all_to_all"] == 0.0 and "barrier" not in kinds


# -- a real 2-rank gloo trace ---------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch, torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, schedule

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(1 << 18)
    gathered = torch.empty(world * x.numel())
    a = torch.randn(128, 128)
    out = os.path.join(sys.argv[1], f"rank{rank}.json")

    def step(i):
        if i % 2 == rank:
            time.sleep(0.03)  # straggle, so the other rank's all-gather stays in flight
        work = dist.all_gather_into_tensor(gathered, x, async_op=True)
        a @ a
        while not work.is_completed():
            a @ a  # compute while the all-gather runs on gloo's thread
        work.wait()
        shard = torch.empty(x.numel() // world)
        dist.reduce_scatter_tensor(shard, x)
        dist.all_to_all_single(torch.empty_like(x), x)
        dist.all_reduce(torch.ones(3))

    sched = schedule(wait=0, warmup=1, active=2, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched, record_shapes=True,
                 on_trace_ready=lambda p: p.export_chrome_trace(out)) as prof:
        for i in range(3):
            step(i)
            prof.step()
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def gloo_traces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo_trace")
    script = tmp / "trace_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_real_gloo_trace(gloo_traces):
    for trace in gloo_traces:
        events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
        gloo_names = {e["name"] for e in events if e["name"].startswith("gloo:")}
        assert {"gloo:all_gather", "gloo:all_reduce", "gloo:all_to_all"} <= gloo_names
        main = {e["tid"] for e in events if e["name"].startswith("ProfilerStep#")}
        gloo_tids = {e["tid"] for e in events if e["name"].startswith("gloo:")}
        assert len(main) == 1 and not (gloo_tids & main)  # gloo works on its own threads

        compute_names = {e["name"] for e in cpu_compute_events(events)}
        assert "aten::matmul" in compute_names
        assert not compute_names & {"aten::copy_", "aten::empty", "aten::clone", "aten::mm"}

        comm, compute = intervals_from_chrome_trace(trace, "cpu")
        assert len(comm) >= 8 and len(compute) >= 8  # 2 active steps
        s = overlap_stats(comm, compute)
        assert 0.0 < s["overlapped_s"] <= min(s["comm_s"], s["compute_s"]) + 1e-12
        assert 0.0 < s["overlap_pct"] <= 100.0

        kinds = comm_time_by_kind(trace)
        for kind in ("all_gather", "reduce_scatter", "all_to_all", "all_reduce"):
            assert kinds[kind] > 0.0, kind
        assert sum(kinds.values()) >= s["comm_s"] - 1e-9  # per-kind unions cover the total
