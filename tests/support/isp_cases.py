"""Rank functions for the ISP equivalence tests (module level so spawned processes import them).

Every case builds the ISP model for one layout and setting, trains on the shared token
stream and compares with a plain single-process model built from the same initial weights.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

from isp_core.collectives import all_gather
from isp_core.data import DataSpec, micro_batches
from isp_core.engine import ISPSettings, ISPTrainer, build_isp_model, build_reference_model
from isp_core.head_embedding import ParallelEmbedding
from isp_core.linear import WeightParallelLinear
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology

TOL = 1e-5  # max |ours - reference| <= TOL * max |reference|, per tensor


def model_config(checkpoint: float = 0.0) -> LlamaConfig:
    # 4 heads and 2 kv heads: sp=4 exercises kv-head expansion; every size divides by 4.
    return LlamaConfig(hidden=32, layers=3, heads=4, kv_heads=2, vocab=64, mlp_hidden=48, checkpoint=checkpoint)


def data_spec(micro_num: int, packed: bool = True) -> DataSpec:
    return DataSpec(seq_len=16, global_batch=8, micro_num=micro_num, packed=packed, seed=3, vocab=64)


@lru_cache(maxsize=None)
def reference(micro_num: int, steps: int, packed: bool = True) -> tuple[list[float], dict, dict]:
    """Losses per step, gradients of the first step, parameters after `steps` AdamW steps."""
    torch.manual_seed(0)
    model = build_reference_model(model_config(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    spec, losses, first_grads = data_spec(micro_num, packed), [], {}
    for step in range(steps):
        batches = micro_batches(spec, step, dp=1, dp_rank=0, sp=1, sp_rank=0)
        total = 0.0
        for mb in batches:
            logits = model(mb.tokens, mb.positions, mb.cu_seqlens, mb.max_seqlen)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb.labels.flatten())
            (loss / len(batches)).backward()
            total += loss.item()
        losses.append(total / len(batches))
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, first_grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def full_tensor(isp, name: str, local: torch.Tensor) -> torch.Tensor:
    """Reassemble a parameter (or its gradient) from the weight-group shards."""
    module = dict(isp.model.named_modules())[name.rsplit(".", 1)[0]]
    if isinstance(module, ParallelEmbedding):
        return all_gather(local, isp.topology.weight, dim=0 if module.vocab_parallel else 1).wait()
    if isinstance(module, WeightParallelLinear):
        return all_gather(local, isp.topology.weight, dim=0).wait()
    return local


def max_rel_error(isp, tensors: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, local in tensors.items():
        full = full_tensor(isp, name, local)
        err = ((full - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-30)).item()
        if err > worst:
            worst, where = err, name
    return worst, where


_topologies: dict[tuple[int, int], ParallelTopology] = {}


def topology(rank: int, world_size: int, sp: int, wp: int) -> ParallelTopology:
    if (sp, wp) not in _topologies:  # new_group is collective: every rank builds the same ones
        _topologies[(sp, wp)] = ParallelTopology(world_size, sp, wp, rank)
    return _topologies[(sp, wp)]


def check_gradients(rank: int, world_size: int, layouts: list[tuple[int, int]]) -> list[str]:
    """Loss and every gradient against the reference, over the whole setting matrix."""
    report = []
    settings = [(False, False), (True, False), (True, True)]
    for (sp, wp), (overlap, pool), ckpt, micro in itertools.product(layouts, settings, (0.0, 0.5, 1.0), (1, 2)):
        topo = topology(rank, world_size, sp, wp)
        # Alternate the embedding sharding and the head output layout so both forms are covered.
        vocab_parallel = (ckpt != 0.5)
        isp = build_isp_model(model_config(ckpt), topo, ISPSettings(overlap, pool, vocab_parallel,
                                                                      retain_out_sharded=(micro == 2 or ckpt != 1.0)))
        trainer = ISPTrainer(isp)
        loss = trainer.forward_backward(micro_batches(data_spec(micro), 0, topo.dp, topo.dp_rank, sp,
                                                      topo.sequence.rank))
        trainer.reduce_gradients()
        losses, grads, _ = reference(micro, 1)
        global_loss = torch.tensor([loss], dtype=torch.float64)
        torch.distributed.all_reduce(global_loss)
        global_loss = global_loss.item() / world_size
        err, where = max_rel_error(isp, {n: p.grad for n, p in isp.model.named_parameters()}, grads)
        tag = f"sp={sp} wp={wp} overlap={overlap} pool={pool} ckpt={ckpt} micro={micro} vocab_par={vocab_parallel}"
        assert abs(global_loss - losses[0]) <= TOL * abs(losses[0]), f"{tag}: loss {global_loss} vs {losses[0]}"
        assert err <= TOL, f"{tag}: gradient of {where} off by {err:.2e} (relative)"
        report.append(f"{tag}: grad err {err:.1e}")
    return report


def check_training(rank: int, world_size: int, layouts: list[tuple[int, int]]) -> list[float]:
    """Losses of 3 steps and the parameters after them, against the reference."""
    out = []
    for sp, wp in layouts:
        topo = topology(rank, world_size, sp, wp)
        isp = build_isp_model(model_config(0.5), topo, ISPSettings(overlap=True, memory_pool=True))
        trainer = ISPTrainer(isp, lr=1e-3, weight_decay=0.01)
        spec = data_spec(2)
        losses = [trainer.train_step(micro_batches(spec, step, topo.dp, topo.dp_rank, sp, topo.sequence.rank))
                  for step in range(3)]
        t = torch.tensor(losses, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        ref_losses, _, ref_params = reference(2, 3)
        assert torch.allclose(t / world_size, torch.tensor(ref_losses, dtype=torch.float64), rtol=TOL), \
            f"sp={sp} wp={wp}: losses {(t / world_size).tolist()} vs {ref_losses}"
        err, where = max_rel_error(isp, {n: p.detach() for n, p in isp.model.named_parameters()}, ref_params)
        assert err <= TOL, f"sp={sp} wp={wp}: parameter {where} off by {err:.2e} after 3 steps"
        out.append(err)
    return out
