"""fsdp2: `torch.distributed.fsdp.fully_shard` on every block, then on the root (embedding, final
norm, head), over all ranks: ZeRO-3 data parallelism, dp = world_size.

Counting. FSDP2 issues its all-gathers and reduce-scatters through its `AllGather` and
`ReduceScatter` objects (`set_custom_all_gather` / `set_custom_reduce_scatter`); here
subclasses of its defaults record the bytes, then call the default; an asynchronous launch's
Work comes back wrapped, so the launch log sees when FSDP2 waits for it. Nothing of
torch.distributed is replaced; tests compare these counts with the c10d ops seen at the
dispatcher and with bench/strategies/peer_formula.py.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
try:  # private module (torch 2.13): only used to count FSDP2's collectives
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
except ImportError:  # pragma: no cover - older or newer torch: FSDP2 runs, uncounted
    DefaultAllGather = DefaultReduceScatter = object  # type: ignore[misc,assignment]
    FSDP2_COUNTING = False
else:
    FSDP2_COUNTING = True

from bench.strategies import peer_formula
from bench.strategies.peer_trainer import PeerTrainer, build_peer_trainer
from isp_core.data import DataSpec
from isp_core.engine import ISPSettings
from isp_core.model import LlamaConfig, LlamaModel
from isp_core.comm_stats import CommStats
from isp_core.topology import CommGroup, ParallelTopology


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _LoggedWork(dist.Work):
    """An asynchronous launch's Work whose wait() is logged (FSDP2 checks isinstance Work)."""

    def __init__(self, work: dist.Work, stats: CommStats, token: int) -> None:
        super().__init__()
        self._work, self._stats, self._token = work, stats, token

    def wait(self, timeout: Any = None) -> bool:
        self._stats.waiting(self._token)
        result = self._work.wait() if timeout is None else self._work.wait(timeout)
        self._stats.done(self._token)
        return result


def _logged(work: Optional[dist.Work], stats: CommStats, token: int) -> Optional[dist.Work]:
    if work is None:  # a synchronous launch: it returned complete
        stats.done(token)
        return None
    return _LoggedWork(work, stats, token)


class CountingAllGather(DefaultAllGather):
    """FSDP2's default all-gather, counted as the full output (nccl-tests' convention)."""

    def __init__(self, group: CommGroup) -> None:
        super().__init__()
        self.group = group

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                 async_op: bool = False) -> Any:
        g = self.group
        token = g.stats.record(g.name, "all_gather", _nbytes(output_tensor), g.ranks, blocking=not async_op)
        return _logged(super().__call__(output_tensor, input_tensor, group, async_op), g.stats, token)


class CountingReduceScatter(DefaultReduceScatter):
    """FSDP2's default reduce-scatter, counted as the full input."""

    def __init__(self, group: CommGroup) -> None:
        super().__init__()
        self.group = group

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                 async_op: bool = False) -> Any:
        g = self.group
        token = g.stats.record(g.name, "reduce_scatter", _nbytes(input_tensor), g.ranks, blocking=not async_op)
        return _logged(super().__call__(output_tensor, input_tensor, group, op, async_op), g.stats, token)


def master_model(model: LlamaModel) -> LlamaModel:
    """The model with float32 parameters holding its (possibly bfloat16-rounded) initial values:
    FSDP2 keeps these as the sharded masters and casts to the compute dtype itself."""
    return model.float()


def shard_with_fsdp2(model: LlamaModel, world: CommGroup, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> None:
    """fully_shard each block, then the root, with FSDP2's defaults (blocks reshard after
    forward, the root does not) and counting collectives. With a low-precision `dtype` the
    float32 shards are the master weights (and AdamW state): FSDP2 all-gathers them in `dtype`
    and reduce-scatters the gradients in `dtype`, as ISP does with its bfloat16 shards."""
    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype) if dtype != torch.float32 \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if not FSDP2_COUNTING:
        print("FSDP2 collectives cannot be counted with this torch: its bytes will not match the formula")
        return
    for module in [*model.layers, model]:
        module.set_custom_all_gather(CountingAllGather(world))
        module.set_custom_reduce_scatter(CountingReduceScatter(world))


def wrap(model: nn.Module, topo: ParallelTopology, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """float32 master shards, each block then the root fully_shard-ed over the world."""
    model = master_model(model)
    shard_with_fsdp2(model, topo.world, device, dtype)
    return model


def build_trainer(cfg: LlamaConfig, topo: ParallelTopology, settings: ISPSettings = ISPSettings(), seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                  lr: float = 1e-3) -> PeerTrainer:
    return build_peer_trainer("fsdp2", wrap, cfg, topo, seed, dtype, device, lr)


def predicted_comm(cfg: LlamaConfig, spec: DataSpec, world_size: int, sp: int, wp: int, overlap: bool,
                   element_size: int, settings: Optional[ISPSettings] = None) -> peer_formula.Counts:
    return peer_formula.predicted_peer_comm("fsdp2", cfg, spec, world_size, sp, element_size)
