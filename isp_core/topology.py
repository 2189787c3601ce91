"""Parallel sizes and process groups, all built from one rank grid.

InternEvo lays ranks out so that a sequence group is a run of `sp` consecutive ranks and a
weight group a run of `wp` consecutive ranks; the data and weight-data groups are the
columns of those grids. With 8 ranks, sp=2, wp=4:

    sequence    {0,1} {2,3} {4,5} {6,7}        grid arange(8).view(dp=4, sp=2), rows
    data        {0,2,4,6} {1,3,5,7}            same grid, columns
    weight      {0,1,2,3} {4,5,6,7}            grid arange(8).view(wdp=2, wp=4), rows
    weight-data {0,4} {1,5} {2,6} {3,7}        same grid, columns

Nothing here is global: a `ParallelTopology` is built once and passed to whoever needs it.
Every group of every kind is its own process group (its own NCCL communicator and stream),
never the default WORLD group, which the benchmark keeps for its own barriers.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from isp_core.comm_stats import CommStats

GROUP_NAMES = ("sequence", "data", "weight", "weight_data", "world")


def check_sizes(world_size: int, sp: int, wp: int) -> None:
    """Raise ValueError unless sp and wp are positive divisors of world_size."""
    problems = []
    for name, size in (("world_size", world_size), ("sp", sp), ("wp", wp)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.append(f"{name}={size!r} must be a positive integer")
    if not problems:
        if world_size % sp:
            problems.append(f"world_size={world_size} is not divisible by sp={sp}")
        if world_size % wp:
            problems.append(f"world_size={world_size} is not divisible by wp={wp}")
    if problems:
        raise ValueError("invalid parallel sizes: " + "; ".join(problems))


def group_layout(world_size: int, sp: int, wp: int) -> dict[str, list[list[int]]]:
    """Every group of every kind, as lists of global ranks (pure; no torch.distributed)."""
    check_sizes(world_size, sp, wp)
    ranks = torch.arange(world_size)
    seq_grid = ranks.view(world_size // sp, sp)
    weight_grid = ranks.view(world_size // wp, wp)
    return {
        "sequence": seq_grid.tolist(),
        "data": seq_grid.t().tolist(),
        "weight": weight_grid.tolist(),
        "weight_data": weight_grid.t().tolist(),
        "world": [ranks.tolist()],
    }


class UnbuiltGroup:
    """Stands in for a process group its user said it never sends on, so none was set up (a gloo
    connection mesh or an NCCL communicator each costs start-up time, NCCL's also memory). Any
    use fails with this message; None would silently mean the default group to torch."""

    def __init__(self, name: str) -> None:
        self.group_name = name

    def __getattr__(self, attr: str) -> None:
        raise RuntimeError(f"the {self.group_name} process group was not built: its strategy declared "
                           f"it unused (ParallelTopology build=...), yet something sends on it")


@dataclass
class CommGroup:
    """One process group as seen from this rank, with the name used in traces and counts."""

    name: str
    ranks: tuple[int, ...]
    rank: int  # this rank's index inside the group
    # None when the group has one rank: nothing to send; UnbuiltGroup when declared unused
    pg: "Optional[dist.ProcessGroup | UnbuiltGroup]"
    stats: CommStats = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)


class ParallelTopology:
    """Sizes `world_size`, `sp`, `wp`, derived `dp` and `wdp`, and this rank's groups.

    Must be constructed on every rank in the same order (torch.distributed.new_group is
    collective). With world_size 1 no process group is needed and none is created. `build`
    names the kinds that get process groups (default: all); the others keep their ranks (a
    replica index still says which data a rank reads) and an UnbuiltGroup.
    """

    def __init__(self, world_size: int, sp: int, wp: int, rank: int = 0,
                 stats: Optional[CommStats] = None, build: Optional[Collection[str]] = None) -> None:
        layout = group_layout(world_size, sp, wp)
        self.world_size, self.sp, self.wp, self.rank = world_size, sp, wp, rank
        self.dp = world_size // sp
        self.wdp = world_size // wp
        self.stats = stats if stats is not None else CommStats()
        self.groups: dict[str, CommGroup] = {}
        for name in GROUP_NAMES:
            mine = None
            for ranks in layout[name]:
                pg: "Optional[dist.ProcessGroup | UnbuiltGroup]" = None
                if len(ranks) > 1 and build is not None and name not in build:
                    pg = UnbuiltGroup(name)
                elif len(ranks) > 1:
                    # Every rank takes part in creating every group, as new_group requires.
                    # Each logical group gets its own communicator even when its ranks are
                    # the whole world (or equal another group's): reusing WORLD would put
                    # weight all-gathers, attention all-to-alls and loss all-reduces on one
                    # NCCL communicator and stream, unlike InternEvo, so layouts would
                    # differ in more than their sizes.
                    pg = dist.new_group(ranks)
                if rank in ranks:
                    mine = CommGroup(name, tuple(ranks), ranks.index(rank), pg, self.stats)
            assert mine is not None, f"rank {rank} is in no {name} group"
            self.groups[name] = mine

    @classmethod
    def from_env(cls, sp: int, wp: int, stats: Optional[CommStats] = None,
                 build: Optional[Collection[str]] = None) -> "ParallelTopology":
        """Build from the initialised default process group (or a single process)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), sp, wp, dist.get_rank(), stats, build)
        return cls(1, sp, wp, 0, stats, build)

    @property
    def sequence(self) -> CommGroup:
        return self.groups["sequence"]

    @property
    def data(self) -> CommGroup:
        return self.groups["data"]

    @property
    def weight(self) -> CommGroup:
        return self.groups["weight"]

    @property
    def weight_data(self) -> CommGroup:
        return self.groups["weight_data"]

    @property
    def world(self) -> CommGroup:
        return self.groups["world"]

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data-parallel replica (which slice of the batch it reads)."""
        return self.data.rank

    def __str__(self) -> str:
        lines = [f"ParallelTopology(world_size={self.world_size}, sp={self.sp}, wp={self.wp}, "
                 f"dp={self.dp}, wdp={self.wdp}) rank {self.rank}:"]
        lines += [f"  {name:<12} {list(g.ranks)}" for name, g in self.groups.items()]
        return "\n".join(lines)


def as_comm_group(group: "CommGroup | dist.ProcessGroup | None", name: str,
                  stats: Optional[CommStats] = None) -> CommGroup:
    """A CommGroup for `group`: returned as is, or built around a plain torch ProcessGroup
    (InternEvo's callers pass those) with its own counts unless `stats` is given.
    None stands for a single process, as for torch.distributed with no group."""
    if isinstance(group, CommGroup):
        return group
    stats = stats if stats is not None else CommStats()
    if group is None:
        return CommGroup(name, (0,), 0, None, stats)
    ranks = tuple(dist.get_process_group_ranks(group))
    return CommGroup(name, ranks, dist.get_rank(group), group if len(ranks) > 1 else None, stats)
