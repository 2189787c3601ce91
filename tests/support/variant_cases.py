"""Rank functions for ISP's variants (issue 12): wp_unit, head, forward prefetch options, and
InternEvo's calling conventions. Module level so spawned processes import them."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from tests.support import isp_cases
from isp_core.attention import DistributedAttention, LocalAttention
from isp_core.collectives import _SeqAllToAll
from isp_core.comm_formula import predicted_comm
from isp_core.data import DataSpec, micro_batches
from isp_core.engine import ISPSettings, ISPTrainer, build_isp_model
from isp_core.head_embedding import EmbeddingWeightParallelCommunicator, HeadWeightParallelCommunicator
from isp_core.isp_communicator import ISPCommunicator
from isp_core.memory_pool import ISPCommModelConfig
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology

MODULES = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"]
FORWARD_ORDER = ["attention.wqkv", "attn", "attention.wo", "feed_forward.w1", "feed_forward.w3",
                 "feed_forward.w2"]
LAUNCHERS = {"wqkv": "attention.wqkv", "attn": "attn", "wo": "attention.wo", "w1": "feed_forward.w1"}


def check_variants(rank: int, world_size: int, cases: list[tuple]) -> list[str]:
    """Loss and every gradient against one process, for (sp, wp, settings kwargs, ckpt, micro)."""
    report = []
    for sp, wp, kwargs, ckpt, micro in cases:
        topo = isp_cases.topology(rank, world_size, sp, wp)
        isp = build_isp_model(isp_cases.model_config(ckpt), topo, ISPSettings(**kwargs))
        trainer = ISPTrainer(isp)
        loss = trainer.forward_backward(micro_batches(isp_cases.data_spec(micro), 0, topo.dp, topo.dp_rank, sp,
                                                      topo.sequence.rank))
        trainer.reduce_gradients()
        losses, grads, _ = isp_cases.reference(micro, 1)
        total = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(total)
        mean_loss = total.item() / world_size
        err, where = isp_cases.max_rel_error(isp, {n: p.grad for n, p in isp.model.named_parameters()}, grads)
        tag = f"sp={sp} wp={wp} ckpt={ckpt} micro={micro} {kwargs}"
        assert abs(mean_loss - losses[0]) <= isp_cases.TOL * abs(losses[0]), f"{tag}: loss {mean_loss} vs {losses[0]}"
        assert err <= isp_cases.TOL, f"{tag}: gradient of {where} off by {err:.2e} (relative)"
        report.append(tag)
    return report


def expected_events(layers: int, ckpt: int, unit: str, per: str, launch: str) -> list[tuple[str, str]]:
    """Where each gather, wait and release of one micro-step must happen, per option."""
    def units_of(b: int) -> list[str]:
        return [f"{b}.block"] if unit == "block" else [f"{b}.{m}" for m in MODULES]

    def unit_of(b: int, m: str) -> str:
        return f"{b}.block" if unit == "block" else f"{b}.{m}"

    order = [u for b in range(layers) for u in units_of(b)]
    block_of = {u: int(u.split(".")[0]) for u in order}
    ev: list[tuple[str, str]] = []
    pending: set[str] = set()
    held: set[str] = set()

    def launch_(u: str) -> None:
        if u not in pending and u not in held:
            pending.add(u)
            ev.append(("launch", u))

    def wait(u: str) -> None:
        if u not in held:
            launch_(u)
            pending.discard(u)
            held.add(u)
            ev.append(("wait", u))

    def release(u: str) -> None:
        if u in held:
            held.discard(u)
            ev.append(("release", u))

    def following(u: str) -> Optional[str]:
        i = order.index(u) + 1
        return order[i] if i < len(order) else None

    def run_block(b: int, recompute: bool) -> None:
        for m in FORWARD_ORDER:
            if per == "layer" and m == LAUNCHERS[launch]:
                target = b - 1 if recompute else b + 1
                if 0 <= target < layers:
                    for u in units_of(target):
                        launch_(u)
            if m == "attn":
                continue
            u = unit_of(b, m)
            wait(u)
            nxt = following(u)
            if per == "module" and not recompute and nxt:
                launch_(nxt)
            elif per == "module" and recompute:
                if nxt and block_of[nxt] == b:
                    launch_(nxt)
                elif b > 0:
                    launch_(units_of(b - 1)[0])
            if not recompute and (unit == "module" or m == MODULES[-1]):
                release(u)

    def backward_block(b: int) -> None:
        for m in reversed(MODULES):
            u = unit_of(b, m)
            wait(u)
            i = order.index(u)
            if i > 0 and block_of[order[i - 1]] >= ckpt:
                launch_(order[i - 1])
            if unit == "module" or m == MODULES[0]:
                release(u)

    if per == "layer":
        for u in units_of(0):
            launch_(u)
    for b in range(layers):
        run_block(b, recompute=False)
    for b in range(layers - 1, ckpt - 1, -1):
        backward_block(b)
    for b in range(ckpt - 1, -1, -1):
        if b == ckpt - 1:
            for u in (units_of(b) if per == "layer" else units_of(b)[:1]):
                launch_(u)
        run_block(b, recompute=True)
        backward_block(b)
    return ev


def record_events(rank: int, world_size: int, options: list[tuple]) -> list:
    """The schedule one micro-step produces, for (wp_unit, forward_overlap_per, launch, ckpt, pool)."""
    topo = ParallelTopology(world_size, sp=world_size, wp=world_size, rank=rank)
    spec = DataSpec(seq_len=16, global_batch=2, micro_num=1, packed=False, vocab=64)
    out = []
    for unit, per, launch, ckpt, pool in options:
        cfg = LlamaConfig(hidden=32, layers=3, heads=4, kv_heads=2, vocab=64, mlp_hidden=48, checkpoint=ckpt)
        isp = build_isp_model(cfg, topo, ISPSettings(overlap=True, memory_pool=pool, wp_unit=unit,
                                                     forward_overlap_per=per, launch_allgather_before=launch))
        isp.communicator.events = []
        ISPTrainer(isp).forward_backward(micro_batches(spec, 0, topo.dp, topo.dp_rank, topo.sp, topo.sequence.rank))
        out.append(((unit, per, launch, cfg.ckpt_blocks), list(isp.communicator.events)))
    return out


def counted_vs_predicted(rank: int, world_size: int, cases: list[tuple]) -> list[tuple]:
    """CommStats of one training step next to the formula, for (sp, wp, ckpt, micro, settings kwargs)."""
    out = []
    for sp, wp, ckpt, micro, kwargs in cases:
        topo = ParallelTopology(world_size, sp, wp, rank)
        cfg = LlamaConfig(hidden=32, layers=3, heads=4, kv_heads=2, vocab=64, mlp_hidden=48, checkpoint=ckpt)
        spec = DataSpec(seq_len=16, global_batch=8, micro_num=micro, packed=True, vocab=64)
        settings = ISPSettings(**kwargs)
        isp = build_isp_model(cfg, topo, settings)
        batches = micro_batches(spec, 0, topo.dp, topo.dp_rank, sp, topo.sequence.rank)
        topo.stats.reset()
        ISPTrainer(isp).train_step(batches)
        predicted = predicted_comm(cfg, spec, world_size, sp, wp, settings.overlap, element_size=4,
                                   wp_unit=settings.wp_unit, head=settings.head,
                                   embedding_backward_gather=settings.embedding_backward_gather)
        out.append(((sp, wp, ckpt, micro, kwargs), topo.stats.snapshot(), predicted))
    return out


# ---- InternEvo's calling conventions, with plain torch ProcessGroups ------------------------------

class _Recording(torch.nn.Module):
    """A local attention that records what DistributedAttention hands it, then runs LocalAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.calls = LocalAttention(causal=True), []

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append(([tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args], sorted(kwargs)))
        return self.inner(*args, **kwargs)


