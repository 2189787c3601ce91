"""The collective ring file (written here, read back as the runner reads it), each rank's
compute/communication split of a step, metrics.per_rank / metrics.straggler, and the one
slowest-rank line every report shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.metrics.measurement import Measurement, RankMeasurement
from bench.metrics.per_rank import per_rank, straggler
from bench.results.straggler_line import slowest_rank_line
from bench.worker.collective_ring import CollectiveRing, ranks_from_text, ranks_text, read_ring
from bench.worker.rank_figures import step_split
from isp_core.comm_stats import CommStats


@pytest.mark.parametrize("ranks, text", [((0, 1, 2, 3), "0..3"), ((0, 4), "0,4"), ((1, 5, 9, 13), "1,5,..,13"),
                                         ((0, 1), "0,1"), ((3,), "3"), ((0, 2, 7), "0,2,7")])
def test_group_ranks_written_short_and_read_back(ranks: tuple[int, ...], text: str) -> None:
    assert ranks_text(ranks) == text and ranks_from_text(text) == list(ranks)


def test_ring_file_reads_back_what_was_launched_through_comm_stats(tmp_path: Path) -> None:
    ring = CollectiveRing(tmp_path / "rank2.ring", rank=2, world=4, node=1, local_rank=0, slots=4)
    stats = CommStats(ring)
    a = stats.record("weight", "all_gather", 1024, (0, 1, 2, 3))  # async: waited for later
    stats.waiting(a)
    stats.done(a)
    b = stats.record("sequence", "all_to_all", 64, (2, 3), blocking=True)  # sync: waits inside the call
    stats.done(b)
    stats.enabled = False  # counts stop; the ring still sees every launch
    for _ in range(3):
        stats.record("weight", "reduce_scatter", 2048, (0, 1, 2, 3))
    last = stats.record("weight", "all_gather", 1024, (0, 1, 2, 3))
    stats.waiting(last)  # blocked in it when the runner looks
    doc = read_ring(tmp_path / "rank2.ring")
    assert (doc["rank"], doc["node"], doc["world_size"], doc["launches"]) == (2, 1, 4, 6)
    assert {g["name"]: (g["launched"], g["ranks"]) for g in doc["groups"]} == {
        "weight": (5, [0, 1, 2, 3]), "sequence": (1, [2, 3])}
    entries = doc["entries"]  # 4 slots: the oldest two were overwritten
    assert [(e["kind"], e["seq"]) for e in entries] == [("reduce_scatter", 2), ("reduce_scatter", 3),
                                                        ("reduce_scatter", 4), ("all_gather", 5)]
    assert entries[-1]["waiting_ns"] > 0 and entries[-1]["done_ns"] == 0 and entries[0]["done_ns"] == 0
    assert stats.snapshot() == {"sequence": {"all_to_all": {"calls": 1, "bytes": 64}},
                                "weight": {"all_gather": {"calls": 1, "bytes": 1024}}}
    ring.close()
    with pytest.raises(ValueError, match="not a collective ring"):
        (tmp_path / "junk.ring").write_bytes(b"x" * 100)
        read_ring(tmp_path / "junk.ring")


def test_capture_keeps_each_launch_of_the_window(tmp_path: Path) -> None:
    ring = CollectiveRing(tmp_path / "r.ring", rank=0, world=2)
    ring.issue("world", (0, 1), "all_reduce", 4)  # before the capture: not kept
    launches = ring.capture()
    with ring.track("bench", (0, 1), "barrier"):
        pass
    ring.stop_capture()
    ring.issue("world", (0, 1), "all_reduce", 4)
    assert len(launches) == 1 and launches[0][0] == launches[0][1] <= launches[0][2]


def test_a_step_split_into_compute_and_the_time_blocked_in_collectives() -> None:
    window = (0, 100_000_000)  # 100 ms
    launches = [[10_000_000, 20_000_000, 30_000_000],  # async, waited for from 20 to 30 ms
                [10_000_000, 40_000_000, 50_000_000],  # issued with it, waited for from 40 to 50 ms
                [60_000_000, 60_000_000, 70_000_000],  # synchronous: blocked 60-70 ms
                [90_000_000, 95_000_000, 0]]           # still waiting at the step's end
    split = step_split(window, launches)
    assert split["exposed_comm_s"] == pytest.approx(0.035)  # 10 + 10 + 10 + 5 ms
    assert split["compute_s"] == pytest.approx(0.065)
    assert split["comm_s"] == pytest.approx(0.060)  # 10-50, 60-70, 90-100 ms
    # DDP: buckets waited for out of sight, from the last launch to the last completion.
    ddp = step_split(window, [[20_000_000, 0, 30_000_000], [70_000_000, 0, 90_000_000]])
    assert ddp["exposed_comm_s"] == pytest.approx(0.020) and ddp["compute_s"] == pytest.approx(0.080)


def _rank(node: int, compute: list[float], step: list[float], nvml: dict | None = None) -> RankMeasurement:
    r = RankMeasurement([1.0] * len(step), {}, {}, nvml=nvml)
    r.steps = {"node": node, "step_s": step, "compute_s": compute, "comm_s": [s - c for s, c in zip(step, compute)],
               "exposed_comm_s": [s - c for s, c in zip(step, compute)]}
    return r


def test_per_rank_figures_and_the_straggler_with_its_node() -> None:
    step = [0.10, 0.11, 0.10]
    ranks = [_rank(0, [0.050, 0.052, 0.051], step), _rank(0, [0.050, 0.051, 0.049], step),
             _rank(1, [0.051, 0.050, 0.050], step), _rank(1, [0.080, 0.082, 0.079], step)]
    m = Measurement([0.11, 0.11, 0.11], 1, ranks)
    figures = per_rank(m, "cpu")
    assert figures["node_of_rank"] == [0, 0, 1, 1] and figures["step_samples"][3] == step
    compute = figures["compute_s"]
    assert compute["values"] == [0.051, 0.050, 0.050, 0.080]
    assert (compute["max"], compute["max_rank"], compute["max_node"]) == (0.080, 3, 1)
    assert (compute["min"], compute["min_rank"], compute["min_node"]) == (0.050, 1, 0)
    assert compute["median"] == pytest.approx(0.0505)
    found = straggler(figures, 5.0)
    assert found["slowest"] == {"rank": 3, "node": 1, "lag_pct": pytest.approx(100 * (0.080 / 0.0505 - 1))}
    assert [s["rank"] for s in found["stragglers"]] == [3]
    # node 1's compute is the median of its ranks' (0.065); node 0's 0.0505; the median node's 0.05775
    assert [n["node"] for n in found["node_stragglers"]] == [1]
    line = slowest_rank_line({"straggler": found})
    assert line.startswith("rank 3 (node 1) +58.4% straggler; node 1 +12.6% straggler"), line
    calm = straggler(figures, 100.0)
    assert calm["stragglers"] == [] and calm["node_stragglers"] == []
    assert slowest_rank_line({"straggler": calm}) == "rank 3 (node 1) +58.4%"
    assert slowest_rank_line({}) is None and slowest_rank_line(None) is None


def test_nvml_figures_per_rank_only_when_every_rank_has_nvml() -> None:
    nv = [{"available": True, "power_mean_w": 300.0 + r, "sm_clock_mean_mhz": 1980.0 - 100 * r,
           "throttle_reasons": ["sw_power_cap"] if r else []} for r in range(2)]
    ranks = [_rank(0, [0.05], [0.1], nv[0]), _rank(0, [0.05], [0.1], nv[1])]
    figures = per_rank(Measurement([0.1], 1, ranks), "cpu")
    assert figures["power_w"]["values"] == [300.0, 301.0] and figures["sm_clock_mhz"]["min_rank"] == 1
    assert figures["throttle_reasons"] == [[], ["sw_power_cap"]]
    ranks[1].nvml = {"available": False, "reason": "no GPU"}
    assert "power_w" not in per_rank(Measurement([0.1], 1, ranks), "cpu")
    ranks[1].steps = None  # an older worker sent no per-step figures: no per_rank at all
    assert per_rank(Measurement([0.1], 1, ranks), "cpu") is None
