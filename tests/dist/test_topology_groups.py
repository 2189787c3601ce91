"""Every logical group is its own process group, even when it spans the whole world."""

from __future__ import annotations

import torch
import torch.distributed as dist

from isp_core.topology import GROUP_NAMES, ParallelTopology
from tests.support.dist_harness import run_ranks


def _distinct_groups(rank: int, world_size: int) -> dict:
    topo = ParallelTopology(world_size, sp=world_size, wp=world_size, rank=rank)
    pgs = {name: topo.groups[name].pg for name in GROUP_NAMES if topo.groups[name].size > 1}
    # Each group must still work on its own: a sum over it gives the group's size.
    sums = {}
    for name, pg in pgs.items():
        t = torch.ones(1)
        dist.all_reduce(t, group=pg)
        sums[name] = int(t.item())
    return {"spanning": sorted(pgs), "is_world": [n for n, pg in pgs.items() if pg is dist.group.WORLD],
            "distinct": len({id(pg) for pg in pgs.values()}), "sums": sums, **_only_built(rank, world_size)}


def _only_built(rank: int, world_size: int) -> dict:
    """A strategy's declared groups get process groups; a use of any other fails, naming it."""
    topo = ParallelTopology(world_size, sp=world_size, wp=world_size, rank=rank, build=("world",))
    t = torch.ones(1)
    dist.all_reduce(t, group=topo.world.pg)
    try:
        dist.all_reduce(torch.ones(1), group=topo.sequence.pg)
        error = ""
    except (RuntimeError, ValueError) as exc:  # torch may wrap ours: the chain shows both
        error = f"{exc} <- {exc.__context__}"
    return {"built_sum": int(t.item()), "unbuilt_error": error, "unbuilt_rank": topo.sequence.rank}


def test_groups_spanning_the_world_get_their_own_communicator() -> None:
    for result in run_ranks(2, _distinct_groups):
        # At sp = wp = world_size sequence, weight and world all span the world.
        assert result["spanning"] == ["sequence", "weight", "world"]
        assert result["is_world"] == []
        assert result["distinct"] == 3
        assert result["sums"] == {"sequence": 2, "weight": 2, "world": 2}
        assert result["built_sum"] == 2 and "sequence process group was not built" in result["unbuilt_error"]
        assert result["unbuilt_rank"] in (0, 1)  # its ranks are still known
