"""Ulysses attention: all-to-all heads <-> sequence around an ordinary attention.

Each rank enters with its chunk of the sequence for every head, [B, S/sp, H, D]. One
all-to-all gives it the whole sequence for H/sp heads, [B, S, H/sp, D]; attention then needs
no communication at all (heads are independent), and a second all-to-all returns the
output to the sequence layout. Causal masks and packed documents (`cu_seqlens`) therefore
describe the FULL sequence on every rank.

`local_attention` is the per-rank kernel: flash-attn when it can run (CUDA, fp16/bf16),
PyTorch's scaled_dot_product_attention otherwise, so the CPU path never touches CUDA.
`attention_backend` says which of the two runs and why, for the records.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# The backend names are re-exported here, where users of the attention look for them.
from isp_core.attention_backend import (ATTENTION_BACKENDS, FLASH_MISSING, FLASH_VERSION, AttentionBackend,  # noqa: F401
                                        attention_backend, flash_attn_func, flash_attn_varlen_func, use_flash)
from isp_core.collectives import _SeqAllToAll
from isp_core.topology import CommGroup, as_comm_group

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "attention_backend", "local_attention", "expand_kv_heads",
           "DistributedAttention", "LocalAttention", "attention_packing"]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
          scale: Optional[float]) -> torch.Tensor:
    """q, k, v [B, L, H, D] with equal head counts -> [B, L, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale)  # [B, H, L, D]
    return out.transpose(1, 2)


