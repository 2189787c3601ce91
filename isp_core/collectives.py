"""Collectives along any dimension, with asynchronous handles and byte accounting.

torch's all_gather_into_tensor / reduce_scatter_tensor concatenate and split along dim 0 of
a flat buffer. To gather or scatter along another dim we move that dim's chunks to the
front before sending (reduce-scatter) or after receiving (all-gather), so the layout is
really split along the requested dim (the reference only got the shape right).

Every launch is counted in the group's CommStats and wrapped in a `record_function`
label `isp.<kind>.<label>` so traces show which module's data moved. When the CommStats has a
launch log, each launch is also logged with its group's ranks, and when the rank starts and stops
waiting for it (a synchronous call waits inside the launch; an asynchronous one in `wait()`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.profiler import record_function

from isp_core.comm_stats import NO_TOKEN, CommStats
from isp_core.topology import CommGroup, as_comm_group

# torch 2.13 renamed the flat-buffer collectives; older releases (2.6-2.12) only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX}


class Pending:
    """An issued collective. `wait()` completes it once and returns the result tensor."""

    def __init__(self, work: Optional[dist.Work], finish: Callable[[], torch.Tensor],
                 stats: Optional[CommStats] = None, token: int = NO_TOKEN) -> None:
        self._work, self._finish, self._result = work, finish, None
        self._stats, self._token = stats, token

    @classmethod
    def done(cls, value: torch.Tensor) -> "Pending":
        return cls(None, lambda: value)

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self._work is not None:
                if self._stats is not None:
                    self._stats.waiting(self._token)
                self._work.wait()
                if self._stats is not None:
                    self._stats.done(self._token)
            self._result = self._finish()
        return self._result


def _launched(group: CommGroup, kind: str, nbytes: int, async_op: bool) -> int:
    """Count and log one launch; a synchronous one is waited for inside the call itself."""
    return group.stats.record(group.name, kind, nbytes, group.ranks, blocking=not async_op)


def _pending(work: Optional[dist.Work], finish: Callable[[], torch.Tensor], group: CommGroup,
             token: int) -> Pending:
    """The handle of a launch; a synchronous one (no work to wait for) is complete already."""
    if work is None:
        group.stats.done(token)
    return Pending(work, finish, group.stats, token)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _chunks_to_front(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """[.., n*c, ..] -> contiguous [n, .., c, ..]: chunk j of `dim` becomes row j."""
    shape = list(x.shape)
    shape[dim:dim + 1] = [n, shape[dim] // n]
    return x.reshape(shape).movedim(dim, 0).contiguous()


def _front_to_dim(buf: torch.Tensor, dim: int) -> torch.Tensor:
    """[n, .., c, ..] -> [.., n*c, ..]: the inverse of `_chunks_to_front` (concatenation)."""
    n, chunk = buf.shape[0], list(buf.shape[1:])
    chunk[dim] *= n
    return buf.movedim(0, dim).reshape(chunk)


def all_gather(x: torch.Tensor, group: CommGroup, dim: int = 0, async_op: bool = False,
               out: Optional[torch.Tensor] = None, label: str = "") -> Pending:
    """Concatenate every rank's `x` along `dim`. `out` (full shape) receives the result."""
    if group.size == 1:
        return Pending.done(x)
    x = x.contiguous()
    full = list(x.shape)
    full[dim] *= group.size
    if dim == 0:
        buf = out if out is not None else x.new_empty(full)
    else:
        buf = x.new_empty([group.size, *x.shape])
    token = _launched(group, "all_gather", _nbytes(buf), async_op)
    with record_function(f"isp.all_gather.{label or group.name}"):
        work = _all_gather_flat(buf.view(-1), x.view(-1), group=group.pg, async_op=async_op)
    if dim == 0:
        return _pending(work, lambda: buf, group, token)

    def finish() -> torch.Tensor:
        result = _front_to_dim(buf, dim)
        if out is None:
            return result
        out.copy_(result)
        return out

    return _pending(work, finish, group, token)


def reduce_scatter(x: torch.Tensor, group: CommGroup, dim: int = 0, op: str = "avg",
                   async_op: bool = False, out: Optional[torch.Tensor] = None,
                   label: str = "") -> Pending:
    """Reduce `x` over the group and keep this rank's chunk of `dim`."""
    if group.size == 1:
        return Pending.done(x)
    if x.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter: dim {dim} of shape {tuple(x.shape)} "
                         f"does not divide by group '{group.name}' size {group.size}")
    send = _chunks_to_front(x, dim, group.size)
    shard_shape = list(x.shape)
    shard_shape[dim] //= group.size
    result = out if out is not None else x.new_empty(shard_shape)
    token = _launched(group, "reduce_scatter", _nbytes(send), async_op)
    with record_function(f"isp.reduce_scatter.{label or group.name}"):
        work = _reduce_scatter_flat(result.view(-1), send.view(-1), op=_OPS[op],
                                          group=group.pg, async_op=async_op)
    return _pending(work, lambda: result, group, token)


