"""Seconds per collective: measured curves first, else alpha-beta on the link a group spans."""

from __future__ import annotations

import dataclasses

import pytest

from bench.plan.hardware import Hardware, Link, MeasuredCurve
from bench.plan.links import LinkModel, place


def _hw(curves=()) -> Hardware:
    return Hardware("t", 80e9, 0.0, 0.0, None, 1.0, {"bfloat16": 1000.0}, {"matmul": 1.0, "attention": 1.0},
                    1000.0, 1.0, None, 8, Link(100.0, 10.0), Link(10.0, 20.0), tuple(curves))


def test_groups_are_placed_on_the_nodes_their_ranks_span():
    assert (place(list(range(8)), 8).where, place(list(range(8, 16)), 8).nodes) == ("intra", 1)
    wide = place([0, 8, 16, 24], 8)
    assert (wide.where, wide.nodes, wide.per_node) == ("inter", 4, 1)
    assert place(list(range(16)), 8).per_node == 8


def test_alpha_beta_by_hand():
    links = LinkModel(_hw())
    # 8 ranks in a node: 7 steps x 10 us + 1e9 B x 7/8 / 100 GB/s
    assert links.time_s("all_gather", 1e9, place(list(range(8)), 8)) == pytest.approx(7 * 10e-6 + 0.00875)
    # all-reduce over 2 nodes of 8: 30 steps x 20 us + 1e9 x 2 x 15/16 / 10 GB/s (the NIC)
    assert links.time_s("all_reduce", 1e9, place(list(range(16)), 8)) == pytest.approx(30 * 20e-6 + 0.1875)
    # all-to-all over 2 nodes of 8: 7/16 of the bytes on NVLink, 8/16 on the NIC, the slower wins
    a2a = links.time_s("all_to_all", 1.6e9, place(list(range(16)), 8))
    assert a2a == pytest.approx(15 * 20e-6 + 0.8e9 / 10e9)
    assert links.time_s("all_gather", 1e9, place([3], 8)) == 0.0


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
