"""The weight-parallel linear layer and the interface of the communicators that feed it.

A `WeightParallelLinear` stores only its shard of `weight[out, in]` (rows `rank*out/wp` to
`(rank+1)*out/wp` of the weight group). Its communicator turns the shard into the full
weight for forward and backward (`weight_hook`) and the full weight gradient back into the
shard's gradient (`grad_hook`). The full weight is never saved for backward, so it can be
released right after the forward and gathered again for the backward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from isp_core.collectives import Pending


class WPCommunicator(ABC):
    """What a weight-parallel module needs from its communicator."""

    @abstractmethod
    def communication_mode(self) -> str:
        ...

    @abstractmethod
    def weight_hook(self, tensor: torch.Tensor, module: nn.Module, is_bias: bool = False) -> torch.Tensor:
        """The full (gathered) weight or bias of `module`, given its local shard."""

    @abstractmethod
    def grad_hook(self, tensor: torch.Tensor, module: nn.Module,
                  is_bias: bool = False) -> tuple[torch.Tensor, Optional[Pending]]:
        """This rank's shard of the averaged gradient, given the full local gradient."""


class _WPLinearFn(torch.autograd.Function):
    """forward: y = x W^T + b with W gathered by the communicator.
    backward: gather W again (or take it from the prefetch), dx = dy W, dW = dy^T x reduced to the shard.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                module: "WeightParallelLinear") -> torch.Tensor:
        comm = module.communicator
        full_w = comm.weight_hook(weight, module)
        full_b = comm.weight_hook(bias, module, is_bias=True) if bias is not None else None
        ctx.module = module
        ctx.save_for_backward(x, weight, bias)  # shards only: the full weight is not kept
        return F.linear(x, full_w, full_b)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        module, comm = ctx.module, ctx.module.communicator
        full_w = comm.weight_hook(weight, module)
        grad_x = grad_out.matmul(full_w)                       # [..., in]
        dy = grad_out.reshape(-1, grad_out.shape[-1])          # [tokens, out]
        grad_w_full = dy.t().matmul(x.reshape(-1, x.shape[-1]))  # [out, in]
        grad_w, _ = comm.grad_hook(grad_w_full, module)
        grad_b = None
        if bias is not None:
            grad_b, _ = comm.grad_hook(dy.sum(0), module, is_bias=True)
        return grad_x, grad_w, grad_b, None


class WeightParallelLinear(nn.Module):
    """Linear layer whose weight rows are sharded over the weight-parallel group."""

    def __init__(self, in_features: int, out_features: int, wp_size: int, bias: bool = False,
                 communicator: Optional[WPCommunicator] = None, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if out_features % wp_size:
            raise ValueError(f"out_features={out_features} does not divide by wp={wp_size}")
        self.in_features, self.out_features, self.wp_size = in_features, out_features, wp_size
        shard = out_features // wp_size
        self.weight = nn.Parameter(torch.empty(shard, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(shard, dtype=dtype, device=device)) if bias else None
        self.communicator = communicator

    @property
    def full_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.communicator is not None, "WeightParallelLinear used before a communicator was attached"
        return _WPLinearFn.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, wp={self.wp_size}, bias={self.bias is not None}"


# InternEvo's name for the same module, so its users recognise it.
ParallelLinearWithCommExt = WeightParallelLinear


def module_label(module: Any) -> str:
    return getattr(module, "isp_name", None) or type(module).__name__