def all_reduce_(x: torch.Tensor, group: CommGroup, op: str = "sum", label: str = "") -> torch.Tensor:
    """In-place synchronous all-reduce. AVG is done as SUM then divide, which every backend has."""
    if group.size == 1:
        return x
    token = _launched(group, "all_reduce", _nbytes(x), async_op=False)
    with record_function(f"isp.all_reduce.{label or group.name}"):
        dist.all_reduce(x, op=_OPS["sum" if op == "avg" else op], group=group.pg)
    group.stats.done(token)
    if op == "avg":
        x.div_(group.size)
    return x


def all_to_all(x: torch.Tensor, group: CommGroup, scatter_dim: int, gather_dim: int,
               async_op: bool = False, label: str = "") -> Pending:
    """Send chunk j of `scatter_dim` to rank j; concatenate what arrives along `gather_dim`.

    One contiguous buffer through all_to_all_single (no per-chunk lists).
    """
    if group.size == 1:
        return Pending.done(x)
    send = _chunks_to_front(x, scatter_dim, group.size)
    recv = torch.empty_like(send)
    token = _launched(group, "all_to_all", _nbytes(send), async_op)
    with record_function(f"isp.all_to_all.{label or group.name}"):
        work = dist.all_to_all_single(recv, send, group=group.pg, async_op=async_op)
    return _pending(work, lambda: _front_to_dim(recv, gather_dim).contiguous(), group, token)


class _SeqAllToAll(torch.autograd.Function):
    """forward: all-to-all scattering `scatter_dims[i]`, gathering `gather_dims[i]` of each input.
    backward: the same with the dims swapped.

    With several tensors the all-to-alls are pipelined: tensor i+1's exchange is launched
    before tensor i's is waited on and unpacked.
    """

    @staticmethod
    def forward(ctx, group: CommGroup, scatter_dims: Sequence[int], gather_dims: Sequence[int],
                label: str, *inputs: torch.Tensor):
        # InternEvo's form, apply(process_group, scatter_idx, gather_idx, *tensors) with ints for
        # one tensor, works too: the label is then absent and the group may be a ProcessGroup.
        ctx.label_was_tensor = isinstance(label, torch.Tensor)
        if ctx.label_was_tensor:
            label, inputs = "seq", (label, *inputs)
        if isinstance(scatter_dims, int):
            scatter_dims, gather_dims = (scatter_dims,), (gather_dims,)
        if not isinstance(group, CommGroup):
            group = as_comm_group(group, "sequence")
        ctx.group, ctx.scatter_dims, ctx.gather_dims, ctx.label = group, tuple(scatter_dims), tuple(gather_dims), label
        outs = seq_all_to_all_many(inputs, group, scatter_dims, gather_dims, label)
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        outs = seq_all_to_all_many(grads, ctx.group, ctx.gather_dims, ctx.scatter_dims, ctx.label + ".bwd")
        # one None per non-tensor argument; with InternEvo's form the first tensor sat in `label`
        return (None, None, None, *([] if ctx.label_was_tensor else [None]), *outs)


def seq_all_to_all_many(inputs: Sequence[torch.Tensor], group: CommGroup,
                        scatter_dims: Sequence[int], gather_dims: Sequence[int],
                        label: str) -> tuple[torch.Tensor, ...]:
    assert len(inputs) == len(scatter_dims) == len(gather_dims)
    if group.size == 1:
        return tuple(inputs)
    outs = []
    pending = all_to_all(inputs[0], group, scatter_dims[0], gather_dims[0], True, f"{label}.0")
    for i in range(len(inputs)):
        nxt = None
        if i + 1 < len(inputs):
            nxt = all_to_all(inputs[i + 1], group, scatter_dims[i + 1], gather_dims[i + 1], True,
                             f"{label}.{i + 1}")
        with record_function(f"isp.wait.all_to_all.{label}.{i}"):
            outs.append(pending.wait())
        pending = nxt
    return tuple(outs)


def seq_all_to_all(group: CommGroup, x: torch.Tensor, scatter_dim: int, gather_dim: int,
                   label: str = "seq") -> torch.Tensor:
    """Differentiable all-to-all of one tensor over the sequence group."""
    if group.size == 1:
        return x
    return _SeqAllToAll.apply(group, (scatter_dim,), (gather_dim,), label, x)


class _GatherFn(torch.autograd.Function):
    """forward: all-gather along `dim`. backward: keep this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: CommGroup, dim: int, label: str) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim, label=label).wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.group.size, ctx.dim)[ctx.group.rank].contiguous(), None, None, None


class _SplitFn(torch.autograd.Function):
    """forward: keep this rank's chunk along `dim`. backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: CommGroup, dim: int, label: str) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.label = group, dim, label
        return x.chunk(group.size, dim)[group.rank].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather(grad, ctx.group, ctx.dim, label=ctx.label + ".bwd").wait(), None, None, None


def gather_along(x: torch.Tensor, group: CommGroup, dim: int, label: str = "gather") -> torch.Tensor:
    return x if group.size == 1 else _GatherFn.apply(x, group, dim, label)


def split_along(x: torch.Tensor, group: CommGroup, dim: int, label: str = "split") -> torch.Tensor:
    return x if group.size == 1 else _SplitFn.apply(x, group, dim, label)