def seed_conventions(rank: int, world_size: int) -> dict:
    """Each packing, with and without cu_seqlens, positional (InternEvo's order) and keyword,
    through a DistributedAttention built on a plain ProcessGroup; outputs vs one process."""
    pg = dist.new_group(list(range(world_size)))
    S, H, HKV, D = 16, 4, 2, 8
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, S, h, D, generator=gen) for h in (H, HKV, HKV))
    chunk = slice(rank * S // world_size, (rank + 1) * S // world_size)
    cu, max_len = torch.tensor([0, 5, 11, S], dtype=torch.int32), 6
    full_k, full_v = k.repeat_interleave(H // HKV, 2), v.repeat_interleave(H // HKV, 2)
    reference = LocalAttention(causal=True)
    results = {}
    for varlen in (False, True):
        want = (reference(q, k, v, cu, cu, max_len, max_len) if varlen else reference(q, k, v))[:, chunk]
        calls = {
            "qkv": ((torch.stack([q, full_k, full_v], 2)[:, chunk],), (cu, max_len), {}),
            "q_kv": ((q[:, chunk], torch.stack([k, v], 2)[:, chunk]), (cu, cu, max_len, max_len), {}),
            "q_k_v": ((q[:, chunk], k[:, chunk], v[:, chunk]), (cu, cu, max_len, max_len), {}),
            "q_kv_keywords": ((), (), {"q": q[:, chunk], "kv": torch.stack([k, v], 2)[:, chunk],
                                        "cu_seqlens_q": cu, "cu_seqlens_k": cu,
                                        "max_seqlen_q": max_len, "max_seqlen_k": max_len}),
        }
        for name, (tensors, extra, kw) in calls.items():
            local = _Recording()
            attn = DistributedAttention(local, pg)
            kw = dict(kw) if varlen else {k_: v_ for k_, v_ in kw.items() if "seqlen" not in k_}
            out = attn(*tensors, *(extra if varlen else ()), **kw)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0, msg=f"{name} varlen={varlen}")
            results[f"{name}/{varlen}"] = local.calls
    # the seed's own form of the all-to-all: apply(group, scatter_idx, gather_idx, tensor)
    x = torch.randn(1, 2, 2 * world_size, 1, requires_grad=True)  # [B, S/sp, H, D]
    y = _SeqAllToAll.apply(pg, 2, 1, x)  # [B, S, H/sp, D]
    y.sum().backward()
    results["seq_all_to_all_shape"] = tuple(y.shape)
    return results


def communicators_take_process_groups(rank: int, world_size: int) -> dict:
    """ISPCommunicator, the head and embedding communicators built on plain ProcessGroups train
    exactly as the same model built on isp_core's CommGroups."""
    topo = ParallelTopology(world_size, sp=1, wp=world_size, rank=rank)
    cfg = LlamaConfig(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, mlp_hidden=48)
    spec = DataSpec(seq_len=16, global_batch=2 * world_size, micro_num=1, vocab=64)
    grads = []
    for plain in (False, True):
        isp = build_isp_model(cfg, topo, ISPSettings(overlap=False))
        if plain:
            pg = topo.weight.pg
            isp.communicator = ISPCommunicator(isp.model, ISPCommModelConfig(), overlap=True, process_group=pg)
            isp.model.output.communicator = isp.head_communicator = HeadWeightParallelCommunicator(pg, None)
            EmbeddingWeightParallelCommunicator(pg).register_module_hook(isp.model.tok_embeddings)
            from isp_core.isp_scheduler import ISPCommunicatorSchedulerHook
            isp.scheduler = ISPCommunicatorSchedulerHook(isp.communicator)
        trainer = ISPTrainer(isp)
        trainer.forward_backward(micro_batches(spec, 0, topo.dp, topo.dp_rank, 1, 0))
        grads.append({n: p.grad.tolist() for n, p in isp.model.named_parameters()})
    same = all(torch.allclose(torch.tensor(grads[0][n]), torch.tensor(grads[1][n]), rtol=1e-6, atol=1e-8)
               for n in grads[0])
    return {"same": same, "size": isp.communicator.process_group.size}


def process_group_cases(rank: int, world_size: int) -> dict:
    """Both ProcessGroup checks in one spawn."""
    return {"attention": seed_conventions(rank, world_size),
            "communicators": communicators_take_process_groups(rank, world_size)}
