"""The event replay on hand-checkable schedules, and the ISP/peer schedules against the formulas."""

from __future__ import annotations

import pytest

from bench.plan.compute import Rates, Work
from bench.plan.isp_schedule import Costs, IspKnobs
from bench.plan.isp_schedule import build as build_isp
from bench.plan.peer_schedule import build as build_peer
from bench.plan.replay import Schedule, replay
from isp_core.data import DataSpec
from isp_core.model import LlamaConfig


def test_async_gather_hides_behind_compute():
    s = Schedule(host_sync=False)
    ag = s.comm("ag", "weight", "all_gather", 100, 2.0, sync=False)  # t 0..2
    s.compute("a", 3.0)                                               # t 0..3
    s.wait(ag)
    s.compute("b", 1.0)                                               # t 3..4
    t = replay(s)
    assert t.step_s == 4.0 and t.exposed_comm_s() == 0.0 and t.comm_s() == 2.0 and t.compute_s() == 4.0


def test_sync_collective_is_fully_exposed_and_delays_compute():
    s = Schedule(host_sync=True)
    s.compute("a", 1.0)                                               # 0..1
    s.comm("a2a", "sequence", "all_to_all", 10, 0.5, sync=True, needs_compute=True)  # 1..1.5
    s.compute("b", 2.0)                                               # 1.5..3.5
    t = replay(s)
    assert t.step_s == 3.5 and t.exposed_comm_s() == 0.5
    assert t.comm_time_by_kind() == {"all_to_all": 0.5}


def test_a_long_prefetch_is_exposed_by_what_it_overruns():
    s = Schedule(host_sync=False)
    ag = s.comm("ag", "weight", "all_gather", 1, 5.0, sync=False)     # 0..5
    s.compute("a", 2.0)                                               # 0..2
    s.wait(ag)
    s.compute("b", 1.0)                                               # 5..6
    t = replay(s)
    assert t.step_s == 6.0 and t.exposed_comm_s() == 3.0


def test_host_sync_delays_a_launch_until_the_host_gets_there():
    for host_sync, expected in ((True, 3.0), (False, 2.0)):
        s = Schedule(host_sync=host_sync)
        s.compute("a", 1.0)                                           # 0..1
        ag = s.comm("ag", "weight", "all_gather", 1, 2.0, sync=False)  # host: 1..3, GPU: 0..2
        s.wait(ag)
        s.compute("b", 0.0)
        assert replay(s).step_s == expected


def test_one_stream_runs_its_calls_in_issue_order():
    s = Schedule(host_sync=False)
    first = s.comm("rs1", "weight", "reduce_scatter", 1, 1.0, sync=False)
    second = s.comm("rs2", "weight", "reduce_scatter", 1, 1.0, sync=False)
    s.wait(first, second)
    s.compute("end", 0.0)
    t = replay(s)
    assert (t.start[first], t.start[second], t.step_s) == (0.0, 1.0, 2.0)


# ISP and peer schedules ---------------------------------------------------------------------------
CFG = dict(hidden=64, layers=4, heads=4, kv_heads=2, vocab=512, mlp_hidden=176)
RATES = Rates(1e9, 1e9, 1e9, 1e9, 1e9, "test")


def _costs(comm_s: float) -> Costs:
    cfg = LlamaConfig(**CFG)
    work = Work(64, 4, cfg.hidden, cfg.mlp_hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.vocab, 1e6)
    return Costs(work, RATES, lambda kind, group, nbytes: comm_s)


@pytest.mark.parametrize("world,sp,wp", [(1, 1, 1), (2, 2, 2), (4, 2, 4), (4, 4, 2), (8, 2, 8), (8, 8, 1)])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("checkpoint", [0.0, 0.5, 1.0])
def test_isp_schedule_issues_exactly_the_formulas_communication(world, sp, wp, overlap, checkpoint):
    # build() raises when the schedule's calls or bytes differ from isp_core.comm_formula.
    cfg = LlamaConfig(**CFG, checkpoint=checkpoint)
    spec = DataSpec(seq_len=128, global_batch=2 * world, micro_num=2)
    sched = build_isp(cfg, spec, world, sp, wp, overlap, 4, _costs(1e-4), host_sync=True)
    t = replay(sched)
    assert t.step_s >= t.compute_s() > 0


