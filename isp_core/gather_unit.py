"""What one weight all-gather brings in, and how its gradients go back: the unit of ISP's schedule.

wp_unit="module" (InternEvo): one unit per weight-parallel linear. Its weight (and bias)
shard is all-gathered on its own and its full gradient reduce-scattered on its own.

wp_unit="block" (FSDP2-style): one unit per block holding every weight-parallel linear of
the block. Each rank concatenates its row shards of all of them into one flat buffer
(copy-in), one all-gather returns [wp, F] (F = that flat size), and each linear's full
weight is copied out of the rank-major rows. Backward packs each full gradient into its
columns of one [wp, F] buffer and, once the block's last linear is done, one
reduce-scatter returns this rank's flat [F] from which each shard's gradient is a view.
The shards, the optimizer and the numerics are those of "module": only the number of
collectives changes (5 all-gathers of one block become 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.profiler import record_function

from isp_core.collectives import Pending, all_gather, reduce_scatter
from isp_core.linear import WeightParallelLinear
from isp_core.memory_pool import MemoryPool
from isp_core.topology import CommGroup

WP_UNITS = ("module", "block")
BLOCK_BUFFER = "<block>"  # memory-pool name of a block unit's flat all-gather buffer

ParamKey = tuple[WeightParallelLinear, bool]  # (module, is_bias)


@dataclass(eq=False)
class GatherUnit:
    """One all-gather's worth of weights: `modules` in forward order, all in block `block`."""

    block: int
    name: str  # the module's name in its block, or "block"
    modules: list[WeightParallelLinear]
    position: int = -1  # index in its chunk's units (execution order)
    params: list[ParamKey] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = [(m, b) for m in self.modules for b in (False, True) if not b or m.bias is not None]

    @property
    def flat(self) -> bool:
        return self.name == "block"

    @property
    def label(self) -> str:
        return f"{self.block}.{self.name}"

    def shard_numels(self) -> list[int]:
        return [_param(key).numel() for key in self.params]

    def shard_numel(self) -> int:
        return sum(self.shard_numels())


def _param(key: ParamKey) -> nn.Parameter:
    module, is_bias = key
    return module.bias if is_bias else module.weight


def _full_shape(key: ParamKey) -> tuple[int, ...]:
    module, is_bias = key
    return (module.out_features,) if is_bias else tuple(module.full_shape)


def start_gather(unit: GatherUnit, group: CommGroup, pool: Optional[MemoryPool],
                 async_op: bool) -> Callable[[], dict[ParamKey, torch.Tensor]]:
    """Launch the unit's all-gather(s); the returned function waits and gives the full tensors."""
    if not unit.flat:
        pending = {key: all_gather(_param(key), group, async_op=async_op, label=unit.label + (".bias" if key[1] else ""),
                                   out=(pool.allocate_all_gather_memory(unit.block, unit.name, key[1], owner=unit.label)
                                        if pool else None))
                   for key in unit.params}
        return lambda: {key: p.wait() for key, p in pending.items()}
    with record_function(f"isp.copy_in.{unit.label}"):
        flat = torch.cat([_param(key).reshape(-1) for key in unit.params])  # [F] this rank's shards
    staging = pool.allocate_all_gather_memory(unit.block, BLOCK_BUFFER, owner=unit.label) if pool else None
    gathered = all_gather(flat, group, async_op=async_op, out=staging, label=unit.label)

    def finish() -> dict[ParamKey, torch.Tensor]:
        rows = gathered.wait().view(group.size, -1)  # [wp, F]: rank r's shards in row r
        del flat_alive[:]  # the input may go once the gather is complete
        out, offset = {}, 0
        with record_function(f"isp.copy_out.{unit.label}"):
            for key, numel in zip(unit.params, unit.shard_numels()):
                full = (pool.allocate_all_gather_memory(unit.block, key[0].isp_name, key[1], owner=unit.label)
                        if pool else rows.new_empty(_full_shape(key)))
                full.view(group.size, numel).copy_(rows[:, offset:offset + numel])
                out[key], offset = full, offset + numel
        if pool:
            pool.release_all_gather_memory(unit.block, BLOCK_BUFFER)
        return out

    flat_alive = [flat]  # gloo reads the input asynchronously: keep it until the wait
    return finish


def release_buffers(unit: GatherUnit, pool: Optional[MemoryPool]) -> None:
    if pool is None:
        return
    for module, is_bias in unit.params:
        pool.release_all_gather_memory(unit.block, module.isp_name, is_bias)


@dataclass
class GradReduce:
    """An issued gradient reduce-scatter and where this parameter's shard lies in its output."""

    pending: Pending
    keep_alive: torch.Tensor  # the full gradient (buffer) the reduce-scatter reads
    param: nn.Parameter
    out: Optional[torch.Tensor]  # the pool buffer to free once collected, on the unit's last entry
    offset: int = 0
    numel: int = -1

    def shard(self) -> torch.Tensor:
        result = self.pending.wait()
        if self.numel < 0:
            return result
        return result[self.offset:self.offset + self.numel].view(self.param.shape)


class BlockGradPacker:
    """Collects the full gradients of a block unit's linears into one [wp, F] buffer."""

    def __init__(self) -> None:
        self._buffers: dict[GatherUnit, tuple[torch.Tensor, set]] = {}

    def add(self, unit: GatherUnit, key: ParamKey, grad: torch.Tensor, wp: int) -> Optional[torch.Tensor]:
        """Place `grad`; returns the packed buffer [wp * F] once every parameter of the unit is in."""
        if unit not in self._buffers:
            self._buffers[unit] = (grad.new_empty(wp, unit.shard_numel()), set())
        buf, seen = self._buffers[unit]
        index = unit.params.index(key)
        offset = sum(unit.shard_numels()[:index])
        numel = unit.shard_numels()[index]
        buf[:, offset:offset + numel].copy_(grad.reshape(wp, numel))  # row r: rank r's rows
        seen.add(key)
        if len(seen) < len(unit.params):
            return None
        del self._buffers[unit]
        return buf.view(-1)

    def reduce(self, unit: GatherUnit, packed: torch.Tensor, group: CommGroup, pool: Optional[MemoryPool],
               async_op: bool) -> list[GradReduce]:
        """One reduce-scatter of the packed gradients; one GradReduce per parameter of the unit."""
        numel = unit.shard_numel()
        out = pool.allocate_reduce_scatter_memory((numel,)) if pool else None
        pending = reduce_scatter(packed, group, async_op=async_op, out=out, label=unit.label)
        entries, offset = [], 0
        for i, (key, n) in enumerate(zip(unit.params, unit.shard_numels())):
            last = i == len(unit.params) - 1
            entries.append(GradReduce(pending, packed, _param(key), out if last else None, offset, n))
            offset += n
        return entries

    def idle(self) -> bool:
        return not self._buffers
