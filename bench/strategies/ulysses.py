"""ulysses: DeepSpeed-Ulysses + ZeRO-3. The sequence is split over the sequence group with
`DistributedAttention` (the module ISP uses), and the weights are sharded by fully_shard over
the whole world, as for fsdp2. The head is the plain linear: each rank computes full-vocab
logits for its own tokens only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from bench.strategies import peer_formula
from bench.strategies.fsdp2 import master_model, shard_with_fsdp2
from bench.strategies.peer_trainer import PeerTrainer, build_peer_trainer
from isp_core.attention import DistributedAttention
from isp_core.data import DataSpec
from isp_core.engine import ISPSettings
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology


def wrap(model: nn.Module, topo: ParallelTopology, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Each block's attention Ulysses-style over the sequence group, then FSDP2 as for fsdp2."""
    model = master_model(model)
    for block in model.layers:
        block.attention.core = DistributedAttention(block.attention.core, topo.sequence)
    shard_with_fsdp2(model, topo.world, device, dtype)
    return model


def build_trainer(cfg: LlamaConfig, topo: ParallelTopology, settings: ISPSettings = ISPSettings(), seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                  lr: float = 1e-3) -> PeerTrainer:
    return build_peer_trainer("ulysses", wrap, cfg, topo, seed, dtype, device, lr)


def predicted_comm(cfg: LlamaConfig, spec: DataSpec, world_size: int, sp: int, wp: int, overlap: bool,
                   element_size: int, settings: Optional[ISPSettings] = None) -> peer_formula.Counts:
    return peer_formula.predicted_peer_comm("ulysses", cfg, spec, world_size, sp, element_size)
