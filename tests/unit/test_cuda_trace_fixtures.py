"""The CUDA trace rules on real NCCL traces (HolisticTraceAnalysis test data, see
tests/fixtures/hta/README.md), against a brute-force sweep that shares no code with them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bench.metrics.nccl_trace import nccl_bytes_by_kind
from bench.metrics.overlap import comm_time_by_kind, intervals_from_chrome_trace, overlap_stats

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hta"
US = 1e-6


def _load(name: str) -> dict:
    with gzip.open(FIXTURES / name, "rt") as f:
        return json.load(f)


def _kernels(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("cat") == "kernel" and e.get("ph") == "X"]


def _covered(spans: list[tuple[float, float]], lo: float, hi: float) -> bool:
    return any(s <= lo and hi <= e for s, e in spans)


def brute_force(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> tuple[float, float]:
    """(|comm|, |comm ∩ compute|) by cutting the time line at every kernel boundary and
    testing each elementary piece against every kernel."""
    cuts = sorted({t for s, e in comm + compute for t in (s, e)})
    comm_len = both = 0.0
    for lo, hi in zip(cuts, cuts[1:]):
        if _covered(comm, lo, hi):
            comm_len += hi - lo
            if _covered(compute, lo, hi):
                both += hi - lo
    return comm_len, both


def _spans(kernels: list[dict]) -> list[tuple[float, float]]:
    """Kernel intervals in seconds, from the microsecond stamps as they are in the file."""
    return [(float(k["ts"]) * US, (float(k["ts"]) + float(k["dur"])) * US) for k in kernels]


@pytest.mark.parametrize("name", ["sendrecv_128ranks_rank0.json.gz", "nccl_allreduce_2ranks.json.gz"])
def test_overlap_of_real_nccl_trace_equals_brute_force(name: str) -> None:
    trace = _load(name)
    kernels = _kernels(trace)
    t0 = min(float(k["ts"]) for k in kernels)  # the sweep in microseconds from the first kernel
    kernels = [{**k, "ts": float(k["ts"]) - t0} for k in kernels]
    nccl = [k for k in kernels if k["name"].startswith("ncclKernel")]
    other = [k for k in kernels if not k["name"].startswith("ncclKernel")]
    comm_len, both = brute_force(_spans(nccl), _spans(other))
    stats = overlap_stats(*intervals_from_chrome_trace(trace, "cuda"))
    assert stats["comm_s"] == pytest.approx(comm_len, rel=1e-9)
    assert stats["overlapped_s"] == pytest.approx(both, rel=1e-9, abs=1e-12)
    assert stats["exposed_comm_s"] == pytest.approx(comm_len - both, rel=1e-9, abs=1e-12)


def test_sendrecv_trace_has_both_hidden_and_exposed_communication() -> None:
    # Rank 0 of 128 runs SendRecv on two NCCL streams beside compute on a third: a real case
    # of partial overlap, so neither the all-hidden nor the all-exposed shortcut would pass.
    stats = overlap_stats(*intervals_from_chrome_trace(_load("sendrecv_128ranks_rank0.json.gz"), "cuda"))
    assert 0 < stats["overlap_pct"] < 100


def test_comm_time_per_kind_from_kernel_names() -> None:
    trace = _load("nccl_allreduce_2ranks.json.gz")
    times = comm_time_by_kind(trace)
    for kind, marker in (("all_reduce", "_AllReduce_"), ("broadcast", "_Broadcast_")):
        spans = _spans([k for k in _kernels(trace) if marker in k["name"]])
        assert spans, kind
        assert times[kind] == pytest.approx(brute_force(spans, [])[0], rel=1e-9)
    assert times["all_gather"] == times["reduce_scatter"] == times["all_to_all"] == 0.0
    sendrecv = comm_time_by_kind(_load("sendrecv_128ranks_rank0.json.gz"))
    assert sendrecv["all_to_all"] > 0 and sendrecv["all_reduce"] == 0.0


def test_bandwidth_from_kernel_message_sizes() -> None:
    trace = _load("nccl_allreduce_2ranks.json.gz")
    found = nccl_bytes_by_kind(trace)
    allreduce = [k for k in _kernels(trace) if "_AllReduce_" in k["name"]]
    want = sum(int(k["args"]["In msg nelems"]) * 4 for k in allreduce)  # dtype Float
    assert found["all_reduce"]["bytes"] == want
    assert found["all_reduce"]["group_size"] == 2
    seconds = sum(float(k["dur"]) for k in allreduce) * US
    assert found["all_reduce"]["algbw_gbps"] == pytest.approx(want / seconds / 1e9, rel=1e-6)
    # all_reduce moves 2(n-1)/n of the buffer per rank: 1 at n = 2 (nccl-tests' bus factor).
    assert found["all_reduce"]["busbw_gbps"] == pytest.approx(found["all_reduce"]["algbw_gbps"], rel=1e-9)
    # An older trace without message sizes gives nothing rather than guessed bytes.
    assert nccl_bytes_by_kind(_load("sendrecv_128ranks_rank0.json.gz")) == {}
