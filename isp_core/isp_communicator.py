"""ISPCommunicator: all-gather of block weights with prefetch, reduce-scatter of their gradients.
(Longer than 300 lines because the prefetch schedule is one state machine: split, it would
no longer read top to bottom. The gather units live in isp_core.gather_unit, the scheduler
hook and the wrapper of several communicators in isp_core.isp_scheduler.)

The schedule moves gather units (isp_core.gather_unit): one per weight-parallel linear
(`wp_unit="module"`, InternEvo) or one per block (`wp_unit="block"`, FSDP2-style). Each unit
is, at any time, RELEASED (only the shards exist), GATHERING (an asynchronous all-gather is
in flight) or HELD (the full weights are at hand). With `overlap` the module hooks drive
these states ahead of the compute:

forward   `forward_overlap_per="layer"` (default): block 0's units start before block 0
          runs; each block launches the next block's units right before the module named
          by `launch_allgather_before` ("wo" by default: after the attention all-to-all, so
          they hide behind the out-projection and the MLP; "wqkv", "attn" (the attention
          core) or "w1" move that point). `"module"`: each module, once its own unit is at
          hand, launches the next unit (the first one is gathered on demand). A unit is
          released after the forward of its last module.
backward  each module waits for its unit (gathering it if it is not held) and launches the
          previous unit, then the unit is released once its first module's backward is done.
          Checkpointed blocks (the first int(fraction x layers)) are recomputed block by
          block: the last checkpointed block gathers when its recompute starts, each
          recompute launches the gathers of the block before it (at the launch module, or
          from its last module with "module"), and the weights a recompute gathered are kept
          for that block's backward instead of gathered twice.
          Gradients are reduce-scattered asynchronously; `collect_reduce_scatter()` waits
          for them after backward and adds them into the shards' `.grad`.

Without `overlap` nothing is prefetched: with "module" every gather and reduce-scatter is
synchronous, inside the linear; with "block" a unit is gathered when its first module
needs it and reduce-scattered when its last gradient is in.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from isp_core.collectives import Pending, all_gather, reduce_scatter
from isp_core.gather_unit import (BLOCK_BUFFER, WP_UNITS, BlockGradPacker, GatherUnit, GradReduce,
                                  release_buffers, start_gather)
from isp_core.linear import WeightParallelLinear, WPCommunicator
from isp_core.memory_pool import ISPCommModelConfig, MemoryPool
from isp_core.topology import CommGroup, as_comm_group

OUT_PROJ_NAMES = ("out_proj", "wo")
# InternEvo's parallel.weight.launch_allgather_before: the module names each choice means.
LAUNCH_MODULES = {"wqkv": ("wqkv", "Wqkv", "qkv", "q_proj"), "attn": (), "wo": OUT_PROJ_NAMES,
                  "w1": ("w1", "fused_w1_w3")}
FORWARD_OVERLAP = ("layer", "module")


class ISPOverlapState:
    """Structure of one model chunk: its blocks, their weight-parallel linears and gather units."""

    def __init__(self) -> None:
        self.num_blocks = 0
        self.ckpt_block_num = 0
        self.isp_outs: list[nn.Module] = []  # the modules that launch the next block's gathers
        self.isp_modules: list[WeightParallelLinear] = []
        self.units: list[GatherUnit] = []  # execution order
        self.index_to_units: dict[int, list[GatherUnit]] = {}
        self.index_to_isp_modules: dict[int, list[WeightParallelLinear]] = {}
        self.index_to_block: dict[int, nn.Module] = {}
        self.module_to_index: dict[nn.Module, int] = {}


def _blocks_of(chunk: nn.Module) -> nn.ModuleList:
    inner = chunk
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    for child in inner.children():
        if isinstance(child, nn.ModuleList):
            return child
    raise ValueError(f"{type(chunk).__name__} has no nn.ModuleList of blocks")


def _choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {sorted(allowed)}")
    return value


class ISPCommunicator(WPCommunicator):
    def __init__(self, model: Union[nn.Module, list, nn.ModuleList], model_conf: ISPCommModelConfig,
                 overlap: bool = False, enable_memory_pool: bool = False,
                 process_group: Union[CommGroup, dist.ProcessGroup, None] = None, wp_unit: str = "module",
                 forward_overlap_per: str = "layer", launch_allgather_before: str = "wo") -> None:
        assert process_group is not None, "ISPCommunicator needs the weight-parallel process group"
        self.process_group = as_comm_group(process_group, "weight")
        self.overlap = overlap
        self.wp_unit = _choice("wp_unit", wp_unit, WP_UNITS)
        self.forward_overlap_per = _choice("forward_overlap_per", forward_overlap_per, FORWARD_OVERLAP)
        self.launch_allgather_before = _choice("launch_allgather_before", launch_allgather_before, LAUNCH_MODULES)
        # Block units need the hooks even without overlap: they say when a block starts and ends.
        self._hooked = overlap or self.wp_unit == "block"
        self.enable_memory_pool = overlap and enable_memory_pool
        self.model_conf = model_conf
        self.is_forward = True
        self.events: Optional[list[tuple[str, str]]] = None  # set to [] to record the schedule
        self.reduce_scatter_handlers: dict[str, GradReduce] = {}
        self._forward_prefetch_prerequisites: list[Callable[[nn.Module], Any]] = []
        self._states: dict[int, ISPOverlapState] = {}
        self._module_shapes: dict[str, torch.Size] = {}
        self._pending: dict[GatherUnit, Callable[[], dict]] = {}
        self._held: dict[GatherUnit, dict] = {}
        self._packer = BlockGradPacker()
        self._has_bias = False
        chunks = list(model) if _is_chunk_list(model) else [model]
        for cid, chunk in enumerate(chunks):
            self._parse_model_structure(cid, chunk)
        self.switch_current_model_chunk(0)
        if self._hooked:
            for cid in self._states:
                self._register_hooks(self._states[cid])
        self.model_conf.module_shapes = dict(self._module_shapes)
        if self.wp_unit == "block" and self._states[0].units:
            flat = self._states[0].units[0].shard_numel() * self.process_group.size
            self.model_conf.module_shapes[BLOCK_BUFFER] = torch.Size((flat,))
        self.memory_pool = (MemoryPool(self.model_conf, with_bias=self._has_bias)
                            if self.enable_memory_pool else None)

    # model structure --------------------------------------------------------------------
    def _is_launcher(self, name: str, child: nn.Module) -> bool:
        if self.launch_allgather_before == "attn":
            return bool(getattr(child, "is_attn_cls", False))
        return name.split(".")[-1] in LAUNCH_MODULES[self.launch_allgather_before]

    def _parse_model_structure(self, cid: int, chunk: nn.Module) -> None:
        state = self._states[cid] = ISPOverlapState()
        blocks = _blocks_of(chunk)
        state.ckpt_block_num = int(self.model_conf.activation_checkpointing * len(blocks))
        for idx, block in enumerate(blocks):
            state.index_to_block[idx] = block
            state.index_to_isp_modules[idx] = []
            for name, child in block.named_modules():
                if self._is_launcher(name, child):
                    state.isp_outs.append(child)
                    state.module_to_index[child] = idx
                if not isinstance(child, WeightParallelLinear):
                    continue
                child.communicator = self
                child.isp_name = name
                child.isp_block = idx
                self._module_shapes.setdefault(name, child.full_shape)
                self._has_bias = self._has_bias or child.bias is not None
                state.module_to_index[child] = idx
                state.isp_modules.append(child)
                state.index_to_isp_modules[idx].append(child)
                child.weight.isp_reduce_scatter_name = f"{cid}.{idx}.{name}.weight"
                if child.bias is not None:
                    child.bias.isp_reduce_scatter_name = f"{cid}.{idx}.{name}.bias"
            modules = state.index_to_isp_modules[idx]
            units = ([GatherUnit(idx, "block", modules)] if self.wp_unit == "block" and modules
                     else [GatherUnit(idx, m.isp_name, [m]) for m in modules])
            for unit in units:
                unit.position = len(state.units)
                state.units.append(unit)
                for m in unit.modules:
                    m.isp_unit = unit
            state.index_to_units[idx] = units
        state.num_blocks = len(state.index_to_isp_modules)

    def switch_current_model_chunk(self, chunk_id: int) -> None:
        self._state = self._states[chunk_id]

    def register_prerequisite_for_forward_prefetch_hooks(self, prerequisite_func: Callable) -> None:
        """`prerequisite_func(block)` runs before a block's weights are prefetched in forward."""
        if not callable(prerequisite_func):
            raise TypeError("The provided prerequisite function must be callable.")
        self._forward_prefetch_prerequisites.append(prerequisite_func)

    def communication_mode(self) -> str:
        return "wp"

    # the three states ---------------------------------------------------------------------
    def _event(self, what: str, unit: GatherUnit) -> None:
        if self.events is not None:
            self.events.append((what, unit.label))

    def _launch(self, unit: GatherUnit) -> None:
        """RELEASED -> GATHERING (no-op otherwise)."""
        if unit in self._pending or unit in self._held:
            return
        self._pending[unit] = start_gather(unit, self.process_group, self.memory_pool, async_op=True)
        self._event("launch", unit)

    def _wait(self, unit: GatherUnit) -> None:
        """-> HELD, gathering now if nothing was prefetched."""
        if unit in self._held:
            return
        self._launch(unit)
        finish = self._pending.pop(unit)
        with record_function(f"isp.wait.all_gather.{unit.label}"):
            self._held[unit] = finish()
        self._event("wait", unit)

    def _release(self, unit: GatherUnit) -> None:
        """HELD -> RELEASED."""
        if self._held.pop(unit, None) is None:
            return
        release_buffers(unit, self.memory_pool)
        self._event("release", unit)

    def _launch_block(self, block_index: int) -> None:
        if self.is_forward:
            for callback in self._forward_prefetch_prerequisites:
                callback(self._state.index_to_block[block_index])
        for unit in self._state.index_to_units[block_index]:
            self._launch(unit)

    # hooks ---------------------------------------------------------------------------------------
    def _register_hooks(self, state: ISPOverlapState) -> None:
        ckpt = state.ckpt_block_num
        if self.overlap:
            if self.forward_overlap_per == "layer":
                state.index_to_block[0].register_forward_pre_hook(self._pre_forward_first_block)
                # before the modules' own hooks, so a launcher that is itself a linear launches first
                for launcher in state.isp_outs:
                    launcher.register_forward_pre_hook(self._pre_forward_launcher)
            if ckpt >= 1:
                state.index_to_block[ckpt - 1].register_forward_pre_hook(self._pre_forward_last_ckpt_block)
        for module in state.isp_modules:
            module.register_forward_pre_hook(self._pre_forward_module)
            module.register_forward_hook(self._post_forward_module)
            module.register_full_backward_pre_hook(self._pre_backward_module)
            module.register_full_backward_hook(self._post_backward_module)

    def _pre_forward_first_block(self, *_: Any) -> None:
        if self.is_forward:
            self._launch_block(0)

    def _pre_forward_last_ckpt_block(self, *_: Any) -> None:
        if self.is_forward:
            return  # the recompute of the last checkpointed block starts below
        index = self._state.ckpt_block_num - 1
        if self.forward_overlap_per == "layer":
            self._launch_block(index)
        else:
            self._launch(self._state.index_to_units[index][0])

    def _pre_forward_launcher(self, module: nn.Module, *_: Any) -> None:
        index = self._state.module_to_index[module]
        if self.is_forward:
            if index + 1 < self._state.num_blocks:
                self._launch_block(index + 1)
        elif index - 1 >= 0:  # recompute runs backwards through the checkpointed blocks
            self._launch_block(index - 1)

    def _pre_forward_module(self, module: WeightParallelLinear, *_: Any) -> None:
        unit = module.isp_unit
        self._wait(unit)
        if self.overlap and self.forward_overlap_per == "module":
            self._prefetch_next_unit(unit)

    def _prefetch_next_unit(self, unit: GatherUnit) -> None:
        """forward_overlap_per="module": the next unit in forward, or in a recompute the next
        one of this block and, from its last unit, the first unit of the block before."""
        units = self._state.units
        following = units[unit.position + 1] if unit.position + 1 < len(units) else None
        if self.is_forward:
            if following is not None:
                if following.block != unit.block:
                    for callback in self._forward_prefetch_prerequisites:
                        callback(self._state.index_to_block[following.block])
                self._launch(following)
        elif following is not None and following.block == unit.block:
            self._launch(following)
        elif unit.block - 1 >= 0:
            self._launch(self._state.index_to_units[unit.block - 1][0])

    def _post_forward_module(self, module: WeightParallelLinear, *_: Any) -> None:
        # A recompute keeps the weights for the backward that follows it immediately.
        if self.is_forward and module is module.isp_unit.modules[-1]:
            self._release(module.isp_unit)

    def _pre_backward_module(self, module: WeightParallelLinear, *_: Any) -> None:
        unit = module.isp_unit
        self._wait(unit)
        if self.overlap and unit.position > 0:
            previous = self._state.units[unit.position - 1]
            if previous.block >= self._state.ckpt_block_num:
                self._launch(previous)

    def _post_backward_module(self, module: WeightParallelLinear, *_: Any) -> None:
        if module is module.isp_unit.modules[0]:
            self._release(module.isp_unit)

    # WPCommunicator ---------------------------------------------------------------------------
    def weight_hook(self, tensor: torch.Tensor, module: nn.Module, is_bias: bool = False) -> torch.Tensor:
        if self.process_group.size == 1:
            return tensor
        if not self._hooked:
            self._event("launch", module.isp_unit)
            full = all_gather(tensor, self.process_group, label=module.isp_unit.label
                              + (".bias" if is_bias else "")).wait()
            self._event("wait", module.isp_unit)
            return full
        held = self._held.get(module.isp_unit)
        if held is None:
            raise RuntimeError(f"ISP schedule error: weight of {module.isp_name} (block "
                               f"{module.isp_block}) used while not gathered")
        return held[(module, is_bias)]

    def grad_hook(self, tensor: torch.Tensor, module: nn.Module,
                  is_bias: bool = False) -> tuple[torch.Tensor, Optional[Pending]]:
        if self.process_group.size == 1:
            return tensor, None
        unit = module.isp_unit
        param = module.bias if is_bias else module.weight
        if not self._hooked:
            return reduce_scatter(tensor, self.process_group, label=unit.label + (".bias" if is_bias else "")
                                  ).wait(), None
        if unit.flat:
            packed = self._packer.add(unit, (module, is_bias), tensor, self.process_group.size)
            if packed is not None:
                for entry in self._packer.reduce(unit, packed, self.process_group, self.memory_pool, self.overlap):
                    self.reduce_scatter_handlers[entry.param.isp_reduce_scatter_name] = entry
        else:
            shard_shape = tuple(param.shape)
            out = self.memory_pool.allocate_reduce_scatter_memory(shard_shape) if self.memory_pool else None
            pending = reduce_scatter(tensor, self.process_group, async_op=True, out=out,
                                     label=unit.label + (".bias" if is_bias else ""))
            # Keep the full gradient alive until the reduce-scatter has read it.
            self.reduce_scatter_handlers[param.isp_reduce_scatter_name] = GradReduce(pending, tensor, param, out)
        # The real gradient arrives in collect_reduce_scatter(); autograd gets zeros meanwhile.
        return self._constant_zero(tuple(param.shape)), None

    def _constant_zero(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.memory_pool is not None:
            return self.memory_pool.allocate_constant_zero(shape)
        return torch.zeros(shape, dtype=self.model_conf.dtype, device=self.model_conf.device)

    # after backward -------------------------------------------------------------------------------
    def collect_reduce_scatter(self) -> None:
        """Wait for every outstanding gradient reduce-scatter and add it into the shard's grad.
        (Collecting each one as soon as it completes, InternEvo's early release, was measured
        on CPU/gloo and showed no gain in time or peak memory: see docs/isp-variants.md.)"""
        for key, entry in list(self.reduce_scatter_handlers.items()):
            del self.reduce_scatter_handlers[key]
            with record_function(f"isp.wait.reduce_scatter.{key}"):
                shard = entry.shard()
            param = entry.param
            if param.grad is None:
                param.grad = shard.clone()
            else:
                param.grad.add_(shard)
            if entry.out is not None:
                self.memory_pool.free_reduce_scatter_memory(tuple(entry.out.shape), entry.out.index)

    def check_idle(self) -> None:
        """Every gathered weight must have been released once a backward is over."""
        leaked = [u.label for u in list(self._held) + list(self._pending)]
        if leaked or not self._packer.idle():
            raise RuntimeError(f"ISP schedule error: weights still gathered (or gradients unreduced) "
                               f"after backward: {leaked}")


def _is_chunk_list(model: Any) -> bool:
    """A list of model chunks (each holding its own blocks) rather than one model."""
    if isinstance(model, (list, tuple)):
        return True
    return isinstance(model, nn.ModuleList) and all(_has_blocks(c) for c in model)


def _has_blocks(chunk: nn.Module) -> bool:
    try:
        _blocks_of(chunk)
        return True
    except ValueError:
        return False
