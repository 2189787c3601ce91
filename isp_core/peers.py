"""PyTorch's own strategies beside ISP: the same model, initial weights, tokens and AdamW.

fsdp2    `torch.distributed.fsdp.fully_shard` on every block, then on the root (embedding,
         final norm, head), over all ranks: ZeRO-3 data parallelism, dp = world_size.
ddp      `torch.nn.parallel.DistributedDataParallel`: whole weights on every rank, the
         gradients all-reduced in buckets once per step (`no_sync` on all but the last
         micro-batch), dp = world_size.
ulysses  DeepSpeed-Ulysses + ZeRO-3: the sequence split over the sequence group with
         `DistributedAttention` (the same module ISP uses), and the weights sharded by
         fully_shard over the whole world, as for fsdp2. The head is the plain linear: each
         rank computes full-vocab logits for its own tokens only.

Gradient scaling. Every rank holds the same number of tokens per micro-batch, so the global
mean loss is the mean over ranks and micro-batches of each rank's mean over its own tokens.
Each rank back-propagates its own mean / micro_num. With Ulysses a rank's weight gradients
also carry what the other ranks' losses sent back through the attention all-to-all, so the
sum of all ranks' gradients is the gradient of the sum of their losses. FSDP2's
reduce-scatter and DDP's all-reduce both *average* over the world, giving exactly the
gradient of the global mean; the loss needs no factor sp (unlike ISP, whose vocab-parallel
loss is already the sequence group's mean on every rank). `train_step` returns the rank's own
mean loss; the mean over all ranks is the global mean loss (what the worker records).

Counting. FSDP2 issues its all-gathers and reduce-scatters through its `AllGather` and
`ReduceScatter` objects (`set_custom_all_gather` / `set_custom_reduce_scatter`); here
subclasses of its defaults that record the bytes, then call the default. DDP goes through a
registered comm hook that records the bucket, then runs the stock `allreduce_hook`. Nothing
of torch.distributed is replaced; tests compare these counts with the c10d ops seen at the
dispatcher and with isp_core.peer_formula.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
try:  # private module (torch 2.13): only used to count FSDP2's collectives
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
except ImportError:  # pragma: no cover - older or newer torch: FSDP2 runs, uncounted
    DefaultAllGather = DefaultReduceScatter = object  # type: ignore[misc,assignment]
    FSDP2_COUNTING = False
else:
    FSDP2_COUNTING = True
from torch.nn.parallel import DistributedDataParallel

from isp_core.attention import DistributedAttention, local_attention
from isp_core.comm_stats import CommStats
from isp_core.data import DataSpec, MicroBatch, micro_batches
from isp_core.engine import ISPSettings, ISPTrainer, build_isp_model, build_reference_model
from isp_core.model import LlamaConfig, LlamaModel
from isp_core.topology import CommGroup, ParallelTopology

PEERS = ("fsdp2", "ddp", "ulysses")
STRATEGIES = ("isp", *PEERS)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CountingAllGather(DefaultAllGather):
    """FSDP2's default all-gather, counted as the full output (nccl-tests' convention)."""

    def __init__(self, group: CommGroup) -> None:
        super().__init__()
        self.group = group

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                 async_op: bool = False) -> Any:
        self.group.stats.record(self.group.name, "all_gather", _nbytes(output_tensor))
        return super().__call__(output_tensor, input_tensor, group, async_op)


class CountingReduceScatter(DefaultReduceScatter):
    """FSDP2's default reduce-scatter, counted as the full input."""

    def __init__(self, group: CommGroup) -> None:
        super().__init__()
        self.group = group

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                 async_op: bool = False) -> Any:
        self.group.stats.record(self.group.name, "reduce_scatter", _nbytes(input_tensor))
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def counting_allreduce_hook(group: CommGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: count the bucket (the all-reduced buffer), then PyTorch's allreduce_hook."""
    group.stats.record(group.name, "all_reduce", _nbytes(bucket.buffer()))
    return allreduce_hook(group.pg, bucket)


# DDP compares the hook's annotations with the classes themselves; this module's postponed
# (string) annotations would fail that check.
counting_allreduce_hook.__annotations__.update(bucket=dist.GradBucket, group=CommGroup,
                                               **{"return": torch.futures.Future[torch.Tensor]})


def shard_with_fsdp2(model: LlamaModel, world: CommGroup, device: torch.device) -> None:
    """fully_shard each block, then the root, with FSDP2's defaults (blocks reshard after
    forward, the root does not) and counting collectives."""
    mesh = init_device_mesh(device.type, (world.size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not FSDP2_COUNTING:
        print("FSDP2 collectives cannot be counted with this torch: its bytes will not match the formula")
        return
    for module in [*model.layers, model]:
        module.set_custom_all_gather(CountingAllGather(world))
        module.set_custom_reduce_scatter(CountingReduceScatter(world))


class PeerTrainer:
    """Micro-steps with gradient accumulation, then AdamW; the wrapper does the communication.

    `model` is the plain LlamaModel (strategy None: the single-process reference), a
    DDP-wrapped one, or one sharded in place by fully_shard.
    """

    memory_pool = None  # the peers own no ISP memory pool

    def __init__(self, model: nn.Module, strategy: Optional[str], topo: Optional[ParallelTopology],
                 lr: float = 1e-3, weight_decay: float = 0.01) -> None:
        self.model, self.strategy, self.topo = model, strategy, topo
        self.stats = topo.stats if topo is not None else CommStats()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def _local_labels(self, mb: MicroBatch) -> torch.Tensor:
        """The labels of this rank's tokens: MicroBatch.labels holds the whole row."""
        width = mb.tokens.shape[1]
        rank = self.topo.sequence.rank if self.strategy == "ulysses" else 0
        return mb.labels[:, rank * width:(rank + 1) * width]

    def _sync(self, last: bool) -> Any:
        # DDP all-reduces once per step: the earlier micro-batches only accumulate locally.
        return self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last else nullcontext()

    def train_step(self, micro_batches: list[MicroBatch]) -> float:
        """One optimizer step; returns this rank's mean loss over its own tokens."""
        total, n = 0.0, len(micro_batches)
        for i, mb in enumerate(micro_batches):
            with self._sync(last=i == n - 1):
                logits = self.model(mb.tokens, mb.positions, mb.cu_seqlens, mb.max_seqlen)  # [B, T, V]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), self._local_labels(mb).flatten())
                (loss / n).backward()
            total += loss.item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / n


def build_peer_model(strategy: str, cfg: LlamaConfig, topo: ParallelTopology, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> nn.Module:
    if strategy not in PEERS:
        raise ValueError(f"unknown peer strategy {strategy!r}; allowed: {', '.join(PEERS)}")
    device = torch.device(device or "cpu")
    model = build_reference_model(cfg, seed, dtype, device)
    if topo.world_size == 1:  # nothing to communicate: every strategy is the plain model
        return model
    if strategy == "ddp":
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(topo.world, counting_allreduce_hook)
        return ddp
    if strategy == "ulysses":
        for block in model.layers:
            block.attention.core = DistributedAttention(partial(local_attention, backend=cfg.attention), topo.sequence)
    shard_with_fsdp2(model, topo.world, device)
    return model


def build_trainer(strategy: str, cfg: LlamaConfig, topo: ParallelTopology,
                  settings: ISPSettings = ISPSettings(), seed: int = 0, dtype: torch.dtype = torch.float32,
                  device: Optional[torch.device] = None, lr: float = 1e-3) -> ISPTrainer | PeerTrainer:
    """The trainer of any strategy; every one has `train_step(micro_batches) -> float`."""
    if strategy == "isp":
        return ISPTrainer(build_isp_model(cfg, topo, settings, seed=seed, dtype=dtype, device=device), lr=lr)
    if strategy in ("fsdp2", "ddp") and topo.sp != 1:
        raise ValueError(f"strategy {strategy} has no sequence split: sp must be 1, got {topo.sp}")
    return PeerTrainer(build_peer_model(strategy, cfg, topo, seed, dtype, device), strategy, topo, lr)


def reference_losses(cfg: LlamaConfig, spec: DataSpec, steps: int, seed: int = 0, lr: float = 1e-3,
                     device: Optional[torch.device] = None) -> list[float]:
    """Per-step mean losses of one process training on the whole global batch in fp32."""
    device = torch.device(device or "cpu")
    trainer = PeerTrainer(build_reference_model(cfg, seed, torch.float32, device), None, None, lr)
    out = []
    for step in range(steps):
        batches = micro_batches(spec, step, dp=1, dp_rank=0, sp=1, sp_rank=0)
        for mb in batches:
            for name in ("tokens", "positions", "labels", "cu_seqlens"):
                if getattr(mb, name) is not None:
                    setattr(mb, name, getattr(mb, name).to(device))
        out.append(trainer.train_step(batches))
    return out
