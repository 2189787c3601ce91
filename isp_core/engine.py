"""The one place where the llama model and the ISP communicators meet, and the training step.

`build_isp_model` swaps the plain model's modules for their ISP forms (weight-parallel
linears, DistributedAttention, the sharded embedding and head), fills every shard from
the same deterministic full-weight initialisation a single process would use, and
attaches the communicators. `ISPTrainer.train_step` runs the micro-steps, reduces the
gradients over the data-parallel groups and steps AdamW on the local shards.

Gradient scaling. The vocab-parallel loss of a micro-batch is identical on every rank of a
sequence group, and each rank's backward yields the gradient contribution of its own
tokens. Summed over a sequence group these give that micro-batch's gradient; averaged over
data-parallel replicas, the global gradient. Weight gradients are averaged over the weight
group (reduce-scatter AVG, as in InternEvo) and then over the weight-data group, i.e. over
all world_size = dp x sp ranks, so each rank back-propagates loss x sp / micro_num. With the
gathered head each rank's loss is the mean over its own S/sp tokens, the group's losses sum
to sp x the group mean, and each rank back-propagates loss / micro_num.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from isp_core.attention import DistributedAttention
from isp_core.collectives import all_reduce_
from isp_core.data import MicroBatch
from isp_core.head_embedding import (HEAD_MODES, EmbeddingWeightParallelCommunicator, GatheredHeadCommunicator,
                                     HeadLinear, HeadWeightParallelCommunicator, ParallelEmbedding)
from isp_core.isp_communicator import ISPCommunicator
from isp_core.isp_scheduler import ISPCommunicatorSchedulerHook
from isp_core.linear import WeightParallelLinear
from isp_core.loss import vocab_parallel_cross_entropy
from isp_core.memory_pool import ISPCommModelConfig, MemoryPool
from isp_core.mixed_precision import build_optimizer, check_training_dtype
from isp_core.model import LlamaConfig, LlamaModel
from isp_core.topology import ParallelTopology

LINEARS = (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w1"),
           ("feed_forward", "w3"), ("feed_forward", "w2"))


@dataclass(frozen=True)
class ISPSettings:
    overlap: bool = False
    memory_pool: bool = False
    vocab_parallel_embedding: bool = True
    retain_out_sharded: bool = True
    wp_unit: str = "module"                # "module" | "block": what one weight all-gather moves
    head: str = "vocab_parallel"           # "vocab_parallel" | "gathered" (see head_embedding)
    forward_overlap_per: str = "layer"     # "layer" | "module": forward prefetch granularity
    launch_allgather_before: str = "wo"    # "wqkv" | "attn" | "wo" | "w1": launches the next block
    embedding_backward_gather: bool = True  # InternEvo gathers the embedding again in backward

    def __post_init__(self) -> None:
        if self.head not in HEAD_MODES:
            raise ValueError(f"head={self.head!r}: expected one of {list(HEAD_MODES)}")


def init_full_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter `name`, identical for every layout."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen) * 0.02


def build_reference_model(cfg: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                          device: Optional[torch.device] = None) -> LlamaModel:
    """The plain single-process model with the same initial weights as every ISP layout."""
    model = LlamaModel(cfg, device=torch.device("meta")).to_empty(device=device or "cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(init_full_tensor(name, tuple(param.shape), seed))
    return model.to(dtype)


@dataclass
class ISPModel:
    model: LlamaModel
    topology: ParallelTopology
    communicator: ISPCommunicator
    scheduler: ISPCommunicatorSchedulerHook
    head_communicator: HeadWeightParallelCommunicator
    embedding_communicator: EmbeddingWeightParallelCommunicator

    def weight_parallel_params(self) -> list[nn.Parameter]:
        """Parameters held as weight-group shards (reduced over the weight-data group)."""
        return [p for m in self.model.modules() if isinstance(m, (WeightParallelLinear, ParallelEmbedding))
                for p in m.parameters(recurse=False)]

    def replicated_params(self) -> list[nn.Parameter]:
        """Parameters every rank holds whole (the norms; reduced over the world)."""
        sharded = {id(p) for p in self.weight_parallel_params()}
        return [p for p in self.model.parameters() if id(p) not in sharded]


def _shard_of(full: torch.Tensor, module: nn.Module, topo: ParallelTopology) -> torch.Tensor:
    wp, rank = topo.wp, topo.weight.rank
    if isinstance(module, ParallelEmbedding) and not module.vocab_parallel:
        return full.chunk(wp, dim=1)[rank]
    if isinstance(module, (WeightParallelLinear, ParallelEmbedding)):
        return full.chunk(wp, dim=0)[rank]
    return full


def build_isp_model(cfg: LlamaConfig, topo: ParallelTopology, settings: ISPSettings = ISPSettings(),
                    seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> ISPModel:
    check_training_dtype(dtype)
    device = torch.device(device or "cpu")
    meta = torch.device("meta")
    model = LlamaModel(cfg, device=meta)
    for block in model.layers:
        for parent_name, attr in LINEARS:
            parent = getattr(block, parent_name)
            plain = getattr(parent, attr)
            setattr(parent, attr, WeightParallelLinear(plain.in_features, plain.out_features, topo.wp, device=meta))
        block.attention.core = DistributedAttention(block.attention.core, topo.sequence)
    model.tok_embeddings = ParallelEmbedding(cfg.vocab, cfg.hidden, topo.wp, settings.vocab_parallel_embedding,
                                             device=meta)
    model.output = HeadLinear(cfg.hidden, cfg.vocab, topo.wp, device=meta)
    model.to_empty(device=device)
    owners = {name: module for name, module in model.named_modules()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = owners[name.rsplit(".", 1)[0]]
            full_shape = _full_shape(module, param, name)
            param.copy_(_shard_of(init_full_tensor(name, full_shape, seed), module, topo))
    model.to(dtype)

    conf = ISPCommModelConfig(dtype=dtype, device=device, activation_checkpointing=cfg.checkpoint)
    comm = ISPCommunicator(model, conf, overlap=settings.overlap, enable_memory_pool=settings.memory_pool,
                           process_group=topo.weight, wp_unit=settings.wp_unit,
                           forward_overlap_per=settings.forward_overlap_per,
                           launch_allgather_before=settings.launch_allgather_before)
    head_comm = (GatheredHeadCommunicator(topo.weight) if settings.head == "gathered" else
                 HeadWeightParallelCommunicator(topo.weight, topo.sequence, settings.retain_out_sharded))
    model.output.communicator = head_comm
    emb_comm = EmbeddingWeightParallelCommunicator(topo.weight, settings.vocab_parallel_embedding,
                                                   settings.embedding_backward_gather)
    emb_comm.register_module_hook(model.tok_embeddings)
    return ISPModel(model, topo, comm, ISPCommunicatorSchedulerHook(comm), head_comm, emb_comm)


def _full_shape(module: nn.Module, param: nn.Parameter, name: str) -> tuple[int, ...]:
    if isinstance(module, WeightParallelLinear):
        return tuple(module.full_shape) if name.endswith("weight") else (module.out_features,)
    if isinstance(module, ParallelEmbedding):
        return (module.vocab, module.hidden)
    return tuple(param.shape)


class ISPTrainer:
    """Micro-steps with gradient accumulation, data-parallel reduction, AdamW on the shards."""

    def __init__(self, isp: ISPModel, lr: float = 1e-3, weight_decay: float = 0.01) -> None:
        self.isp = isp
        # bfloat16 shards step through float32 masters and AdamW state (isp_core.mixed_precision).
        self.optimizer = build_optimizer(isp.model.parameters(), lr=lr, weight_decay=weight_decay)

    @property
    def memory_pool(self) -> Optional[MemoryPool]:
        """The communicator's pool of gathered-weight buffers (None when it runs without one)."""
        return self.isp.communicator.memory_pool

    def forward_backward(self, micro_batches: list[MicroBatch]) -> float:
        """Accumulate the gradients of all micro-steps; returns this data-parallel group's mean loss."""
        isp = self.isp
        total = torch.zeros((), dtype=torch.float32, device=micro_batches[0].tokens.device)
        for mb in micro_batches:
            isp.scheduler.before_forward()
            logits = isp.model(mb.tokens, mb.positions, mb.cu_seqlens, mb.max_seqlen)
            loss, scale = self._loss(logits, mb.labels)
            isp.scheduler.before_backward()
            (loss * scale / len(micro_batches)).backward()
            isp.scheduler.after_backward()
            total += loss.detach()  # on the device: no host sync per micro-batch
        return (total / len(micro_batches)).item()  # the step's one sync

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The micro-batch loss this rank reports, and the factor its backward takes (see the
        module docstring: sp for the sequence group's mean, 1 for this rank's own tokens)."""
        comm, group = self.isp.head_communicator, self.isp.topology.sequence
        # vocab_parallel_cross_entropy with no group is the memory-lean loss of whole-vocabulary logits.
        if not comm.vocab_parallel_loss:  # gathered head: [B, S/sp, V] for this rank's tokens
            part = labels.shape[1] // group.size
            own = labels[:, group.rank * part:(group.rank + 1) * part]
            return vocab_parallel_cross_entropy(logits, own, None).mean(), 1
        if not comm.retain_out_sharded or group.size == 1:  # [B, S, V] on every rank
            return vocab_parallel_cross_entropy(logits, labels, None).mean(), group.size
        return vocab_parallel_cross_entropy(logits, labels, group).mean(), group.size

    def reduce_gradients(self) -> None:
        """Average shard gradients over the weight-data group and whole ones over the world."""
        topo = self.isp.topology
        for params, group in ((self.isp.weight_parallel_params(), topo.weight_data),
                              (self.isp.replicated_params(), topo.world)):
            grads = [p.grad for p in params if p.grad is not None]
            if group.size == 1 or not grads:
                continue
            flat = _flatten_dense_tensors(grads)
            all_reduce_(flat, group, op="avg", label=f"grad_sync.{group.name}")
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)

    def train_step(self, micro_batches: list[MicroBatch]) -> float:
        loss = self.forward_backward(micro_batches)
        self.reduce_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss
