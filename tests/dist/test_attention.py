"""Ulysses attention on real gloo processes against an explicit-mask reference on one process.

The reference below builds its mask by hand (causal lower triangle, one block per document)
and indexes kv heads by h // group, so it shares no code with `local_attention`.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from tests.support.dist_harness import run_ranks
from isp_core import attention
from isp_core.attention import DistributedAttention, LocalAttention, expand_kv_heads, local_attention
from isp_core.comm_stats import CommStats
from isp_core.topology import CommGroup, ParallelTopology

ATOL = 1e-5
DOCS = [0, 5, 16, 29, 32]  # uneven documents over S=32, B=1
S, D = 32, 8


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        cu_seqlens: Optional[list[int]] = None,
                        scale: Optional[float] = None) -> torch.Tensor:
    """q [B,S,H,D], k/v [B,S,Hkv,D] -> [B,S,H,D] through a materialised [S,S] mask."""
    B, L, H, Dh = q.shape
    kv_head = torch.arange(H) // (H // k.shape[2])
    k, v = k[:, :, kv_head], v[:, :, kv_head]  # [B,S,H,D]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (Dh ** -0.5 if scale is None else scale)
    allowed = torch.ones(L, L, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    if cu_seqlens is not None:
        assert B == 1
        same_doc = torch.zeros(L, L, dtype=torch.bool)
        for s, e in zip(cu_seqlens, cu_seqlens[1:]):
            same_doc[s:e, s:e] = True
        allowed &= same_doc
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _inputs(packing: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    if packing == "qkv":
        return [torch.stack([q, k, v], dim=2)]
    if packing == "q_kv":
        return [q, torch.stack([k, v], dim=2)]
    return [q, k, v]


# (packing, H, Hkv, varlen, causal, softmax_scale)
CONFIGS = [("qkv", 8, 8, False, True, None), ("qkv", 8, 8, True, True, None)]
for _packing in ("q_kv", "q_k_v"):
    for _hkv in (4, 2, 1):  # sp=4: no expansion, expansion by 2, by 4
        for _varlen in (False, True):
            CONFIGS.append((_packing, 8, _hkv, _varlen, True, None))
CONFIGS.append(("q_kv", 8, 2, True, False, 0.3))


class _Recorder:
    """Stands in for _SeqAllToAll in the attention module and logs each forward call."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, []

    def apply(self, group, scatter, gather, label, *xs):
        self.calls.append((label, scatter, gather, len(xs)))
        return self.real.apply(group, scatter, gather, label, *xs)


EXPECTED_CALLS = {
    "qkv": [("attn.qkv", (3,), (1,), 1), ("attn.out", (1,), (2,), 1)],
    "q_kv": [("attn.q_kv", (2, 3), (1, 1), 2), ("attn.out", (1,), (2,), 1)],
    "q_k_v": [("attn.q_k_v", (2, 2, 2), (1, 1, 1), 3), ("attn.out", (1,), (2,), 1)],
}


