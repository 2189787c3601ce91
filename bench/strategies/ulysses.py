"""ulysses: DeepSpeed-Ulysses + ZeRO-3. The sequence is split over the sequence group with
`DistributedAttention` (the module ISP uses), and the weights are sharded by fully_shard over
the whole world, as for fsdp2. The head is the plain linear: each rank computes full-vocab
logits for its own tokens only.
"""

from __future__ import annotations

from typing import Optional

import torch

from bench.strategies import peer_formula
from bench.strategies.fsdp2 import master_model, shard_with_fsdp2
from bench.strategies.peer_trainer import PeerTrainer
from isp_core.attention import DistributedAttention
from isp_core.data import DataSpec
from isp_core.engine import ISPSettings, build_reference_model
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology


def build_trainer(cfg: LlamaConfig, topo: ParallelTopology, settings: ISPSettings = ISPSettings(), seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                  lr: float = 1e-3) -> PeerTrainer:
    device = torch.device(device or "cpu")
    model = build_reference_model(cfg, seed, dtype, device)
    if topo.world_size > 1:
        model = master_model(model)
        for block in model.layers:
            block.attention.core = DistributedAttention(block.attention.core, topo.sequence)
        shard_with_fsdp2(model, topo.world, device, dtype)
    return PeerTrainer(model, "ulysses", topo, lr)


def predicted_comm(cfg: LlamaConfig, spec: DataSpec, world_size: int, sp: int, wp: int, overlap: bool,
                   element_size: int, settings: Optional[ISPSettings] = None) -> peer_formula.Counts:
    return peer_formula.predicted_peer_comm("ulysses", cfg, spec, world_size, sp, element_size)
