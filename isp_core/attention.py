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

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from isp_core.collectives import _SeqAllToAll
from isp_core.topology import CommGroup

ATTENTION_BACKENDS = ("auto", "flash", "sdpa")


def _import_flash() -> tuple[Optional[Callable], Optional[Callable], Optional[str], str]:
    """(flash_attn_func, flash_attn_varlen_func, version, why not) from importing flash-attn.

    Only a missing package is quiet: an installed flash-attn that fails to import (the
    undefined-symbol ImportError a torch upgrade causes, a CUDA mismatch) is a broken install
    the user must hear about, not a silent fall back to SDPA.
    """
    try:
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ModuleNotFoundError as err:
        if err.name != "flash_attn":
            return None, None, None, _broken(err)
        return None, None, None, "flash-attn is not installed"
    except Exception as err:  # noqa: BLE001 - any failure of an installed package is reported
        return None, None, None, _broken(err)
    return flash_attn_func, flash_attn_varlen_func, getattr(flash_attn, "__version__", "unknown"), ""


def _broken(err: BaseException) -> str:
    why = f"flash-attn is installed but failed to import: {type(err).__name__}: {err}"
    warnings.warn(why + " (attention falls back to SDPA unless run.attention is flash)", RuntimeWarning,
                  stacklevel=3)
    return why


flash_attn_func, flash_attn_varlen_func, FLASH_VERSION, FLASH_MISSING = _import_flash()

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "attention_backend", "local_attention",
           "expand_kv_heads", "DistributedAttention"]


@dataclass(frozen=True)
class AttentionBackend:
    """The kernel `local_attention` will run for a device and dtype, and why."""

    name: str    # "flash" or "sdpa"
    reason: str  # why this one (when it is sdpa: why not flash)

    def as_record(self) -> dict[str, Optional[str]]:
        """For env.json and every record; the installed flash-attn version even when unused."""
        return {"backend": self.name, "reason": self.reason, "flash_attn_version": FLASH_VERSION}


def _why_not_flash(device: torch.device, dtype: torch.dtype) -> str:
    if flash_attn_func is None:
        return FLASH_MISSING
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, the model is on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, the model computes in {str(dtype).removeprefix('torch.')}"
    return ""


def attention_backend(requested: str, device: torch.device | str, dtype: torch.dtype) -> AttentionBackend:
    """Which kernel runs for `requested` (auto | flash | sdpa) on `device` in `dtype`, and why.

    `flash` raises RuntimeError when flash-attn cannot run there: a cell asking for flash
    must fail rather than measure SDPA under flash's name.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {requested!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
    if requested == "sdpa":
        return AttentionBackend("sdpa", "requested (run.attention: sdpa)")
    why_not = _why_not_flash(torch.device(device), dtype)
    if not why_not:
        return AttentionBackend("flash", f"flash-attn {FLASH_VERSION} ({requested})")
    if requested == "flash":
        raise RuntimeError(f"run.attention is flash but flash-attn cannot run: {why_not}")
    return AttentionBackend("sdpa", why_not)


def _use_flash(q: torch.Tensor, backend: str) -> bool:
    if backend == "sdpa":
        return False
    why_not = _why_not_flash(q.device, q.dtype)
    if why_not and backend == "flash":
        raise RuntimeError(f"attention backend flash cannot run: {why_not}")
    return not why_not


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
    if _use_flash(q, backend):  # flash-attn handles GQA itself
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


class DistributedAttention(nn.Module):
    """Ulysses sequence-parallel attention around `local_attention(q, k, v, **kw)`.

    forward dispatches on its positional arguments (all [B, S/sp, ...] sequence chunks):
      (qkv)      qkv [B, S/sp, 3, H, D]
      (q, kv)    q [B, S/sp, H, D], kv [B, S/sp, 2, Hkv, D]
      (q, k, v)  q [B, S/sp, H, D], k, v [B, S/sp, Hkv, D]
    and returns [B, S/sp, H, D]. Keywords `causal`, `cu_seqlens`, `max_seqlen`,
    `softmax_scale` go to the local attention; `cu_seqlens`/`max_seqlen` describe the full
    gathered sequence. With sp > Hkv the kv heads are first repeated so each rank gets a
    whole kv head (which needs sp % Hkv == 0).
    """

    def __init__(self, local_attention: Callable[..., torch.Tensor],
                 sequence_process_group: CommGroup) -> None:
        super().__init__()
        self.local_attn = local_attention
        self.group = sequence_process_group
        self.sp = sequence_process_group.size

    def forward(self, *tensors: torch.Tensor, causal: bool = True,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                softmax_scale: Optional[float] = None) -> torch.Tensor:
        kw = dict(causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                  softmax_scale=softmax_scale)
        if len(tensors) == 1:
            return self._qkv(tensors[0], kw)
        if len(tensors) == 2:
            return self._q_kv(tensors[0], tensors[1], kw)
        if len(tensors) == 3:
            return self._q_k_v(*tensors, kw)
        raise TypeError(f"DistributedAttention takes (qkv), (q, kv) or (q, k, v), got {len(tensors)} tensors")

    def _qkv(self, qkv: torch.Tensor, kw: dict) -> torch.Tensor:
        _check_layout("qkv", qkv, 5, {2: 3})
        self._check_heads(qkv.shape[3], qkv.shape[3])
        qkv = self._exchange("attn.qkv", (3,), (1,), qkv)[0]  # [B, S, 3, H/sp, D]
        out = self.local_attn(*qkv.unbind(2), **kw)  # [B, S, H/sp, D]
        return self._exchange("attn.out", (1,), (2,), out)[0]  # [B, S/sp, H, D]

    def _q_kv(self, q: torch.Tensor, kv: torch.Tensor, kw: dict) -> torch.Tensor:
        _check_layout("q", q, 4, {})
        _check_layout("kv", kv, 5, {2: 2})
        kv = self._whole_kv_heads(kv, head_dim=3)  # [B, S/sp, 2, max(Hkv, sp), D]
        self._check_heads(q.shape[2], kv.shape[3])
        # Both tensors in one pipelined call: kv's exchange is in flight while q's is unpacked.
        q, kv = self._exchange("attn.q_kv", (2, 3), (1, 1), q, kv)  # [B, S, H/sp, D], [B, S, 2, Hkv/sp, D]
        out = self.local_attn(q, *kv.unbind(2), **kw)  # [B, S, H/sp, D]
        return self._exchange("attn.out", (1,), (2,), out)[0]  # [B, S/sp, H, D]

    def _q_k_v(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kw: dict) -> torch.Tensor:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_layout(name, t, 4, {})
        k = self._whole_kv_heads(k, head_dim=2)  # [B, S/sp, max(Hkv, sp), D]
        v = self._whole_kv_heads(v, head_dim=2)
        self._check_heads(q.shape[2], k.shape[2])
        q, k, v = self._exchange("attn.q_k_v", (2, 2, 2), (1, 1, 1), q, k, v)  # [B, S, H/sp, D], ...
        out = self.local_attn(q, k, v, **kw)  # [B, S, H/sp, D]
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
