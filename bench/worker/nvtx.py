"""NVTX ranges for Nsight Systems (profile.nvtx), named as the torch.profiler traces name the same
phases, so `nsys profile` of a cell reads like its traces. Inactive, and saying so, without CUDA.

    with NvtxRanges(config.profile.nvtx, device) as ranges:   # ranges.status: active or why not
        for step in ...:
            with nvtx_step(step):
                trainer.train_step(batches)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch


def nvtx_status(enabled: bool, device: torch.device) -> tuple[bool, str]:
    """(active, why) for profile.nvtx on `device`: ranges need CUDA's NVTX library."""
    if not enabled:
        return False, "profile.nvtx is false"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"inactive: NVTX ranges need CUDA, this cell runs on {device.type}"
    return True, "active: steps, forward, backward, optimizer and every record_function label (isp.*)"


class NvtxRanges:
    """Context manager: while entered, a cell's steps carry NVTX ranges named as in the torch
    traces, so `nsys profile` of a cell reads like them.

      step#N     around each training step (`step(n)`, called by the worker's step loop)
      forward    each call of the outermost module from the thread that entered (a micro-batch's
                 forward; recompute inside backward is not one: isp.recompute.block<i> labels it)
      backward   from the gradient reaching that module's output to the end of autograd's
                 backward (a process-wide start/end range: autograd may finish on another thread)
      optimizer  the trainer's optimizer.step()
      labels     every record_function (isp.all_gather.<block>.<module>, isp.wait..., Optimizer.step#...)
                 through torch's NVTX observer limited to user scopes (aten ops stay unlabelled);
                 it shares the profiler's slot, so it pauses while torch.profiler records

    Inactive (every method a no-op) without CUDA or with profile.nvtx false; `status` says which.
    """

    def __init__(self, enabled: bool, device: torch.device, optimizer: Any = None, sink: Any = None) -> None:
        """`optimizer`: the trainer's (its step() gets the range; bfloat16 trainers hold a
        wrapper around torch's AdamW whose float32 master copies belong in it too). `sink`:
        where ranges go instead of torch.cuda.nvtx (a test's recorder); it skips the labels."""
        self.active, self.status = nvtx_status(enabled, device) if sink is None else (enabled, "active (sink given)")
        self._sink: Any = sink if sink is not None else torch.cuda.nvtx
        self._mirror = sink is None and self.active
        self._requested = enabled
        self._optimizer = optimizer
        self._own_step: Any = None
        self._handles: list[Any] = []
        self._labels_on = False
        self._depth = 0
        self._backward_id: int | None = None
        self._thread = 0

    def __enter__(self) -> NvtxRanges:
        global _ACTIVE
        if self._requested:
            print(f"profile.nvtx: {self.status}", flush=True)
        if not self.active:
            return self
        from torch.nn.modules import module as nn_module

        self._thread = threading.get_ident()
        self._handles = [nn_module.register_module_forward_pre_hook(self._forward_pre),
                         nn_module.register_module_forward_hook(self._forward_post)]
        if self._optimizer is not None:
            self._wrap_step(self._optimizer)
        _ACTIVE = self
        self.resume_labels()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE
        if not self.active:
            return
        self.pause_labels()
        for handle in self._handles:
            handle.remove()
        if self._optimizer is not None:
            vars(self._optimizer).pop("step", None)  # the class's step again
            if self._own_step is not None:
                self._optimizer.step = self._own_step
        self._handles, _ACTIVE = [], None

    def _wrap_step(self, optimizer: Any) -> None:
        step = optimizer.step
        self._own_step = vars(optimizer).get("step")  # an instance attribute to put back, if any

        def ranged(*args: Any, **kwargs: Any) -> Any:
            self._sink.range_push("optimizer")
            try:
                return step(*args, **kwargs)
            finally:
                self._sink.range_pop()

        optimizer.step = ranged  # on this instance only, until __exit__

    @contextlib.contextmanager
    def step(self, index: int) -> Iterator[None]:
        if not self.active:
            yield
            return
        self._sink.range_push(f"step#{index}")
        try:
            yield
        finally:
            self._sink.range_pop()

    def _forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        if threading.get_ident() != self._thread or self._backward_id is not None:
            return  # another thread's module, or a recompute inside backward
        if self._depth == 0:
            self._sink.range_push("forward")
        self._depth += 1

    def _forward_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() != self._thread or self._backward_id is not None or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self._sink.range_pop()
            grad_fn = getattr(output, "grad_fn", None)
            if grad_fn is not None:
                grad_fn.register_prehook(self._backward_starts)

    def _backward_starts(self, grad_outputs: Any) -> None:
        if self._backward_id is None:
            self._backward_id = self._sink.range_start("backward")
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)

    def _backward_ends(self) -> None:
        if self._backward_id is not None:
            self._sink.range_end(self._backward_id)
            self._backward_id = None

    def pause_labels(self) -> None:
        """Stop mirroring record_function labels (torch.profiler needs the profiler slot)."""
        if self._labels_on:
            torch.cuda.synchronize()
            torch.autograd.profiler._disable_profiler()
            self._labels_on = False

    def resume_labels(self) -> None:
        if self._mirror and not self._labels_on:
            from torch._C._profiler import ProfilerConfig, ProfilerState, RecordScope, _ExperimentalConfig

            torch.cuda.synchronize()
            config = ProfilerConfig(ProfilerState.NVTX, False, False, False, False, False, _ExperimentalConfig())
            torch.autograd.profiler._enable_profiler(config, set(), {RecordScope.USER_SCOPE})
            self._labels_on = True


_ACTIVE: NvtxRanges | None = None  # the entered NvtxRanges: module hooks are process-wide anyway


@contextlib.contextmanager
def nvtx_step(index: int) -> Iterator[None]:
    """step#N around one training step when NvtxRanges is entered; otherwise nothing."""
    if _ACTIVE is None:
        yield
        return
    with _ACTIVE.step(index):
        yield


def pause_labels() -> None:
    """torch.profiler is starting: the entered NvtxRanges lends it the profiler slot."""
    if _ACTIVE is not None:
        _ACTIVE.pause_labels()


def resume_labels() -> None:
    if _ACTIVE is not None:
        _ACTIVE.resume_labels()