def _document_bounds(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if (cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total
            or any(a > b for a, b in zip(bounds, bounds[1:]))):
        raise ValueError(f"cu_seqlens must be a non-decreasing 1-D tensor from 0 to B*S={total}, "
                         f"got {bounds}")
    return bounds


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                    softmax_scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Attention of q [B, S, Hq, D] over k, v [B, S, Hkv, D] -> [B, S, Hq, D].

    GQA: q head h reads kv head h // (Hq // Hkv). With `cu_seqlens` (document boundaries over
    the flattened B*S tokens, InternEvo's packed layout) a token attends only inside its
    own document; `max_seqlen` is the longest document, an int computed once per batch
    (isp_core.data does): the flash path needs it and never reads it back from the device.
    `backend` (auto | flash | sdpa): see `attention_backend`.
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != D or Hq % Hkv:
        raise ValueError(f"local_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} need matching [B, S, ., D] and Hq % Hkv == 0")
    if use_flash(q, backend):  # flash-attn handles GQA itself
        # reshape, not view: flash-attn pads a head dim that is not a multiple of 8 and
        # returns a slice of its padded output, which is not contiguous.
        if cu_seqlens is None:
            out = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal)
            return out.reshape(B, S, Hq, D)
        if max_seqlen is None:
            raise ValueError("local_attention: packed documents on the flash path need max_seqlen "
                             "(an int per batch); reading it from cu_seqlens would sync with the host")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)  # no-op once the batch is on the device
        out = flash_attn_varlen_func(q.reshape(B * S, Hq, D), k.reshape(B * S, Hkv, D),
                                     v.reshape(B * S, Hkv, D), cu, cu, max_seqlen, max_seqlen,
                                     dropout_p=0.0, softmax_scale=softmax_scale, causal=causal)
        return out.reshape(B, S, Hq, D)
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=2)  # [B, S, Hq, D]
        v = v.repeat_interleave(Hq // Hkv, dim=2)
    if cu_seqlens is None:
        return _sdpa(q, k, v, causal, softmax_scale)
    # One causal SDPA per document is exact and never builds an S x S mask.
    bounds = _document_bounds(cu_seqlens, B * S)
    qf, kf, vf = (t.reshape(B * S, Hq, D) for t in (q, k, v))  # [B*S, Hq, D]
    pieces = [_sdpa(qf[None, s:e], kf[None, s:e], vf[None, s:e], causal, softmax_scale)[0]
              for s, e in zip(bounds, bounds[1:]) if e > s]
    return torch.cat(pieces).view(B, S, Hq, D)


class _ExpandKVHeads(torch.autograd.Function):
    """forward: repeat each head of dim `head_dim` `repeat` times, grouped (k0,k0,k1,k1,...).
    backward: sum the gradient over each head's repeats.
    """

    @staticmethod
    def forward(ctx, kv: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
        ctx.repeat, ctx.head_dim = repeat, head_dim
        shape = list(kv.shape)
        grouped = kv.unsqueeze(head_dim + 1).expand(*shape[:head_dim + 1], repeat,
                                                    *shape[head_dim + 1:])  # [.., Hkv, repeat, ..]
        shape[head_dim] *= repeat
        return grouped.reshape(shape)  # [.., Hkv*repeat, ..]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape = list(grad.shape)
        shape[ctx.head_dim:ctx.head_dim + 1] = [shape[ctx.head_dim] // ctx.repeat, ctx.repeat]
        return grad.reshape(shape).sum(ctx.head_dim + 1), None, None


def expand_kv_heads(kv: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    """Repeat each head of `kv` along dim `head_dim` `repeat` times in grouped order.

    kv [B, S, 2, Hkv, D] with head_dim=3 -> [B, S, 2, Hkv*repeat, D] (any layout works).
    """
    head_dim %= kv.dim()
    return kv if repeat == 1 else _ExpandKVHeads.apply(kv, repeat, head_dim)


class LocalAttention(nn.Module):
    """The per-rank attention module, called the way InternEvo calls its local attention:

      (qkv, cu_seqlens=None, max_seqlen=None)                     qkv [B, S, 3, H, D]
      (q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)   kv [B, S, 2, Hkv, D]
      (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    each -> [B, S, H, D]; `causal` and `softmax_scale` from the constructor unless given as
    keywords. `cu_seqlens`/`max_seqlen` are also accepted for the q/kv forms. Self-attention
    only: q and k share their document boundaries.
    """

    is_attn_cls = True  # InternEvo's mark: launch_allgather_before="attn" finds the module by it

    def __init__(self, causal: bool = True, softmax_scale: Optional[float] = None, backend: str = "auto") -> None:
        super().__init__()
        self.causal, self.softmax_scale, self.backend = causal, softmax_scale, backend

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        packing = attention_packing(args, kwargs)
        tensors, rest = _take_tensors(packing, args, kwargs)
        if packing == "qkv":
            q, k, v = tensors[0].unbind(2)
            names = ("cu_seqlens", "max_seqlen")
        elif packing == "q_kv":
            q, (k, v) = tensors[0], tensors[1].unbind(2)
            names = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
        else:
            q, k, v = tensors
            names = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
        if len(rest) > len(names):
            raise TypeError(f"LocalAttention({packing}) takes at most {len(names)} positional "
                            f"arguments after the tensors, got {len(rest)}")
        kwargs.update(zip(names, rest))
        unknown = set(kwargs) - set(names) - {"cu_seqlens", "max_seqlen", "causal", "softmax_scale"}
        if unknown:
            raise TypeError(f"LocalAttention({packing}) got unexpected arguments {sorted(unknown)}")
        cu, max_len = _self_attention_bounds(kwargs)
        causal, scale = kwargs.get("causal"), kwargs.get("softmax_scale")
        return local_attention(q, k, v, causal=self.causal if causal is None else causal,
                               cu_seqlens=cu, max_seqlen=max_len,
                               softmax_scale=self.softmax_scale if scale is None else scale, backend=self.backend)


def _self_attention_bounds(kwargs: dict) -> tuple[Optional[torch.Tensor], Optional[int]]:
    cu = kwargs.get("cu_seqlens")
    cu_q, cu_k = kwargs.get("cu_seqlens_q"), kwargs.get("cu_seqlens_k")
    if cu is None:
        cu = cu_q if cu_q is not None else cu_k
    for other in (cu_q, cu_k):
        if other is not None and other is not cu and not torch.equal(other, cu):
            raise ValueError("LocalAttention is self-attention: cu_seqlens_q and cu_seqlens_k must be equal")
    max_len = next((kwargs[n] for n in ("max_seqlen", "max_seqlen_q", "max_seqlen_k")
                    if kwargs.get(n) is not None), None)
    return cu, max_len


_PACKINGS = {"qkv": ("qkv",), "q_kv": ("q", "kv"), "q_k_v": ("q", "k", "v")}


def attention_packing(args: tuple, kwargs: dict) -> str:
    """InternEvo's dispatch rule: packed qkv if the first tensor is 5-D (or passed as `qkv=`),
    q plus packed kv if the second one is (or `kv=` is given), else q, k, v."""
    if (args and args[0].dim() == 5) or (not args and "qkv" in kwargs):
        return "qkv"
    if (len(args) >= 2 and args[1].dim() == 5) or (len(args) < 2 and "kv" in kwargs):
        return "q_kv"
    return "q_k_v"


def _take_tensors(packing: str, args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], tuple]:
    names = _PACKINGS[packing]
    tensors = list(args[:len(names)])
    for name in names[len(tensors):]:
        if name not in kwargs:
            raise TypeError(f"attention with packing {packing} needs {', '.join(names)}; {name} is missing")
        tensors.append(kwargs.pop(name))
    return tensors, args[len(tensors):] if len(tensors) <= len(args) else ()


class DistributedAttention(nn.Module):
    """Ulysses sequence-parallel attention around a local attention module, InternEvo's contract.

    forward dispatches on its arguments (all [B, S/sp, ...] sequence chunks) as InternEvo does
    (`attention_packing`) and hands the exchanged tensors to `local_attention` in the same
    packing, followed by every other argument unchanged:
      (qkv, ...)      qkv [B, S/sp, 3, H, D]        -> local_attn(qkv [B, S, 3, H/sp, D], ...)
      (q, kv, ...)    kv [B, S/sp, 2, Hkv, D]       -> local_attn(q [B, S, H/sp, D], kv [B, S, 2, Hkv/sp, D], ...)
      (q, k, v, ...)  k, v [B, S/sp, Hkv, D]        -> local_attn(q, k, v, ...) with S whole, heads split
    and returns [B, S/sp, H, D]. Document boundaries (`cu_seqlens`...) describe the full
    gathered sequence. With sp > Hkv the kv heads are first repeated so each rank gets a
    whole kv head (which needs sp % Hkv == 0). `sequence_process_group` may be a torch
    ProcessGroup or an isp_core CommGroup.
    """

    def __init__(self, local_attention: Callable[..., torch.Tensor],
                 sequence_process_group: Union[CommGroup, dist.ProcessGroup]) -> None:
        super().__init__()
        self.local_attn = local_attention
        self.group = self.spg = as_comm_group(sequence_process_group, "sequence")
        self.sp = self.sp_size = self.group.size

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        packing = attention_packing(args, kwargs)
        tensors, rest = _take_tensors(packing, args, kwargs)
        return getattr(self, f"_{packing}")(*tensors, *rest, **kwargs)

    def _qkv(self, qkv: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _check_layout("qkv", qkv, 5, {2: 3})
        self._check_heads(qkv.shape[3], qkv.shape[3])
        qkv = self._exchange("attn.qkv", (3,), (1,), qkv)[0]  # [B, S, 3, H/sp, D]
        out = self.local_attn(qkv, *args, **kwargs)  # [B, S, H/sp, D]
        return self._exchange("attn.out", (1,), (2,), out)[0]  # [B, S/sp, H, D]

    def _q_kv(self, q: torch.Tensor, kv: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _check_layout("q", q, 4, {})
        _check_layout("kv", kv, 5, {2: 2})
        kv = self._whole_kv_heads(kv, head_dim=3)  # [B, S/sp, 2, max(Hkv, sp), D]
        self._check_heads(q.shape[2], kv.shape[3])
        # Both tensors in one pipelined call: kv's exchange is in flight while q's is unpacked.
        q, kv = self._exchange("attn.q_kv", (2, 3), (1, 1), q, kv)  # [B, S, H/sp, D], [B, S, 2, Hkv/sp, D]
        out = self.local_attn(q, kv, *args, **kwargs)  # [B, S, H/sp, D]
        return self._exchange("attn.out", (1,), (2,), out)[0]  # [B, S/sp, H, D]

    def _q_k_v(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_layout(name, t, 4, {})
        k = self._whole_kv_heads(k, head_dim=2)  # [B, S/sp, max(Hkv, sp), D]
        v = self._whole_kv_heads(v, head_dim=2)
        self._check_heads(q.shape[2], k.shape[2])
        q, k, v = self._exchange("attn.q_k_v", (2, 2, 2), (1, 1, 1), q, k, v)  # [B, S, H/sp, D], ...
        out = self.local_attn(q, k, v, *args, **kwargs)  # [B, S, H/sp, D]
        return self._exchange("attn.out", (1,), (2,), out)[0]  # [B, S/sp, H, D]

    def _exchange(self, label: str, scatter_dims: Sequence[int], gather_dims: Sequence[int],
                  *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.sp == 1:
            return tensors
        out = _SeqAllToAll.apply(self.group, tuple(scatter_dims), tuple(gather_dims), label, *tensors)
        return out if isinstance(out, tuple) else (out,)

    def _whole_kv_heads(self, kv: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Repeat kv heads up to sp when there are fewer than sp, so no kv head is split."""
        hkv = kv.shape[head_dim]
        if self.sp <= hkv:
            return kv
        if self.sp % hkv:
            raise ValueError(f"sp={self.sp} exceeds the {hkv} kv heads but is not a multiple of "
                             f"them: each rank needs whole kv heads")
        return expand_kv_heads(kv, self.sp // hkv, head_dim)

    def _check_heads(self, hq: int, hkv: int) -> None:
        if hq % self.sp or hkv % self.sp:
            raise ValueError(f"{hq} q heads and {hkv} kv heads must both divide by sp={self.sp}")
        if hq % hkv:
            raise ValueError(f"{hq} q heads must divide by {hkv} kv heads (GQA groups)")


def _check_layout(name: str, t: torch.Tensor, ndim: int, fixed: dict[int, int]) -> None:
    if t.dim() != ndim or any(t.shape[d] != size for d, size in fixed.items()):
        want = {"q": "[B, S, H, D]", "k": "[B, S, Hkv, D]", "v": "[B, S, Hkv, D]",
                "kv": "[B, S, 2, Hkv, D]", "qkv": "[B, S, 3, H, D]"}[name]
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
