"""isp: InternEvo's ISP as isp_core implements it (weights over wp with prefetch, sequence over
sp with Ulysses attention, vocab-parallel head), and its variants (docs/isp-variants.md)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from isp_core.comm_formula import predicted_comm as _isp_formula
from isp_core.data import DataSpec
from isp_core.engine import ISPSettings, ISPTrainer, build_isp_model
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology


def build_trainer(cfg: LlamaConfig, topo: ParallelTopology, settings: ISPSettings = ISPSettings(), seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                  lr: float = 1e-3) -> ISPTrainer:
    return ISPTrainer(build_isp_model(cfg, topo, settings, seed=seed, dtype=dtype, device=device), lr=lr)


def predicted_comm(cfg: LlamaConfig, spec: DataSpec, world_size: int, sp: int, wp: int, overlap: bool,
                   element_size: int, settings: Optional[ISPSettings] = None) -> dict:
    settings = settings or ISPSettings()
    return _isp_formula(cfg, spec, world_size, sp, wp, overlap, element_size, wp_unit=settings.wp_unit,
                        head=settings.head, embedding_backward_gather=settings.embedding_backward_gather)


def settings_from(parallel: Any) -> ISPSettings:
    """The ISPSettings of a cell's `parallel` section (bench.config.schema.ParallelConfig)."""
    return ISPSettings(parallel.overlap, parallel.memory_pool, wp_unit=parallel.wp_unit, head=parallel.head,
                       forward_overlap_per=parallel.forward_overlap_per,
                       launch_allgather_before=parallel.launch_allgather_before,
                       embedding_backward_gather=parallel.embedding_backward_gather)
