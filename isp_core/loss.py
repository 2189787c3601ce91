"""Cross-entropy over logits whose vocabulary is sharded across the sequence group.

After the head's all-to-all each rank of a sequence group holds logits [B, S, V/sp] for
every token of its micro-batch and one slice of the vocabulary. The per-token loss
log(sum_v exp(z_v)) - z_target needs three all-reduces over that group (max for stability,
sum of exponentials, the target logit from the rank that owns it). The backward needs no
communication: each rank writes softmax - onehot for its own slice.

Memory. At 16K tokens per rank a float32 [tokens, V/sp] is several GB, so no full float32
copy of the logits is ever made: the forward saves only the logits themselves (in their own
dtype) and two floats per token (max, sum of exponentials), and both passes work through
the tokens in chunks of at most `chunk_bytes` of float32. The backward recomputes the
softmax chunk by chunk straight into the gradient (the logits' dtype), so the one full
[tokens, V/sp] tensor it allocates is the gradient PyTorch needs anyway.

The resulting loss is identical on every rank of the sequence group.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from isp_core.collectives import all_reduce_
from isp_core.topology import CommGroup

CHUNK_BYTES = 64 * 2**20  # float32 working set per chunk: a few launches per GB of logits


def _chunk_rows(width: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * width))


def _row_chunks(rows: int, width: int, chunk_bytes: int) -> Iterator[slice]:
    step = _chunk_rows(width, chunk_bytes)
    return (slice(r, min(r + step, rows)) for r in range(0, rows, step))


def _chunk_buffer(flat: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """One float32 buffer reused by every chunk (a fresh tensor per chunk would briefly
    hold two chunks: the new one is allocated before the old one is released)."""
    rows = min(flat.shape[0], _chunk_rows(flat.shape[1], chunk_bytes))
    return torch.empty(rows, flat.shape[1], dtype=torch.float32, device=flat.device)


def _shifted_exp(flat: torch.Tensor, max_logit: torch.Tensor, rows: slice, buf: torch.Tensor) -> torch.Tensor:
    """exp(logits - max) of `rows`, in float32, written into `buf`."""
    out = buf[:rows.stop - rows.start]
    # copy_ casts in place; a mixed-dtype torch.sub(out=) would stage a float32 copy first.
    return out.copy_(flat[rows]).sub_(max_logit[rows].unsqueeze(-1)).exp_()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """forward: per-token loss [B, S] from vocab-sharded logits [B, S, V/n].
    backward: grad_logits = (softmax - onehot(target)) * grad, on the local vocab slice.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Optional[CommGroup],
                chunk_bytes: int) -> torch.Tensor:
        part = logits.shape[-1]
        flat, tgt = logits.reshape(-1, part), target.reshape(-1)  # [T, V/n] (a view), [T]
        start = group.rank * part if group is not None else 0
        max_logit = flat.max(dim=-1).values.float()  # [T]
        _reduce(max_logit, group, "max", "loss.max")
        local = (tgt >= start) & (tgt < start + part)
        local_index = (tgt - start).clamp(0, part - 1)
        target_logit = (flat.gather(-1, local_index.unsqueeze(-1)).squeeze(-1).float() - max_logit) * local
        _reduce(target_logit, group, "sum", "loss.target")
        sum_exp = torch.empty_like(max_logit)
        buf = _chunk_buffer(flat, chunk_bytes)
        for rows in _row_chunks(flat.shape[0], part, chunk_bytes):
            sum_exp[rows] = _shifted_exp(flat, max_logit, rows, buf).sum(-1)
        _reduce(sum_exp, group, "sum", "loss.sumexp")
        ctx.chunk_bytes = chunk_bytes
        ctx.save_for_backward(logits, max_logit, sum_exp, local, local_index)
        return (sum_exp.log() - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, max_logit, sum_exp, local, local_index = ctx.saved_tensors
        part = logits.shape[-1]
        flat, g = logits.reshape(-1, part), grad.reshape(-1)
        grad_logits = torch.empty_like(logits)
        out = grad_logits.view(-1, part)
        buf = _chunk_buffer(flat, ctx.chunk_bytes)
        for rows in _row_chunks(flat.shape[0], part, ctx.chunk_bytes):
            soft = _shifted_exp(flat, max_logit, rows, buf).div_(sum_exp[rows].unsqueeze(-1))
            soft.scatter_add_(-1, local_index[rows].unsqueeze(-1), -local[rows].unsqueeze(-1).to(soft.dtype))
            out[rows] = soft.mul_(g[rows].unsqueeze(-1))
        return grad_logits, None, None, None


def _reduce(x: torch.Tensor, group: Optional[CommGroup], op: str, label: str) -> None:
    if group is not None:
        all_reduce_(x, group, op=op, label=label)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Optional[CommGroup],
                                 chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Per-token loss [B, S] (fp32) of logits [B, S, V/n] whose vocabulary is split over
    `group`; with `group` None (or of one rank) the logits hold the whole vocabulary."""
    return _VocabParallelCrossEntropy.apply(logits.contiguous(), target, group, chunk_bytes)
