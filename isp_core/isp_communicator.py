"""ISPCommunicator: all-gather of block weights with prefetch, reduce-scatter of their gradients.
(Longer than 300 lines because the prefetch schedule is one state machine: split, it would
no longer read top to bottom.)

Each weight-parallel linear of a block is, at any time, RELEASED (only the shard exists),
GATHERING (an asynchronous all-gather is in flight) or HELD (the full weight is at hand).
With `overlap` the module hooks drive these states one step ahead of the compute:

forward   block 0's gathers start before block 0 runs; each block launches the next
          block's gathers right before its output projection (`wo`), i.e. after the
          attention all-to-all, so they hide behind the out-projection and the MLP. Each
          module waits for its own gather before it runs and releases it afterwards.
backward  each module waits for its weight (gathering it if it is not held) and launches
          the previous module's gather, then releases its own when its backward is done.
          Checkpointed blocks (the first int(fraction x layers)) are recomputed block by
          block: the last checkpointed block gathers when its recompute starts, each
          recompute launches the gathers of the block before it at `wo`, and the weights a
          recompute gathered are kept for that block's backward instead of gathered twice.
          Gradients are reduce-scattered asynchronously; `collect_reduce_scatter()` waits
          for them after backward and adds them into the shards' `.grad`.

Without `overlap` every gather and reduce-scatter is synchronous, inside the linear.
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.profiler import record_function

from isp_core.collectives import Pending, all_gather, reduce_scatter
from isp_core.linear import WeightParallelLinear, WPCommunicator
from isp_core.memory_pool import ISPCommModelConfig, MemoryPool
from isp_core.topology import CommGroup

OUT_PROJ_NAMES = ("out_proj", "wo")


class ISPOverlapState:
    """Structure of one model chunk: its blocks and their weight-parallel linears in order."""

    def __init__(self) -> None:
        self.num_blocks = 0
        self.ckpt_block_num = 0
        self.isp_outs: list[nn.Module] = []
        self.isp_modules: list[WeightParallelLinear] = []
        self.index_to_isp_modules: dict[int, list[WeightParallelLinear]] = {}
        self.index_to_block: dict[int, nn.Module] = {}
        self.module_to_index: dict[nn.Module, int] = {}
        self.position: dict[nn.Module, int] = {}  # index in isp_modules (execution order)


def _blocks_of(chunk: nn.Module) -> nn.ModuleList:
    inner = chunk
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    for child in inner.children():
        if isinstance(child, nn.ModuleList):
            return child
    raise ValueError(f"{type(chunk).__name__} has no nn.ModuleList of blocks")


class ISPCommunicator(WPCommunicator):
    def __init__(self, model: Union[nn.Module, list, nn.ModuleList], model_conf: ISPCommModelConfig,
                 overlap: bool = False, enable_memory_pool: bool = False,
                 process_group: Optional[CommGroup] = None) -> None:
        assert process_group is not None, "ISPCommunicator needs the weight-parallel CommGroup"
        self.process_group = process_group
        self.overlap = overlap
        self.enable_memory_pool = overlap and enable_memory_pool
        self.model_conf = model_conf
        self.is_forward = True
        self.events: Optional[list[tuple[str, str]]] = None  # set to [] to record the schedule
        self.reduce_scatter_handlers: dict[str, tuple[Pending, torch.Tensor, nn.Parameter, Any]] = {}
        self._forward_prefetch_prerequisites: list[Callable[[nn.Module], Any]] = []
        self._states: dict[int, ISPOverlapState] = {}
        self._module_shapes: dict[str, torch.Size] = {}
        self._pending: dict[nn.Module, tuple[Pending, Optional[Pending]]] = {}
        self._held: dict[nn.Module, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        chunks = list(model) if _is_chunk_list(model) else [model]
        for cid, chunk in enumerate(chunks):
            self._parse_model_structure(cid, chunk)
        self.switch_current_model_chunk(0)
        if overlap:
            for cid in self._states:
                self._register_hooks(self._states[cid])
        self.model_conf.module_shapes = dict(self._module_shapes)
        self.memory_pool = (MemoryPool(self.model_conf, with_bias=self._has_bias)
                            if self.enable_memory_pool else None)

    # model structure --------------------------------------------------------------------
    def _parse_model_structure(self, cid: int, chunk: nn.Module) -> None:
        state = self._states[cid] = ISPOverlapState()
        blocks = _blocks_of(chunk)
        state.ckpt_block_num = int(self.model_conf.activation_checkpointing * len(blocks))
        self._has_bias = False
        for idx, block in enumerate(blocks):
            state.index_to_block[idx] = block
            state.index_to_isp_modules[idx] = []
            for name, child in block.named_modules():
                if name.split(".")[-1] in OUT_PROJ_NAMES:
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
                state.position[child] = len(state.isp_modules)
                state.isp_modules.append(child)
                state.index_to_isp_modules[idx].append(child)
                child.weight.isp_reduce_scatter_name = f"{cid}.{idx}.{name}.weight"
                if child.bias is not None:
                    child.bias.isp_reduce_scatter_name = f"{cid}.{idx}.{name}.bias"
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
    def _event(self, what: str, module: nn.Module) -> None:
        if self.events is not None:
            self.events.append((what, f"{module.isp_block}.{module.isp_name}"))

    def _launch(self, module: WeightParallelLinear) -> None:
        """RELEASED -> GATHERING (no-op otherwise)."""
        if module in self._pending or module in self._held:
            return
        pool, block, name = self.memory_pool, module.isp_block, module.isp_name
        w_out = pool.allocate_all_gather_memory(block, name, owner=module) if pool else None
        pending_w = all_gather(module.weight, self.process_group, async_op=True, out=w_out,
                               label=f"{block}.{name}")
        pending_b = None
        if module.bias is not None:
            b_out = pool.allocate_all_gather_memory(block, name, True, owner=module) if pool else None
            pending_b = all_gather(module.bias, self.process_group, async_op=True, out=b_out,
                                   label=f"{block}.{name}.bias")
        self._pending[module] = (pending_w, pending_b)
        self._event("launch", module)

    def _wait(self, module: WeightParallelLinear) -> None:
        """-> HELD, gathering now if nothing was prefetched."""
        if module in self._held:
            return
        self._launch(module)
        pending_w, pending_b = self._pending.pop(module)
        with record_function(f"isp.wait.all_gather.{module.isp_block}.{module.isp_name}"):
            self._held[module] = (pending_w.wait(), pending_b.wait() if pending_b else None)
        self._event("wait", module)

    def _release(self, module: WeightParallelLinear) -> None:
        """HELD -> RELEASED."""
        if self._held.pop(module, None) is None:
            return
        if self.memory_pool is not None:
            self.memory_pool.release_all_gather_memory(module.isp_block, module.isp_name)
            if module.bias is not None:
                self.memory_pool.release_all_gather_memory(module.isp_block, module.isp_name, True)
        self._event("release", module)

    def _launch_block(self, block_index: int) -> None:
        if self.is_forward:
            for callback in self._forward_prefetch_prerequisites:
                callback(self._state.index_to_block[block_index])
        for module in self._state.index_to_isp_modules[block_index]:
            self._launch(module)

    # hooks ---------------------------------------------------------------------------------------
    def _register_hooks(self, state: ISPOverlapState) -> None:
        ckpt = state.ckpt_block_num
        state.index_to_block[0].register_forward_pre_hook(self._pre_forward_first_block)
        if ckpt >= 1:
            state.index_to_block[ckpt - 1].register_forward_pre_hook(self._pre_forward_last_ckpt_block)
        for out_proj in state.isp_outs:
            out_proj.register_forward_pre_hook(self._pre_forward_out_proj)
        for module in state.isp_modules:
            module.register_forward_pre_hook(self._pre_forward_module)
            module.register_forward_hook(self._post_forward_module)
            module.register_full_backward_pre_hook(self._pre_backward_module)
            module.register_full_backward_hook(self._post_backward_module)

    def _pre_forward_first_block(self, *_: Any) -> None:
        if self.is_forward:
            self._launch_block(0)

    def _pre_forward_last_ckpt_block(self, *_: Any) -> None:
        if not self.is_forward:  # the recompute of the last checkpointed block starts
            self._launch_block(self._state.ckpt_block_num - 1)

    def _pre_forward_out_proj(self, module: nn.Module, *_: Any) -> None:
        index = self._state.module_to_index[module]
        if self.is_forward:
            if index + 1 < self._state.num_blocks:
                self._launch_block(index + 1)
        elif index - 1 >= 0:  # recompute runs backwards through the checkpointed blocks
            self._launch_block(index - 1)

    def _pre_forward_module(self, module: WeightParallelLinear, *_: Any) -> None:
        self._wait(module)

    def _post_forward_module(self, module: WeightParallelLinear, *_: Any) -> None:
        # A recompute keeps the weights for the backward that follows it immediately.
        if self.is_forward:
            self._release(module)

    def _pre_backward_module(self, module: WeightParallelLinear, *_: Any) -> None:
        self._wait(module)
        position = self._state.position[module]
        if position > 0:
            previous = self._state.isp_modules[position - 1]
            if previous.isp_block >= self._state.ckpt_block_num:
                self._launch(previous)

    def _post_backward_module(self, module: WeightParallelLinear, *_: Any) -> None:
        self._release(module)

    # WPCommunicator ---------------------------------------------------------------------------
    def weight_hook(self, tensor: torch.Tensor, module: nn.Module, is_bias: bool = False) -> torch.Tensor:
        if self.process_group.size == 1:
            return tensor
        if not self.overlap:
            self._event("launch", module)
            full = all_gather(tensor, self.process_group, label=f"{module.isp_block}.{module.isp_name}"
                              + (".bias" if is_bias else "")).wait()
            self._event("wait", module)
            return full
        if module not in self._held:
            raise RuntimeError(f"ISP schedule error: weight of {module.isp_name} (block "
                               f"{module.isp_block}) used while not gathered")
        weight, bias = self._held[module]
        return bias if is_bias else weight

    def grad_hook(self, tensor: torch.Tensor, module: nn.Module,
                  is_bias: bool = False) -> tuple[torch.Tensor, Optional[Pending]]:
        if self.process_group.size == 1:
            return tensor, None
        label = f"{module.isp_block}.{module.isp_name}" + (".bias" if is_bias else "")
        if not self.overlap:
            return reduce_scatter(tensor, self.process_group, label=label).wait(), None
        param = module.bias if is_bias else module.weight
        shard_shape = tuple(param.shape)
        out = self.memory_pool.allocate_reduce_scatter_memory(shard_shape) if self.memory_pool else None
        pending = reduce_scatter(tensor, self.process_group, async_op=True, out=out, label=label)
        # Keep the full gradient alive until the reduce-scatter has read it.
        self.reduce_scatter_handlers[param.isp_reduce_scatter_name] = (pending, tensor, param, out)
        # The real gradient arrives in collect_reduce_scatter(); autograd gets zeros meanwhile.
        return self._constant_zero(shard_shape), None

    def _constant_zero(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.memory_pool is not None:
            return self.memory_pool.allocate_constant_zero(shape)
        return torch.zeros(shape, dtype=self.model_conf.dtype, device=self.model_conf.device)

    # after backward -------------------------------------------------------------------------------
    def collect_reduce_scatter(self) -> None:
        """Wait for every outstanding gradient reduce-scatter and add it into the shard's grad."""
        for key, (pending, _, param, out) in list(self.reduce_scatter_handlers.items()):
            with record_function(f"isp.wait.reduce_scatter.{key}"):
                shard = pending.wait()
            if param.grad is None:
                param.grad = shard.clone()
            else:
                param.grad.add_(shard)
            if out is not None:
                self.memory_pool.free_reduce_scatter_memory(tuple(out.shape), out.index)
        self.reduce_scatter_handlers.clear()

    def check_idle(self) -> None:
        """Every gathered weight must have been released once a backward is over."""
        leaked = [f"{m.isp_block}.{m.isp_name}" for m in list(self._held) + list(self._pending)]
        if leaked:
            raise RuntimeError(f"ISP schedule error: weights still gathered after backward: {leaked}")


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


