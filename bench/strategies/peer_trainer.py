"""The trainer the peers share, and the single-process reference every strategy is checked against.

Gradient scaling. Every rank holds the same number of tokens per micro-batch, so the global
mean loss is the mean over ranks and micro-batches of each rank's mean over its own tokens.
Each rank back-propagates its own mean / micro_num. With Ulysses a rank's weight gradients
also carry what the other ranks' losses sent back through the attention all-to-all, so the
sum of all ranks' gradients is the gradient of the sum of their losses. FSDP2's
reduce-scatter and DDP's all-reduce both *average* over the world, giving exactly the
gradient of the global mean; the loss needs no factor sp (unlike ISP, whose vocab-parallel
loss is already the sequence group's mean on every rank). `train_step` returns the rank's own
mean loss; the mean over all ranks is the global mean loss (what the worker records).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.strategies.common import to_device
from isp_core.comm_stats import CommStats
from isp_core.data import DataSpec, MicroBatch, micro_batches
from isp_core.engine import build_reference_model
from isp_core.loss import vocab_parallel_cross_entropy
from isp_core.mixed_precision import build_optimizer
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology


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
        # float32 parameters (FSDP2's sharded masters included): plain AdamW; bfloat16 ones
        # (DDP, one process): float32 masters and AdamW state, as InternEvo trains.
        self.optimizer = build_optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)

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
        n = len(micro_batches)
        total = torch.zeros((), dtype=torch.float32, device=micro_batches[0].tokens.device)
        for i, mb in enumerate(micro_batches):
            with self._sync(last=i == n - 1):
                logits = self.model(mb.tokens, mb.positions, mb.cu_seqlens, mb.max_seqlen)  # [B, T, V]
                # The same memory-lean loss as ISP's (whole vocabulary here), so memory compares fairly.
                loss = vocab_parallel_cross_entropy(logits, self._local_labels(mb), None).mean()
                (loss / n).backward()
            total += loss.detach()  # on the device: no host sync per micro-batch
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (total / n).item()  # the step's one sync


def train_reference(cfg: LlamaConfig, spec: DataSpec, steps: int, seed: int = 0, lr: float = 1e-3,
                    device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> list[float]:
    """Per-step mean losses of one process training on the whole global batch in `dtype`
    (bfloat16: float32 masters and AdamW state, as every layout trains)."""
    device = torch.device(device or "cpu")
    trainer = PeerTrainer(build_reference_model(cfg, seed, dtype, device), None, None, lr)
    out = []
    for step in range(steps):
        batches = micro_batches(spec, step, dp=1, dp_rank=0, sp=1, sp_rank=0)
        to_device(batches, device)
        out.append(trainer.train_step(batches))
    return out


Wrap = Callable[[nn.Module, ParallelTopology, torch.device, torch.dtype], nn.Module]


def build_peer_trainer(strategy: str, wrap: Wrap, cfg: LlamaConfig, topo: ParallelTopology, seed: int,
                       dtype: torch.dtype, device: Optional[torch.device], lr: float) -> PeerTrainer:
    """The plain model with the reference's initial weights, handed to `wrap` (the strategy's
    sharding or replication) when there is more than one rank."""
    device = torch.device(device or "cpu")
    model = build_reference_model(cfg, seed, dtype, device)
    if topo.world_size > 1:
        model = wrap(model, topo, device, dtype)
    return PeerTrainer(model, strategy, topo, lr)
