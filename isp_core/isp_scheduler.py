"""The faces around ISPCommunicator that a training loop talks to: the scheduler hook (which
phase runs, tidying up after backward) and the wrapper that puts several communicators
(InternEvo keeps one for dense and one for MoE layers) behind one."""

from __future__ import annotations

from collections import ChainMap
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from isp_core.isp_communicator import ISPCommunicator


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
        if self._comm._hooked:
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