@pytest.mark.parametrize("strategy,world,sp", [("fsdp2", 4, 1), ("ddp", 4, 1), ("ulysses", 4, 4), ("ulysses", 4, 2),
                                               ("fsdp2", 1, 1)])
def test_peer_schedules_issue_exactly_the_formulas_communication(strategy, world, sp):
    cfg = LlamaConfig(**CFG, checkpoint=0.5)
    spec = DataSpec(seq_len=128, global_batch=2 * world, micro_num=2)
    for host_sync in (True, False):
        build_peer(strategy, cfg, spec, world, sp, 4, _costs(1e-4), host_sync=host_sync, param_elements=1000)


def test_free_communication_leaves_only_compute_and_overlap_hides_gathers():
    cfg = LlamaConfig(**CFG)
    spec = DataSpec(seq_len=128, global_batch=8, micro_num=2)
    free = replay(build_isp(cfg, spec, 4, 1, 4, True, 4, _costs(0.0), host_sync=False))
    assert free.step_s == pytest.approx(free.compute_s()) and free.exposed_comm_s() == 0.0
    # The same gathers, with and without prefetch: overlap must expose less of them.
    on = replay(build_isp(cfg, spec, 4, 1, 4, True, 4, _costs(1e-5), host_sync=False))
    off = replay(build_isp(cfg, spec, 4, 1, 4, False, 4, _costs(1e-5), host_sync=False))
    assert on.exposed_comm_s() < off.exposed_comm_s() and on.step_s < off.step_s


def test_unknown_variants_are_refused_not_guessed():
    with pytest.raises(ValueError, match="wp_unit"):
        IspKnobs(wp_unit="layer").check()


@pytest.mark.parametrize("knobs", [IspKnobs(wp_unit="block"), IspKnobs(head="gathered"),
                                   IspKnobs(wp_unit="block", head="gathered", forward_overlap_per="module"),
                                   IspKnobs(embedding_backward_gather=False)])
@pytest.mark.parametrize("overlap,checkpoint", [(False, 0.5), (True, 0.0), (True, 1.0)])
def test_isp_variants_issue_the_formulas_communication(knobs, overlap, checkpoint):
    cfg = LlamaConfig(**CFG, checkpoint=checkpoint)
    spec = DataSpec(seq_len=128, global_batch=8, micro_num=2)
    t = replay(build_isp(cfg, spec, 4, 2, 2, overlap, 4, _costs(1e-4), host_sync=False, knobs=knobs))
    assert t.step_s >= t.compute_s() > 0  # build() checked the calls against the formula


def test_block_units_gather_five_times_less_often_and_the_gathered_head_drops_the_logits_all_to_all():
    cfg = LlamaConfig(**CFG)
    spec = DataSpec(seq_len=128, global_batch=8, micro_num=1)
    module = build_isp(cfg, spec, 4, 2, 2, True, 4, _costs(1e-4), host_sync=False).tally()
    block = build_isp(cfg, spec, 4, 2, 2, True, 4, _costs(1e-4), host_sync=False,
                      knobs=IspKnobs(wp_unit="block")).tally()
    gathered = build_isp(cfg, spec, 4, 2, 2, True, 4, _costs(1e-4), host_sync=False,
                         knobs=IspKnobs(head="gathered")).tally()
    assert module["weight"]["all_gather"]["calls"] - 4 == 5 * (block["weight"]["all_gather"]["calls"] - 4)
    assert module["weight"]["all_gather"]["bytes"] == block["weight"]["all_gather"]["bytes"]
    assert "all_reduce" not in gathered["sequence"]
    assert gathered["sequence"]["all_to_all"]["calls"] == module["sequence"]["all_to_all"]["calls"] - 2


