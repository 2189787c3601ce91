"""Mixed precision as InternEvo trains: low-precision compute, float32 master weights.

The model's parameters (each rank's shards) are bfloat16, so forward, backward and every
collective run in bfloat16. The optimizer never steps them directly: it keeps a float32
master copy of each shard and float32 AdamW state, steps the masters with the bfloat16
gradients cast to float32, and copies the result back into the bfloat16 shards (InternEvo's
HybridZeroOptimizer does the same on its flat fp32 partitions). Stepping bfloat16 weights
directly would lose every update smaller than bfloat16's rounding step (2^-8 relative), weight
decay first among them.

float16 would need dynamic loss scaling (its range underflows small gradients); this suite
does not implement it, so float16 training is refused with a clear error (use bfloat16).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

TRAINING_DTYPES = (torch.float32, torch.bfloat16)


def check_training_dtype(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        raise ValueError("float16 training needs dynamic loss scaling, which this suite does not "
                         "implement; train in bfloat16 (float32 master weights) or float32")
    if dtype not in TRAINING_DTYPES:
        raise ValueError(f"training dtype {dtype}; allowed: float32, bfloat16")


class MasterWeightAdamW:
    """AdamW on float32 masters of low-precision parameters; the same face as torch's optimizer
    (step, zero_grad, state_dict, param_groups) so trainers need not know which they hold."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> None:
        self.params = list(params)
        self.masters = [nn.Parameter(p.detach().float().clone(), requires_grad=False) for p in self.params]
        self.inner = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return self.inner.state

    @torch.no_grad()
    def step(self) -> None:
        for p, master in zip(self.params, self.masters):
            master.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, master in zip(self.params, self.masters):
            p.copy_(master)  # rounds the float32 master to the parameter's dtype
            master.grad = None  # the float32 gradient copy lives only during the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return self.inner.state_dict()


def build_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float
                    ) -> torch.optim.AdamW | MasterWeightAdamW:
    """Plain AdamW when every parameter is float32; float32 masters otherwise."""
    params = list(params)
    for p in params:
        check_training_dtype(p.dtype)
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return MasterWeightAdamW(params, lr, weight_decay)
