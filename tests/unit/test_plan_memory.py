"""The memory model against what torch really keeps: saved activations and the pool's buffers."""

from __future__ import annotations

import pytest
import torch

from bench.plan.memory import activation_bytes_per_token, isp_memory, peer_memory
from isp_core.comm_formula import _linear_shapes
from isp_core.memory_pool import ISPCommModelConfig, MemoryPool
from isp_core.model import Block, LlamaConfig


def _saved_bytes(cfg: LlamaConfig, tokens: int, dtype: torch.dtype) -> int:
    """Bytes autograd saves for one block's backward (storages counted once, weights excluded)."""
    torch.manual_seed(0)
    block = Block(cfg).to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = torch.randn(1, tokens, cfg.hidden, dtype=dtype, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() != x.untyped_storage().data_ptr():
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, torch.arange(tokens).unsqueeze(0), None, None)
    return sum(seen.values())


@pytest.mark.parametrize("shape", [dict(hidden=128, heads=4, kv_heads=2, mlp_hidden=352),
                                   dict(hidden=256, heads=8, kv_heads=8, mlp_hidden=1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_matches_saved_tensors(shape, dtype):
    cfg = LlamaConfig(layers=1, vocab=256, **shape)
    tokens = 256
    measured = _saved_bytes(cfg, tokens, dtype)
    predicted = activation_bytes_per_token(cfg, 4 if dtype == torch.float32 else 2) * tokens
    assert predicted == pytest.approx(measured, rel=0.05)


def test_pool_component_is_the_real_pools_two_block_buffers():
    cfg = LlamaConfig(hidden=128, layers=4, heads=4, kv_heads=2, vocab=512, mlp_hidden=352)
    names = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
    shapes = {n: torch.Size((numel, 1)) for n, numel in zip(names, _linear_shapes(cfg))}
    pool = MemoryPool(ISPCommModelConfig(dtype=torch.float32, module_shapes=shapes))
    plan = isp_memory(cfg, 64, wp=4, sp=1, overlap=True, memory_pool=True, E=4, micro_num=1, runtime=0.0)
    head_table = cfg.vocab * cfg.hidden * 4  # gathered beside the pool at the head
    assert plan.moments["end of backward"]["gathered_weights"] == pool.bytes_held()["all_gather"]
    assert plan.moments["end of forward"]["gathered_weights"] == pool.bytes_held()["all_gather"] + head_table


def test_shards_shrink_with_wp_and_overlap_holds_every_full_gradient_until_backward_ends():
    cfg = LlamaConfig(hidden=256, layers=8, heads=8, kv_heads=4, vocab=4096, mlp_hidden=704)
    small = isp_memory(cfg, 128, wp=8, sp=1, overlap=False, memory_pool=False, E=2, micro_num=1, runtime=0.0)
    big = isp_memory(cfg, 128, wp=1, sp=1, overlap=False, memory_pool=False, E=2, micro_num=1, runtime=0.0)
    assert small.components["weight_shards"] < big.components["weight_shards"] / 4
    held = isp_memory(cfg, 128, wp=8, sp=1, overlap=True, memory_pool=False, E=2, micro_num=1, runtime=0.0)
    full_grads = cfg.layers * sum(_linear_shapes(cfg)) * 2
    assert held.moments["end of backward"]["gradients"] > full_grads
    assert small.moments["end of backward"]["gradients"] < full_grads / 4


def test_checkpointing_cuts_activations_and_runtime_is_added_once():
    cfg = dict(hidden=256, layers=8, heads=8, kv_heads=4, vocab=4096, mlp_hidden=704)
    args = dict(wp=2, sp=2, overlap=True, memory_pool=True, E=2, micro_num=1)
    none = isp_memory(LlamaConfig(**cfg), 4096, runtime=0.0, **args)
    full = isp_memory(LlamaConfig(**cfg, checkpoint=1.0), 4096, runtime=0.0, **args)
    with_runtime = isp_memory(LlamaConfig(**cfg), 4096, runtime=1e9, **args)
    assert full.components["activations"] < none.components["activations"] / 3
    assert with_runtime.peak_bytes == pytest.approx(none.peak_bytes + 1e9)


def test_ddp_keeps_everything_whole_fsdp_shards_it():
    cfg = LlamaConfig(hidden=256, layers=8, heads=8, kv_heads=4, vocab=4096, mlp_hidden=704)
    total = 8 * (sum(_linear_shapes(cfg)) + 512) + 2 * 4096 * 256 + 256
    block = sum(_linear_shapes(cfg)) + 512
    ddp = peer_memory("ddp", cfg, 128, 8, 2, 1, 0.0, total, 2 * 4096 * 256, block, gpu=True)
    fsdp = peer_memory("fsdp2", cfg, 128, 8, 2, 1, 0.0, total, 2 * 4096 * 256, block, gpu=True)
    assert ddp.components["weight_shards"] == total * 2
    assert fsdp.components["weight_shards"] == pytest.approx(total * 4 / 8)  # float32 shards: the masters


# The model against the CPU allocator's own accounting, a whole ISP step at world size 1 --------
def _allocator_step(cfg: LlamaConfig, dtype: torch.dtype, micro_num: int) -> tuple[int, int]:
    """(bytes the optimizer keeps after a step, peak bytes the second step allocates above what
    was held before it), from torch's CPU allocator events (tests/unit/test_loss_memory.py)."""
    from isp_core.data import DataSpec, micro_batches
    from isp_core.engine import ISPSettings, ISPTrainer, build_isp_model
    from isp_core.topology import ParallelTopology
    from tests.unit.test_loss_memory import cpu_peak_bytes

    topo = ParallelTopology(1, 1, 1, 0)
    trainer = ISPTrainer(build_isp_model(cfg, topo, ISPSettings(), dtype=dtype))
    spec = DataSpec(seq_len=256, global_batch=micro_num, micro_num=micro_num, packed=True, vocab=cfg.vocab)
    trainer.train_step(micro_batches(spec, 0, 1, 0, 1, 0))
    opt = trainer.optimizer
    tensors = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    tensors += getattr(opt, "masters", [])
    state = sum(t.numel() * t.element_size() for t in tensors)
    return state, cpu_peak_bytes(lambda: trainer.train_step(micro_batches(spec, 1, 1, 0, 1, 0)))


@pytest.mark.parametrize("dtype,checkpoint,micro_num", [(torch.float32, 0.0, 1), (torch.bfloat16, 0.0, 2),
                                                        (torch.float32, 0.5, 2), (torch.bfloat16, 1.0, 1)])
def test_a_whole_step_against_the_cpu_allocator(dtype, checkpoint, micro_num):
    """Optimizer state (float32 masters for bfloat16, AdamW moments) exactly, and the step's peak
    above the persistent tensors (activations per checkpoint mode, logits and loss, gradients,
    the step's float32 copies and AdamW's temporaries) within 5%."""
    cfg = LlamaConfig(hidden=128, layers=4, heads=4, kv_heads=2, vocab=2048, mlp_hidden=352, checkpoint=checkpoint)
    E = 4 if dtype == torch.float32 else 2
    state, peak = _allocator_step(cfg, dtype, micro_num)
    plan = isp_memory(cfg, 256, wp=1, sp=1, overlap=False, memory_pool=False, E=E, micro_num=micro_num, runtime=0.0)
    parts = plan.moments[plan.moment]
    assert parts["optimizer_state"] == pytest.approx(state, rel=0.001)
    transient = plan.allocated_bytes - parts["weight_shards"] - parts["optimizer_state"]
    assert transient == pytest.approx(peak, rel=0.05), (plan.moment, parts)