def test_internevo_overlaps_the_data_parallel_all_reduce_and_zero1_broadcasts_the_partitions():
    from bench.plan.grad_sync import Optim

    cfg = LlamaConfig(**CFG)
    spec = DataSpec(seq_len=128, global_batch=16, micro_num=2)
    kind = lambda kind, group, nbytes: nbytes / 1e8 if group == "weight_data" else 0.0  # noqa: E731
    costs = Costs(_costs(0.0).work, RATES, kind)
    bench = build_isp(cfg, spec, 8, 1, 1, True, 4, costs, host_sync=False)
    # buckets of 64 Ki elements (256 KiB of float32): the model's 1.2 MB of gradients in five (a
    # 7B model fills 15 of InternEvo's 512 Mi elements)
    evo = build_isp(cfg, spec, 8, 1, 1, True, 4, costs, host_sync=False, optim=Optim("internevo", 4, 64 << 10))
    b, e = replay(bench), replay(evo)
    assert b.exposed_comm_s() == pytest.approx(999424 / 1e8)  # one blocking all-reduce after the backward
    assert e.exposed_comm_s() < b.exposed_comm_s() / 2        # buckets hide behind the last backward
    tally = evo.tally()
    assert tally["weight_data"]["all_reduce"]["bytes"] == bench.tally()["weight_data"]["all_reduce"]["bytes"] \
        + bench.tally()["world"]["all_reduce"]["bytes"]  # norms ride in the buckets
    assert tally["zero1"]["broadcast"]["calls"] == 4 and "world" not in tally
    assert tally["weight_data"]["all_reduce"]["calls"] == 5
    # each bucket is flattened before it goes and copied back after it was waited for
    names = [op.name for op in evo.ops]
    assert names.count("ar.bucket.flatten") == names.count("ar.bucket.copy_back") == 5


@pytest.mark.parametrize("point", ["wqkv", "attn", "wo", "w1"])
def test_every_launch_point_keeps_the_calls_and_earlier_launches_hide_more(point):
    cfg = LlamaConfig(**CFG)
    spec = DataSpec(seq_len=128, global_batch=8, micro_num=2)
    t = replay(build_isp(cfg, spec, 4, 2, 4, True, 4, _costs(2e-5), host_sync=False,
                         knobs=IspKnobs(launch_allgather_before=point)))
    late = replay(build_isp(cfg, spec, 4, 2, 4, True, 4, _costs(2e-5), host_sync=False,
                            knobs=IspKnobs(launch_allgather_before="w1")))
    assert t.exposed_comm_s() <= late.exposed_comm_s() + 1e-12


def test_host_time_per_call_delays_the_step_but_is_neither_compute_nor_communication():
    s = Schedule(host_sync=True, call_overhead_s=0.25)
    s.compute("a", 1.0)                                                              # 0..1
    s.comm("a2a", "sequence", "all_to_all", 1, 0.5, sync=True, needs_compute=True)  # host 1..1.25, a2a ..1.75
    s.compute("b", 1.0)                                                              # 1.75..2.75
    t = replay(s)
    assert t.step_s == 2.75 and t.compute_s() == 2.0 and t.exposed_comm_s() == 0.5


@pytest.mark.parametrize("checkpoint", [0.0, 1.0])
def test_per_module_forward_prefetch_keeps_the_calls(checkpoint):
    cfg = LlamaConfig(**CFG, checkpoint=checkpoint)
    spec = DataSpec(seq_len=128, global_batch=8, micro_num=2)
    knobs = IspKnobs(forward_overlap_per="module")
    t = replay(build_isp(cfg, spec, 4, 2, 4, True, 4, _costs(2e-5), host_sync=False, knobs=knobs))
    assert t.step_s >= t.compute_s() > 0  # build() checked the calls against the formula
