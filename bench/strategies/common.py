"""What every strategy builds from a cell config: the model shape, the token stream, the dtype,
and micro-batches moved to the device. One place, so no two strategies can disagree."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from isp_core.data import DataSpec, MicroBatch
from isp_core.model import LlamaConfig

if TYPE_CHECKING:
    from bench.config.cell import CellConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config(cell: CellConfig) -> LlamaConfig:
    m = cell.model
    return LlamaConfig(hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads, vocab=m.vocab,
                       mlp_hidden=m.mlp_hidden, checkpoint=m.checkpoint, attention=cell.run.attention)


def data_spec(cell: CellConfig) -> DataSpec:
    d = cell.data
    return DataSpec(d.seq_len, d.global_batch, d.micro_num, d.packed, d.seed, cell.model.vocab)


def to_device(batches: list[MicroBatch], device: torch.device) -> list[MicroBatch]:
    """Move every tensor of the micro-batches to `device` (in place; returns them)."""
    for mb in batches:
        for name in ("tokens", "positions", "labels", "cu_seqlens"):
            value = getattr(mb, name)
            if value is not None:
                setattr(mb, name, value.to(device, non_blocking=True))
    return batches
