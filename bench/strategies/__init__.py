"""The training strategies a cell can run, in one registry: ISP and PyTorch's own peers.

Each strategy is a module of this package with two functions:

    build_trainer(cfg, topo, settings, seed, dtype, device, lr) -> object with train_step(batches) -> float
    predicted_comm(cfg, spec, world_size, sp, wp, overlap, element_size, settings=None) -> {group: {kind: {calls, bytes}}}

and one `Strategy` entry below, which says what the config checks need to know about it.
Adding a strategy touches its own module and this registry, nothing else. This module
imports no torch, so the config layer can use it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    splits_sequence: bool  # may parallel.sp exceed 1?
    weight_group: bool  # may parallel.wp exceed 1?
    vocab_parallel_head: bool  # is the head's vocabulary split over sp (vocab must divide by sp)?
    # The ParallelTopology groups it sends on: only these get process groups (isp_core/topology.py).
    groups: tuple[str, ...] = ()
    min_warmup_steps: int = 0
    warmup_reason: str = ""

    @property
    def module(self) -> ModuleType:
        """The implementation, imported on first use (it needs torch)."""
        return importlib.import_module(f"bench.strategies.{self.name}")


REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Strategy("isp", "InternEvo's ISP: weights over wp, sequence over sp (isp_core)", True, True, True,
             groups=("sequence", "weight", "weight_data", "world")),
    # fully_shard communicates on the device mesh it builds itself
    Strategy("fsdp2", "torch fully_shard per block and the root, over the world", False, False, False),
    Strategy("ddp", "torch DistributedDataParallel, whole weights, bucketed all-reduce", False, False, False,
             groups=("world",), min_warmup_steps=1,
             warmup_reason="DDP rebuilds its gradient buckets after its first step, so that step "
                           "communicates differently"),
    Strategy("ulysses", "DeepSpeed-Ulysses attention over sp + FSDP2 over the world", True, False, False,
             groups=("sequence",)),
)}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> Strategy:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(NAMES)}") from None


def build_trainer(name: str, cfg: Any, topo: Any, settings: Any = None, seed: int = 0, dtype: Any = None,
                  device: Any = None, lr: float = 1e-3) -> Any:
    """The trainer of strategy `name`; every one has `train_step(micro_batches) -> float`.
    (Types are isp_core's LlamaConfig, ParallelTopology, ISPSettings and torch's dtype/device;
    written as Any so this registry stays importable without torch.)"""
    module = get(name).module
    kwargs = {"seed": seed, "device": device, "lr": lr}
    if settings is not None:
        kwargs["settings"] = settings
    if dtype is not None:
        kwargs["dtype"] = dtype
    return module.build_trainer(cfg, topo, **kwargs)


def predicted_comm(name: str, cfg: Any, spec: Any, world_size: int, sp: int, wp: int, overlap: bool,
                   element_size: int, settings: Any = None) -> dict[str, dict[str, dict[str, int]]]:
    """{group: {kind: {"calls": n, "bytes": b}}} that strategy `name` sends per step on one rank
    (`settings`: the cell's ISPSettings; only isp reads its variant fields)."""
    return get(name).module.predicted_comm(cfg, spec, world_size, sp, wp, overlap, element_size, settings=settings)
