"""The real ISP core at a cluster's size, in one process: torch's fake process group.

A 7B-class model (InternLM2-7B's shapes) is built with isp_core at world size 1024 for several
(sp, wp) layouts, on the meta device (shapes only, no memory), and one training step runs:
forward, backward (with recompute where checkpointed), the reduce-scatter collection and the
data-parallel gradient reduction. The fake backend accepts every collective without moving
data; isp_core's own CommStats counts each call. The counts must equal what the planner's
replayed schedule issues, which must equal isp_core.comm_formula (checked inside build()).
About 10 s on 2 idle cores, up to a minute on a loaded host (the first layout pays torch's
meta-device import).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from bench.plan.compute import Rates, Work
from bench.plan.isp_schedule import Costs
from bench.plan.isp_schedule import build as build_isp
from isp_core import engine
from isp_core.comm_formula import predicted_comm
from isp_core.data import DataSpec, MicroBatch
from isp_core.engine import ISPSettings, ISPTrainer, build_isp_model
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology

WORLD = 1024
SEVEN_B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, vocab=92544, mlp_hidden=14336)


@pytest.fixture
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()


def _meta_batch(spec: DataSpec, dp: int, sp: int) -> MicroBatch:
    rows, length = spec.micro_bsz(dp), spec.seq_len
    meta = torch.device("meta")
    return MicroBatch(torch.empty(rows, length // sp, dtype=torch.long, device=meta),
                      torch.empty(rows, length // sp, dtype=torch.long, device=meta),
                      torch.empty(rows, length, dtype=torch.long, device=meta), None, None)


def _one_step(cfg: LlamaConfig, spec: DataSpec, sp: int, wp: int) -> dict:
    topo = ParallelTopology(WORLD, sp, wp, rank=0)
    isp = build_isp_model(cfg, topo, ISPSettings(overlap=True, memory_pool=True), dtype=torch.bfloat16,
                          device=torch.device("meta"))
    topo.stats.reset()
    trainer = ISPTrainer(isp)
    for _ in range(spec.micro_num):  # ISPTrainer.forward_backward without loss.item(): meta has no values
        mb = _meta_batch(spec, topo.dp, sp)
        isp.scheduler.before_forward()
        logits = isp.model(mb.tokens, mb.positions)
        loss = engine.vocab_parallel_cross_entropy(logits, mb.labels, topo.sequence).mean()
        isp.scheduler.before_backward()
        (loss * sp / spec.micro_num).backward()
        isp.scheduler.after_backward()
    trainer.reduce_gradients()
    return topo.stats.snapshot()


def _planned(cfg: LlamaConfig, spec: DataSpec, sp: int, wp: int) -> dict:
    unit = Rates(1e12, 1e12, 1e12, 1e12, 1e12, "any: only the calls are compared")
    work = Work(1, 2, cfg.hidden, cfg.mlp_hidden, 1, cfg.vocab, 1.0)
    sched = build_isp(cfg, spec, WORLD, sp, wp, True, 2, Costs(work, unit, lambda *_: 1e-6), host_sync=False)
    return sched.tally()


@pytest.mark.parametrize("sp,wp,checkpoint,micro_num", [(8, 64, 0.0, 1), (4, 128, 1.0, 1), (32, 8, 0.5, 2),
                                                        (1, 16, 0.0, 1)])
def test_counted_calls_and_bytes_equal_the_plan_at_1024_ranks(fake_world, monkeypatch, sp, wp, checkpoint, micro_num):
    # Full-size initial weights would take gigabytes: the meta device needs only their shapes.
    monkeypatch.setattr(engine, "init_full_tensor", lambda name, shape, seed: torch.empty(shape, device="meta"))
    cfg = LlamaConfig(**SEVEN_B, checkpoint=checkpoint)
    dp = WORLD // sp
    spec = DataSpec(seq_len=32768, global_batch=micro_num * dp, micro_num=micro_num, packed=False)
    counted = _one_step(cfg, spec, sp, wp)
    assert counted == _planned(cfg, spec, sp, wp)
    assert counted == predicted_comm(cfg, spec, WORLD, sp, wp, True, 2)
    # Sanity of scale: the weight group moved gigabytes, every kind the layout needs was used.
    assert counted["weight"]["all_gather"]["bytes"] > 10 * 2 ** 30
    assert ("sequence" in counted) == (sp > 1)