class ISPCommunicatorSchedulerHook:
    """Tells the communicator which phase runs and tidies up after each backward."""

    def __init__(self, communicator: ISPCommunicator) -> None:
        self._comm = communicator

    def before_forward(self, chunk_id: int = 0) -> None:
        self._comm.is_forward = True
        self._comm.switch_current_model_chunk(chunk_id)

    def before_backward(self, chunk_id: int = 0) -> None:
        self._comm.is_forward = False
        self._comm.switch_current_model_chunk(chunk_id)

    def after_backward(self) -> None:
        if self._comm.overlap:
            self._comm.collect_reduce_scatter()
            self._comm.check_idle()
        if self._comm.enable_memory_pool:
            self._comm.memory_pool.reset_lazy_pools()


class ISPCommunicatorWrapper:
    """Several communicators (InternEvo keeps one for dense and one for MoE layers) behind one face."""

    def __init__(self, communicators: Optional[list[ISPCommunicator]] = None) -> None:
        self.isp_communicators: list[ISPCommunicator] = list(communicators or [])

    def set_communicator(self, communicator: ISPCommunicator) -> None:
        self.isp_communicators.append(communicator)

    @property
    def reduce_scatter_handlers(self) -> ChainMap:
        """Every communicator's outstanding reduce-scatters, looked up by parameter name."""
        return ChainMap(*(c.reduce_scatter_handlers for c in self.isp_communicators))

    @property
    def enable_memory_pool(self) -> bool:
        return any(c.enable_memory_pool for c in self.isp_communicators)

    def register_prerequisite_for_forward_prefetch_hooks(self, prerequisite_func: Callable) -> None:
        for communicator in self.isp_communicators:
            communicator.register_prerequisite_for_forward_prefetch_hooks(prerequisite_func)

    def collect_reduce_scatter(self) -> None:
        for communicator in self.isp_communicators:
            communicator.collect_reduce_scatter()

    def reset_lazy_pools(self) -> None:
        for communicator in self.isp_communicators:
            if communicator.memory_pool is not None:
                communicator.memory_pool.reset_lazy_pools()
