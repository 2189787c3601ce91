"""A small llama-class model in plain PyTorch: it knows nothing about communication.

isp_core.engine turns it into its ISP form by swapping modules (linears for weight-parallel
linears, the attention core for DistributedAttention, ...); a single-process reference is
the very same class left as it is. Module names follow InternLM2 so ISP finds what it
expects: `attention.wqkv`, `attention.wo`, `feed_forward.w1/w3/w2` (built in execution order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from isp_core.attention import ATTENTION_BACKENDS, LocalAttention


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 4096
    mlp_hidden: int = 704
    checkpoint: float = 0.0  # fraction of blocks, from the first, recomputed in backward
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention: str = "auto"  # local attention kernel: auto | flash | sdpa (isp_core.attention)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden={self.hidden} must divide by heads={self.heads} and heads "
                             f"by kv_heads={self.kv_heads}")
        if not 0.0 <= self.checkpoint <= 1.0:
            raise ValueError(f"checkpoint={self.checkpoint} must be a fraction in [0, 1]")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ckpt_blocks(self) -> int:
        return int(self.checkpoint * self.layers)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x [B, S, H, D] by angle position * theta^(-2i/D).

    Positions are per token, so a sequence-split rank passes the positions of its own
    tokens (and packed documents restart at 0) and gets the same result as one process.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, S, D/2]
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)  # [B, S, 1, D/2]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.cfg = cfg
        qkv_out = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden, qkv_out, bias=False, device=device)
        # InternEvo's contract: core(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
        # the ISP form wraps this same module in DistributedAttention.
        self.core: nn.Module = LocalAttention(causal=True, backend=cfg.attention)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False, device=device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                max_seqlen: Optional[int]) -> torch.Tensor:
        cfg, (b, s, _) = self.cfg, x.shape
        qkv = self.wqkv(x).view(b, s, cfg.heads + 2 * cfg.kv_heads, cfg.head_dim)
        q, k, v = qkv.split([cfg.heads, cfg.kv_heads, cfg.kv_heads], dim=2)
        q = apply_rotary(q, positions, cfg.rope_theta)          # [B, S, H, D]
        k = apply_rotary(k, positions, cfg.rope_theta)          # [B, S, Hkv, D]
        kv = torch.stack([k, v], dim=2)                          # [B, S, 2, Hkv, D]
        context = self.core(q, kv, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                            max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)  # [B, S, H, D]
        return self.wo(context.reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.mlp_hidden, bias=False, device=device)
        self.w3 = nn.Linear(cfg.hidden, cfg.mlp_hidden, bias=False, device=device)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.hidden, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device)
        self.attention = Attention(cfg, device)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device)
        self.feed_forward = FeedForward(cfg, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                max_seqlen: Optional[int]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), positions, cu_seqlens, max_seqlen)
        return x + self.feed_forward(self.ffn_norm(x))


def _checkpointed(block: nn.Module, index: int):
    """The block, labelled in traces: reentrant checkpointing runs it without grad in forward
    and again with grad (the recompute) right before its backward."""

    def run(*args):
        phase = "recompute" if torch.is_grad_enabled() else "forward_no_grad"
        with record_function(f"isp.{phase}.block{index}"):
            return block(*args)

    return run


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Module = nn.Embedding(cfg.vocab, cfg.hidden, device=device)
        self.layers = nn.ModuleList(Block(cfg, device) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, device)
        self.output: nn.Module = nn.Linear(cfg.hidden, cfg.vocab, bias=False, device=device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
        h = self.tok_embeddings(tokens)                          # [B, S, hidden]
        for index, block in enumerate(self.layers):
            if index < self.cfg.ckpt_blocks:
                # Reentrant checkpointing recomputes a whole block right before its backward,
                # the order ISP's recompute prefetch is built around.
                h = checkpoint(_checkpointed(block, index), h, positions, cu_seqlens, max_seqlen,
                               use_reentrant=True, preserve_rng_state=False)
            else:
                h = block(h, positions, cu_seqlens, max_seqlen)
        return self.output(self.norm(h))                         # [B, S, vocab] (sharded forms: see engine)
