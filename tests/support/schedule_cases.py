"""Rank functions recording the ISP prefetch schedule and memory-pool use on real gloo ranks."""

from __future__ import annotations

import torch

from isp_core.data import DataSpec, micro_batches
from isp_core.engine import ISPSettings, ISPTrainer, build_isp_model
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology

MODULES = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"]


def expected_schedule(layers: int, ckpt: int) -> list[tuple[str, str]]:
    """The order of gathers ('launch'), waits and releases one micro-step should produce."""
    ev: list[tuple[str, str]] = []

    def block(b: int, what: str) -> list[tuple[str, str]]:
        return [(what, f"{b}.{m}") for m in MODULES]

    # forward: block 0 up front, block b+1 right before block b's output projection
    ev += block(0, "launch")
    for b in range(layers):
        for m in MODULES:
            if m == "attention.wo" and b + 1 < layers:
                ev += block(b + 1, "launch")
            ev += [("wait", f"{b}.{m}"), ("release", f"{b}.{m}")]
    # backward of the blocks that are not checkpointed: one module ahead
    order = [(b, m) for b in range(layers - 1, ckpt - 1, -1) for m in reversed(MODULES)]
    for i, (b, m) in enumerate(order):
        if i == 0:
            ev.append(("launch", f"{b}.{m}"))
        ev.append(("wait", f"{b}.{m}"))
        if i + 1 < len(order):
            ev.append(("launch", f"{order[i + 1][0]}.{order[i + 1][1]}"))
        ev.append(("release", f"{b}.{m}"))
    # recompute + backward of checkpointed blocks: one block ahead, weights kept for backward
    for b in range(ckpt - 1, -1, -1):
        if b == ckpt - 1:
            ev += block(b, "launch")
        for m in MODULES:
            if m == "attention.wo" and b > 0:
                ev += block(b - 1, "launch")
            ev.append(("wait", f"{b}.{m}"))
        ev += [("release", f"{b}.{m}") for m in reversed(MODULES)]
    return ev


def record_schedule(rank: int, world_size: int, checkpoints: list[float], memory_pool: bool) -> list:
    topo = ParallelTopology(world_size, sp=world_size, wp=world_size, rank=rank)
    spec = DataSpec(seq_len=16, global_batch=2, micro_num=1, packed=False, vocab=64)
    out = []
    for ckpt in checkpoints:
        cfg = LlamaConfig(hidden=32, layers=3, heads=4, kv_heads=2, vocab=64, mlp_hidden=48, checkpoint=ckpt)
        isp = build_isp_model(cfg, topo, ISPSettings(overlap=True, memory_pool=memory_pool))
        isp.communicator.events = []
        ISPTrainer(isp).forward_backward(micro_batches(spec, 0, topo.dp, topo.dp_rank, topo.sp, topo.sequence.rank))
        out.append((cfg.ckpt_blocks, list(isp.communicator.events)))
    return out


def pool_accounting(rank: int, world_size: int) -> dict:
    """Bytes the pool holds, and that a full step leaves no buffer owned."""
    topo = ParallelTopology(world_size, sp=world_size, wp=world_size, rank=rank)
    cfg = LlamaConfig(hidden=32, layers=3, heads=4, kv_heads=2, vocab=64, mlp_hidden=48, checkpoint=0.5)
    isp = build_isp_model(cfg, topo, ISPSettings(overlap=True, memory_pool=True))
    pool = isp.communicator.memory_pool
    spec = DataSpec(seq_len=16, global_batch=4, micro_num=2, vocab=64)
    trainer = ISPTrainer(isp)
    for step in range(2):
        trainer.train_step(micro_batches(spec, step, topo.dp, topo.dp_rank, topo.sp, topo.sequence.rank))
        assert pool.in_use() == [], f"buffers still owned after step {step}: {pool.in_use()}"
    shapes = {name: tuple(s) for name, s in isp.communicator.model_conf.module_shapes.items()}
    return {"bytes": pool.bytes_held(), "shapes": shapes,
            "element_size": torch.tensor([], dtype=torch.float32).element_size()}


def counted_vs_predicted(rank: int, world_size: int, cases: list[tuple]) -> list[tuple]:
    """CommStats of one real training step next to the formula, for each case."""
    from isp_core.comm_formula import predicted_comm

    out = []
    for sp, wp, ckpt, micro, overlap, packed in cases:
        topo = ParallelTopology(world_size, sp, wp, rank)
        cfg = LlamaConfig(hidden=32, layers=3, heads=4, kv_heads=2, vocab=64, mlp_hidden=48, checkpoint=ckpt)
        spec = DataSpec(seq_len=16, global_batch=8, micro_num=micro, packed=packed, vocab=64)
        isp = build_isp_model(cfg, topo, ISPSettings(overlap=overlap, memory_pool=overlap))
        batches = micro_batches(spec, 0, topo.dp, topo.dp_rank, sp, topo.sequence.rank)
        topo.stats.reset()
        ISPTrainer(isp).train_step(batches)
        predicted = predicted_comm(cfg, spec, world_size, sp, wp, overlap, element_size=4)
        out.append(((sp, wp, ckpt, micro, overlap, packed), topo.stats.snapshot(), predicted))
    return out


