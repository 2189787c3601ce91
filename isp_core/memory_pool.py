"""Pre-allocated buffers for ISP's weight all-gathers and gradient reduce-scatters.

Two full-size sets of weight (and bias) buffers, one for the block being computed and one
for the block being prefetched (`block_index % 2`). Unlike InternEvo's pool, every buffer
has an owner while in use, and asking for a buffer that is still owned is an error: with a
correct schedule block i+2 never gathers into block i's buffer before block i released it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.profiler import record_function


class ISPCommModelConfig:
    """dtype, device, activation-checkpoint fraction and full shapes of the weight-parallel modules."""

    def __init__(self, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 activation_checkpointing: float = 0.0,
                 module_shapes: Optional[dict[str, torch.Size]] = None) -> None:
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.activation_checkpointing = activation_checkpointing
        self.module_shapes = dict(module_shapes or {})


class MemoryPool:
    """All-gather buffers (2 sets), lazily allocated reduce-scatter buffers, constant zeros."""

    SETS = 2

    def __init__(self, model_conf: ISPCommModelConfig, with_bias: bool = False) -> None:
        self._dtype, self._device = model_conf.dtype, model_conf.device
        self._shapes = dict(model_conf.module_shapes)
        self._weights = [self._zeros_per_module(lambda s: s) for _ in range(self.SETS)]
        self._biases = ([self._zeros_per_module(lambda s: s[:1]) for _ in range(self.SETS)]
                        if with_bias else None)
        self._owners: dict[tuple[int, str, bool], Any] = {}
        # shard shape -> list of buffers; each buffer's `idle` flag says whether it may be reused
        self._reduce_scatter: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._zeros: dict[tuple[int, ...], torch.Tensor] = {}

    def _zeros_per_module(self, shape_of) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(shape_of(tuple(shape)), dtype=self._dtype, device=self._device)
                for name, shape in self._shapes.items()}

    # all-gather buffers ------------------------------------------------------------------
    def allocate_all_gather_memory(self, block_index: int, module_name: str, is_bias: bool = False,
                                   owner: Any = None) -> torch.Tensor:
        """The buffer of set `block_index % 2` for `module_name`; raises if it is still in use."""
        key = (block_index % self.SETS, module_name, is_bias)
        if key in self._owners:
            raise RuntimeError(
                f"memory pool: {'bias' if is_bias else 'weight'} buffer {module_name!r} of set "
                f"{key[0]} is still in use by {self._owners[key]!r}; block {block_index} cannot have it")
        pool = self._biases if is_bias else self._weights
        if pool is None:
            raise RuntimeError("memory pool was built without bias buffers")
        with record_function(f"isp.pool.acquire.{module_name}"):
            self._owners[key] = owner if owner is not None else f"block {block_index}"
            return pool[key[0]][module_name]

    def release_all_gather_memory(self, block_index: int, module_name: str, is_bias: bool = False) -> None:
        key = (block_index % self.SETS, module_name, is_bias)
        if key not in self._owners:
            raise RuntimeError(f"memory pool: released {module_name!r} of set {key[0]} twice")
        with record_function(f"isp.pool.release.{module_name}"):
            del self._owners[key]

    def in_use(self) -> list[tuple[int, str, bool]]:
        return sorted(self._owners)

    # reduce-scatter buffers -----------------------------------------------------------------
    def allocate_reduce_scatter_memory(self, key: tuple[int, ...]) -> torch.Tensor:
        """An idle buffer of shape `key`, allocated on first need; `.index` identifies it."""
        buffers = self._reduce_scatter.setdefault(tuple(key), [])
        for buf in buffers:
            if buf.idle:
                buf.idle = False
                return buf
        buf = torch.zeros(key, dtype=self._dtype, device=self._device)
        buf.idle, buf.index = False, len(buffers)
        buffers.append(buf)
        return buf

    def free_reduce_scatter_memory(self, key: tuple[int, ...], index: int) -> None:
        buf = self._reduce_scatter[tuple(key)][index]
        assert not buf.idle, f"reduce-scatter buffer {key}[{index}] freed twice"
        buf.idle = True

    # constant zeros -------------------------------------------------------------------------
    def allocate_constant_zero(self, size: tuple[int, ...]) -> torch.Tensor:
        size = tuple(size)
        if size not in self._zeros:
            self._zeros[size] = torch.zeros(size, dtype=self._dtype, device=self._device)
        return self._zeros[size]

    def reset_lazy_pools(self) -> None:
        """Drop the lazily allocated pools after a micro-step; none of their buffers may be busy."""
        busy = [(k, b.index) for k, bufs in self._reduce_scatter.items() for b in bufs if not b.idle]
        assert not busy, f"reset while reduce-scatter buffers are in use: {busy}"
        self._zeros = {}
        self._reduce_scatter = {}

    # accounting ------------------------------------------------------------------------------
    def bytes_held(self) -> dict[str, int]:
        def size(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        gather = sum(size(s.values()) for s in self._weights)
        if self._biases is not None:
            gather += sum(size(s.values()) for s in self._biases)
        scatter = sum(size(bufs) for bufs in self._reduce_scatter.values())
        zeros = size(self._zeros.values())
        return {"all_gather": gather, "reduce_scatter": scatter, "zeros": zeros,
                "total": gather + scatter + zeros}
