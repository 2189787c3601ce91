"""ddp: `torch.nn.parallel.DistributedDataParallel`, whole weights on every rank, the gradients
all-reduced in buckets once per step (`no_sync` on all but the last micro-batch), dp = world_size.

Counting goes through a registered comm hook that records the bucket, then does what the stock
`allreduce_hook` does (divide, all-reduce, unwrap in one `then`), its one callback also marking
the bucket's completion in the launch log (DDP's reducer waits for it in C++, out of our sight).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bench.strategies import peer_formula
from bench.strategies.peer_trainer import PeerTrainer, build_peer_trainer
from isp_core.data import DataSpec
from isp_core.engine import ISPSettings
from isp_core.model import LlamaConfig
from isp_core.topology import CommGroup, ParallelTopology


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def counting_allreduce_hook(group: CommGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: count the bucket (the all-reduced buffer), then PyTorch's allreduce_hook:
    average by dividing first (no overflow), all-reduce, hand the tensor back."""
    tensor = bucket.buffer()
    token = group.stats.record(group.name, "all_reduce", _nbytes(tensor), group.ranks)
    tensor.div_(group.size)

    def finished(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        group.stats.done(token)
        return fut.value()[0]

    return dist.all_reduce(tensor, group=group.pg, async_op=True).get_future().then(finished)


# DDP compares the hook's annotations with the classes themselves; this module's postponed
# (string) annotations would fail that check.
counting_allreduce_hook.__annotations__.update(bucket=dist.GradBucket, group=CommGroup,
                                               **{"return": torch.futures.Future[torch.Tensor]})


def wrap(model: nn.Module, topo: ParallelTopology, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Whole weights on every rank; the counting hook all-reduces DDP's buckets."""
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(topo.world, counting_allreduce_hook)
    return ddp


def build_trainer(cfg: LlamaConfig, topo: ParallelTopology, settings: ISPSettings = ISPSettings(), seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                  lr: float = 1e-3) -> PeerTrainer:
    return build_peer_trainer("ddp", wrap, cfg, topo, seed, dtype, device, lr)


def predicted_comm(cfg: LlamaConfig, spec: DataSpec, world_size: int, sp: int, wp: int, overlap: bool,
                   element_size: int, settings: Optional[ISPSettings] = None) -> peer_formula.Counts:
    return peer_formula.predicted_peer_comm("ddp", cfg, spec, world_size, sp, element_size)