def _check_config(topo: ParallelTopology, index: int, cfg: tuple) -> None:
    packing, H, Hkv, varlen, causal, scale = cfg
    sp, rank = topo.sp, topo.sequence.rank
    B = 1 if varlen else 2
    gen = torch.Generator().manual_seed(1000 + index)  # identical on every rank
    q, k, v = _randn(gen, B, S, H, D), _randn(gen, B, S, Hkv, D), _randn(gen, B, S, Hkv, D)
    dout = _randn(gen, B, S, H, D)
    docs = DOCS if varlen else None

    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref_in, causal=causal, cu_seqlens=docs, scale=scale)
    ref_out.backward(dout.double())
    chunk = slice(rank * S // sp, (rank + 1) * S // sp)
    want_grads = [g[:, chunk].float() for g in _inputs(packing, *(t.grad for t in ref_in))]

    local = [t[:, chunk].clone().requires_grad_() for t in _inputs(packing, q, k, v)]
    kw = {"causal": causal, "softmax_scale": scale}
    if varlen:
        kw.update(cu_seqlens=torch.tensor(DOCS, dtype=torch.int32), max_seqlen=13)
    recorder = _Recorder(attention._SeqAllToAll)
    attention._SeqAllToAll = recorder
    try:
        out = DistributedAttention(LocalAttention(), topo.sequence)(*local, **kw)
    finally:
        attention._SeqAllToAll = recorder.real
    out.backward(dout[:, chunk])

    where = f"sp={sp} rank={rank} config={cfg}"
    assert recorder.calls == EXPECTED_CALLS[packing], where
    assert out.shape == (B, S // sp, H, D), where
    torch.testing.assert_close(out, ref_out[:, chunk].float(), atol=ATOL, rtol=0, msg=where)
    for name, t, want in zip(packing.split("_"), local, want_grads):
        torch.testing.assert_close(t.grad, want, atol=ATOL, rtol=0, msg=f"grad {name} {where}")


def _all_configs(rank: int, world_size: int) -> dict:
    topo = ParallelTopology(world_size, sp=world_size, wp=world_size, rank=rank)
    for index, cfg in enumerate(CONFIGS):
        _check_config(topo, index, cfg)
    topo.stats.reset()
    # Communication volume of one q_kv step: q, kv and out forward, their grads backward.
    _check_config(topo, 0, ("q_kv", 8, 2, False, True, None))
    return topo.stats.snapshot()


@pytest.mark.parametrize("sp", [2, 4])
def test_distributed_attention_matches_full_sequence(sp: int) -> None:
    stats = run_ranks(sp, _all_configs)
    assert stats[0]["sequence"]["all_to_all"]["calls"] == 6


# ---- single process ---------------------------------------------------------------------


def _group(size: int) -> CommGroup:
    return CommGroup("sequence", tuple(range(size)), 0, None, CommStats())


def test_local_attention_matches_reference_plain_and_gqa() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = _randn(gen, 2, S, 8, D), _randn(gen, 2, S, 2, D), _randn(gen, 2, S, 2, D)
    for causal in (True, False):
        torch.testing.assert_close(local_attention(q, k, v, causal=causal),
                                   reference_attention(q, k, v, causal=causal), atol=ATOL, rtol=0)


def test_local_attention_varlen_is_per_document() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = _randn(gen, 1, S, 4, D), _randn(gen, 1, S, 2, D), _randn(gen, 1, S, 2, D)
    for cu in (torch.tensor(DOCS, dtype=torch.int32), torch.tensor(DOCS, dtype=torch.int64)):
        for causal in (True, False):
            got = local_attention(q, k, v, causal=causal, cu_seqlens=cu, softmax_scale=0.5)
            want = reference_attention(q, k, v, causal=causal, cu_seqlens=DOCS, scale=0.5)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_local_attention_does_not_cross_documents() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = _randn(gen, 1, S, 4, D), _randn(gen, 1, S, 4, D), _randn(gen, 1, S, 4, D)
    cu = torch.tensor(DOCS)
    base = local_attention(q, k, v, causal=False, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:16] += 10.0  # document 1 only
    v2[:, 5:16] -= 3.0
    moved = local_attention(q, k2, v2, causal=False, cu_seqlens=cu)
    outside = torch.cat([torch.arange(0, 5), torch.arange(16, S)])
    assert torch.equal(moved[:, outside], base[:, outside])
    assert not torch.allclose(moved[:, 5:16], base[:, 5:16])


def test_local_attention_rejects_bad_inputs() -> None:
    q, kv = torch.zeros(1, 8, 6, 4), torch.zeros(1, 8, 4, 4)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        local_attention(q, kv, kv)
    q = torch.zeros(1, 8, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        local_attention(q, kv, kv, cu_seqlens=torch.tensor([0, 3, 7]))


def test_expand_kv_heads_order_and_backward_sum() -> None:
    kv = torch.arange(2 * 3, dtype=torch.float64).view(1, 1, 2, 3, 1).requires_grad_()
    out = expand_kv_heads(kv, 2, 3)  # [1,1,2,6,1]
    assert out.shape == (1, 1, 2, 6, 1)
    assert out[0, 0, :, :, 0].tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]]
    grad = torch.arange(12, dtype=torch.float64).view(1, 1, 2, 6, 1)
    out.backward(grad)
    assert kv.grad[0, 0, :, :, 0].tolist() == [[1, 5, 9], [13, 17, 21]]
    assert expand_kv_heads(kv, 1, 3) is kv
    torch.autograd.gradcheck(lambda t: expand_kv_heads(t, 3, -2), (kv.detach().requires_grad_(),))


def test_sp1_runs_local_attention_without_communication() -> None:
    group = _group(1)
    gen = torch.Generator().manual_seed(3)
    q, k, v = _randn(gen, 1, S, 4, D), _randn(gen, 1, S, 1, D), _randn(gen, 1, S, 1, D)
    attn = DistributedAttention(LocalAttention(), group)
    want = reference_attention(q, k, v, cu_seqlens=DOCS)
    cu = torch.tensor(DOCS)
    for packing in ("q_kv", "q_k_v"):
        torch.testing.assert_close(attn(*_inputs(packing, q, k, v), cu_seqlens=cu), want,
                                   atol=ATOL, rtol=0)
    assert group.stats.snapshot() == {}


@pytest.mark.parametrize("args, match", [
    (((1, 4, 3, 6, 8),), "divide by sp=4"),                       # qkv: 6 heads
    (((1, 4, 8, 8), (1, 4, 2, 3, 8)), "not a multiple"),          # sp=4 > 3 kv heads
    (((1, 4, 12, 8), (1, 4, 6, 8), (1, 4, 6, 8)), "divide by sp=4"),  # 6 kv heads
    (((1, 4, 6, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "divide by sp=4"),   # 6 q heads
    (((1, 4, 8, 8), (1, 4, 3, 2, 8)), "kv must be"),              # kv not packed in 2
])
def test_head_counts_checked_before_any_communication(args: tuple, match: str) -> None:
    group = _group(4)  # pg None: a communication attempt would fail differently
    attn = DistributedAttention(LocalAttention(), group)
    with pytest.raises(ValueError, match=match):
        attn(*(torch.zeros(shape) for shape in args))
    assert group.stats.snapshot() == {}
