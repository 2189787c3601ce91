"""Seconds per collective: measured curves first, else alpha-beta on the link a group spans."""

from __future__ import annotations

import dataclasses

import pytest

from bench.plan.hardware import Fabric, Hardware, Link, MeasuredCurve
from bench.plan.links import LinkModel, place


def _hw(curves=(), **fabric) -> Hardware:
    return Hardware("t", 80e9, 0.0, 0.0, None, 1.0, {"bfloat16": 1000.0}, {"matmul": 1.0, "attention": 1.0},
                    1000.0, 1.0, None, 8, Link(100.0, 10.0), Link(10.0, 20.0), tuple(curves),
                    fabric=Fabric(**{"nics_per_node": 8, **fabric}))


def test_groups_are_placed_on_the_nodes_and_nics_their_ranks_span():
    assert (place(list(range(8)), 8).where, place(list(range(8, 16)), 8).nodes) == ("intra", 1)
    wide = place([0, 8, 16, 24], 8)
    assert (wide.where, wide.nodes, wide.per_node, wide.nics) == ("inter", 4, 1, 1)
    assert place(list(range(16)), 8).per_node == 8
    # 4 NICs for 8 GPUs (GPU j on NIC j // 2): neighbours share one, a stride of 4 reaches two
    assert place([0, 1, 8, 9], 8, 4).nics == 1 and place([0, 4, 8, 12], 8, 4).nics == 2


def test_within_a_node_by_hand():
    links = LinkModel(_hw(base_latency_s=5e-6))
    # 8 ranks in a node: 5 us + 7 steps x 10 us + 1e9 B x 7/8 / 100 GB/s
    assert links.time_s("all_gather", 1e9, place(list(range(8)), 8)) == pytest.approx(5e-6 + 7 * 10e-6 + 0.00875)
    assert links.time_s("all_gather", 1e9, place([3], 8)) == 0.0


def test_a_ring_across_nodes_runs_on_every_nic_its_ranks_reach():
    """16 ranks on 2 nodes, one 10 GB/s NIC per GPU: 8 rings, 80 GB/s, not one NIC's 10."""
    ring = LinkModel(_hw(algorithm="ring"))
    lat = 28 * 10e-6 + 2 * 20e-6  # 30 steps, 2 of them between nodes (NCCL's tuning model)
    assert ring.time_s("all_reduce", 1e9, place(list(range(16)), 8)) == pytest.approx(lat + 1e9 * 30 / 16 / 80e9)
    # one GPU per node in each of the 8 concurrent groups: one NIC each ...
    one = place([0, 8, 16, 24], 8)
    assert ring.time_s("all_gather", 1e9, one) == pytest.approx(3 * 20e-6 + 1e9 * 3 / 4 / 10e9)
    # ... and with 4 NICs per 8 GPUs two such groups share a NIC: half its rate
    half = LinkModel(_hw(algorithm="ring", nics_per_node=4))
    assert half.time_s("all_gather", 1e9, place([0, 8, 16, 24], 8, 4)) == pytest.approx(3 * 20e-6 + 1e9 * 3 / 4 / 5e9)
    # a fabric that is not rail-optimized sends rings through a spine oversubscribed 2:1
    spine = LinkModel(_hw(algorithm="ring", rail_optimized=False, oversubscription=2.0))
    assert spine.time_s("all_gather", 1e9, one) == pytest.approx(3 * 20e-6 + 1e9 * 3 / 4 / 5e9)


def test_tree_all_reduce_and_auto_choosing_the_faster():
    tree = LinkModel(_hw(algorithm="tree"))
    big = place(list(range(64)), 8)  # 8 nodes, 8 NICs each: 80 GB/s per node
    lat = 2 * (7 * 10e-6 + 3 * 20e-6)
    assert tree.time_s("all_reduce", 1e9, big) == pytest.approx(lat + 2e9 / (80e9 * 0.92))
    # on 2 nodes a tree moves the bytes once per node (beyond a ring's 2(n-1)/n), NVLink then limits
    two = place(list(range(16)), 8)
    assert tree.time_s("all_reduce", 1e9, two) == pytest.approx(2 * (7 * 10e-6 + 20e-6) + 2 * 7 / 8 * 1e9 / 100e9)
    auto, ring = LinkModel(_hw()), LinkModel(_hw(algorithm="ring"))
    small = place(list(range(0, 1024, 8)), 8)  # 128 nodes, one rank each: latency-bound, the tree wins
    assert auto.time_s("all_reduce", 1e3, small) < ring.time_s("all_reduce", 1e3, small) / 10
    assert auto.time_s("all_reduce", 1e9, two) == min(tree.time_s("all_reduce", 1e9, two),
                                                      ring.time_s("all_reduce", 1e9, two))


def test_all_to_all_across_nodes_sends_each_ranks_share_through_the_nics():
    links = LinkModel(_hw())
    # 2 nodes of 8: 7/16 of the bytes on NVLink, 8/16 through each rank's NIC share (8 NICs / 8 GPUs)
    a2a = links.time_s("all_to_all", 1.6e9, place(list(range(16)), 8))
    assert a2a == pytest.approx(7 * 10e-6 + 8 * 20e-6 + 0.8e9 / 10e9)


def test_a_measured_curve_wins_and_is_interpolated_in_log_log():
    curve = MeasuredCurve("all_gather", 8, (1e3, 1e6), (1e-5, 1e-3))
    links = LinkModel(_hw([curve]))
    where = place(list(range(8)), 8)
    assert links.time_s("all_gather", 1e3, where) == pytest.approx(1e-5)
    assert links.time_s("all_gather", 10 ** 4.5, where) == pytest.approx(1e-4)   # halfway in log-log
    assert links.time_s("all_gather", 2e6, where) == pytest.approx(2e-3)          # bandwidth beyond the last size
    assert links.source("all_gather", where).startswith("measured")
    assert links.source("reduce_scatter", where) == "intra link"


def test_busy_latency_is_added_per_call_for_the_nearest_calibrated_rank_count():
    hw = dataclasses.replace(_hw(), busy_latency_s={2: 1e-3, 4: 5e-3})
    where = place(list(range(8)), 8)
    idle = LinkModel(_hw()).time_s("all_gather", 1e6, where)
    assert LinkModel(hw, ranks_per_node=2).time_s("all_gather", 1e6, where) == pytest.approx(idle + 1e-3)
    assert LinkModel(hw, ranks_per_node=8).time_s("all_gather", 1e6, where) == pytest.approx(idle + 5e-3)
    assert LinkModel(hw, ranks_per_node=1).time_s("all_gather", 1e6, where) == pytest.approx(idle + 1e-3)
