"""Collectives along any dim on real gloo processes, checked against local arithmetic."""

import torch

from tests.support.dist_harness import run_ranks
from isp_core.collectives import all_gather, all_reduce_, reduce_scatter, seq_all_to_all
from isp_core.topology import ParallelTopology


def _full(world_size: int) -> torch.Tensor:
    return torch.arange(world_size * 4 * 6, dtype=torch.float64).view(4 * world_size // 2, 6, 2)


def _collectives(rank: int, world_size: int) -> dict:
    topo = ParallelTopology(world_size, sp=world_size, wp=world_size, rank=rank)
    g = topo.weight
    base = torch.arange(24, dtype=torch.float64).view(2, 3, 4)
    mine = base + 100 * rank
    expect = {d: torch.cat([base + 100 * r for r in range(world_size)], dim=d) for d in range(3)}
    for d in range(3):
        got = all_gather(mine, g, dim=d, async_op=True).wait()
        assert torch.equal(got, expect[d]), f"all_gather dim {d}"
        out = torch.empty_like(expect[d])
        assert all_gather(mine, g, dim=d, out=out).wait() is out and torch.equal(out, expect[d])
    # reduce_scatter along dim d: every rank contributes (rank+1) * big; AVG then chunk.
    big = torch.arange(2 * 4 * 6 * world_size, dtype=torch.float64).view(2 * world_size, 4, 6)
    scale = sum(r + 1 for r in range(world_size)) / world_size
    for d, size in ((0, 2 * world_size), (2, 6)):
        if size % world_size:
            continue
        shard = reduce_scatter(big * (rank + 1), g, dim=d, async_op=True).wait()
        want = (big * scale).chunk(world_size, d)[rank]
        assert torch.allclose(shard, want), f"reduce_scatter dim {d}"
    # all-to-all [B, S/n, H, D] -> [B, S, H/n, D] and back.
    full = torch.randn(2, 4 * world_size, 2 * world_size, 3, generator=torch.Generator().manual_seed(0))
    local = full.chunk(world_size, 1)[rank]
    heads = seq_all_to_all(topo.sequence, local, scatter_dim=2, gather_dim=1)
    assert torch.equal(heads, full.chunk(world_size, 2)[rank])
    back = seq_all_to_all(topo.sequence, heads, scatter_dim=1, gather_dim=2)
    assert torch.equal(back, local)
    x = torch.full((3,), float(rank))
    all_reduce_(x, topo.world, op="avg")
    assert torch.allclose(x, torch.full((3,), (world_size - 1) / 2))
    return topo.stats.snapshot()


def test_collectives_along_any_dim_two_and_four_ranks() -> None:
    for world_size in (2, 4):
        stats = run_ranks(world_size, _collectives)
        assert stats[0]["weight"]["all_gather"]["calls"] == 6
        assert stats[0]["sequence"]["all_to_all"]["calls"] == 2