def chunks_and_prerequisites(rank: int, world_size: int) -> dict:
    """Two model chunks behind one communicator, with a forward-prefetch prerequisite callback.

    Each chunk is a whole model here; the communicator must keep their schedules apart
    (switch_current_model_chunk) and call the prerequisite before every forward prefetch.
    """
    from isp_core.isp_communicator import ISPCommunicator
    from isp_core.isp_scheduler import ISPCommunicatorSchedulerHook
    from isp_core.memory_pool import ISPCommModelConfig

    topo = ParallelTopology(world_size, sp=1, wp=world_size, rank=rank)
    cfg = LlamaConfig(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, mlp_hidden=48, checkpoint=0.5)
    spec = DataSpec(seq_len=16, global_batch=2 * world_size, micro_num=1, packed=True, vocab=64)
    chunks = [build_isp_model(cfg, topo, ISPSettings(overlap=False), seed=s) for s in (0, 1)]
    comm = ISPCommunicator([c.model for c in chunks], ISPCommModelConfig(activation_checkpointing=0.5),
                           overlap=True, enable_memory_pool=True, process_group=topo.weight)
    hook = ISPCommunicatorSchedulerHook(comm)
    seen: list[tuple[str, int]] = []
    comm.register_prerequisite_for_forward_prefetch_hooks(
        lambda block: seen.append(("prerequisite", id(block))))
    comm.events = []
    batches = micro_batches(spec, 0, topo.dp, topo.dp_rank, 1, 0)
    grads = []
    for chunk_id, chunk in enumerate(chunks):
        for mb in batches:
            hook.before_forward(chunk_id)
            logits = chunk.model(mb.tokens, mb.positions, mb.cu_seqlens, mb.max_seqlen)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb.labels.flatten())
            hook.before_backward(chunk_id)
            loss.backward()
            hook.after_backward()
        # plain lists: tensors sent through the result queue outlive their process badly
        grads.append(chunks[chunk_id].model.layers[1].feed_forward.w2.weight.grad.tolist())
    blocks = [[id(b) for b in c.model.layers] for c in chunks]
    return {"seen": seen, "blocks": blocks, "events": len(comm.events), "grads": grads,
            "launches": [e for e in comm.events if e[0] == "launch"]}


def chunk_reference(rank: int, world_size: int) -> list:
    """The same two chunks, each with its own synchronous communicator: the gradients to match."""
    topo = ParallelTopology(world_size, sp=1, wp=world_size, rank=rank)
    cfg = LlamaConfig(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, mlp_hidden=48, checkpoint=0.5)
    spec = DataSpec(seq_len=16, global_batch=2 * world_size, micro_num=1, packed=True, vocab=64)
    out = []
    for seed in (0, 1):
        isp = build_isp_model(cfg, topo, ISPSettings(overlap=False), seed=seed)
        for mb in micro_batches(spec, 0, topo.dp, topo.dp_rank, 1, 0):
            logits = isp.model(mb.tokens, mb.positions, mb.cu_seqlens, mb.max_seqlen)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb.labels.flatten()).backward()
        out.append(isp.model.layers[1].feed_forward.w2.weight.grad.tolist())
    return out


def wrapper_case(rank: int, world_size: int) -> dict:
    """ISPCommunicatorWrapper: prerequisites reach every communicator; handlers are visible and collected."""
    from isp_core.isp_scheduler import ISPCommunicatorWrapper

    topo = ParallelTopology(world_size, sp=1, wp=world_size, rank=rank)
    cfg = LlamaConfig(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, mlp_hidden=48)
    models = [build_isp_model(cfg, topo, ISPSettings(overlap=True, memory_pool=True), seed=s) for s in (0, 1)]
    wrapper = ISPCommunicatorWrapper([m.communicator for m in models])
    wrapper.register_prerequisite_for_forward_prefetch_hooks(lambda block: None)
    spec = DataSpec(seq_len=16, global_batch=world_size, micro_num=1, vocab=64)
    (mb,) = micro_batches(spec, 0, topo.dp, topo.dp_rank, 1, 0)
    first = models[0]
    first.scheduler.before_forward()
    loss = torch.nn.functional.cross_entropy(first.model(mb.tokens, mb.positions, mb.cu_seqlens,
                                                        mb.max_seqlen).flatten(0, 1), mb.labels.flatten())
    first.scheduler.before_backward()
    loss.backward()
    pending = sorted(wrapper.reduce_scatter_handlers)
    wrapper.collect_reduce_scatter()
    wrapper.reset_lazy_pools()
    return {"prerequisites": [len(m.communicator._forward_prefetch_prerequisites) for m in models],
            "pending": pending, "after": len(wrapper.reduce_scatter_handlers),
            "grad_set": first.model.layers[0].attention.wqkv.weight.grad.abs().sum().item() > 0}
