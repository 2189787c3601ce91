"""Cross-entropy over logits whose vocabulary is sharded across the sequence group.

After the head's all-to-all each rank of a sequence group holds logits [B, S, V/sp] for
every token of its micro-batch and one slice of the vocabulary. The per-token loss
log(sum_v exp(z_v)) - z_target needs three all-reduces over that group (max for stability,
sum of exponentials, the target logit from the rank that owns it). The backward needs no
communication: each rank writes softmax - onehot for its own slice.

The resulting loss is identical on every rank of the sequence group.
"""

from __future__ import annotations

import torch

from isp_core.collectives import all_reduce_
from isp_core.topology import CommGroup


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """forward: per-token loss [B, S] from vocab-sharded logits [B, S, V/n].
    backward: grad_logits = (softmax - onehot(target)) * grad, on the local vocab slice.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: CommGroup) -> torch.Tensor:
        ctx.in_dtype = logits.dtype
        logits = logits.float()
        part = logits.shape[-1]
        start = group.rank * part
        max_logit = logits.max(dim=-1).values
        all_reduce_(max_logit, group, op="max", label="loss.max")
        shifted = logits - max_logit.unsqueeze(-1)
        local = (target >= start) & (target < start + part)
        local_index = (target - start).clamp(0, part - 1)
        target_logit = shifted.gather(-1, local_index.unsqueeze(-1)).squeeze(-1) * local
        all_reduce_(target_logit, group, op="sum", label="loss.target")
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        all_reduce_(sum_exp, group, op="sum", label="loss.sumexp")
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, local_index)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, local_index = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local_index.unsqueeze(-1), -local.unsqueeze(-1).to(grad_logits.dtype))
        return (grad_logits * grad.unsqueeze(-1)).to(ctx.in_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Per-token loss [B, S] (fp32); plain cross-entropy when the group has one rank."""
    return _VocabParallelCrossEntropy.apply(logits, target, group)
