"""Seconds of one collective call, from measured curves or from the links of a hardware file.

Measured: the curve a collectives run recorded for this op on groups of this size spanning as
many nodes (log-log interpolation, bench/roofline.py's rule): a curve measured inside one node
says nothing of a group of the same size across nodes. Hardware file: a model of NCCL's algorithms on the
links the group spans, derived from the group's shape (docs/plan.md, "Collectives across nodes",
gives the derivation and its sources). A group of n ranks spans N nodes with l ranks on each
(ranks r and s share a node when r // gpus_per_node == s // gpus_per_node, InternEvo's rank
order, isp_core.topology.group_layout); a node has g = gpus_per_node GPUs and k = nics_per_node
NICs, local GPU j attached to NIC j * k // g; B = links.inter.busbw_gbps is one NIC's rate.

    within a node:  t = base + steps x intra latency + bytes x bus_factor(kind, n) / intra busbw
    ring (all_gather, reduce_scatter, all_reduce) across nodes: NCCL runs one ring per NIC it can
        use; every group of the kind runs at once (SPMD), so the g/l groups on a node share its
        k NICs: the ring's busbw = min(intra busbw, B x min(u, k l / g)), u the distinct NICs of
        the group's ranks on a node, divided by `oversubscription` when the fabric is not
        rail-optimized (rings then cross the spine). Latency as NCCL's tuning model: the
        inter-node steps (2(N-1) for all-reduce, N-1 otherwise) at the inter latency, the rest
        at the intra latency, plus `base_latency_us`.
    tree (all_reduce across nodes): NCCL's double binary tree moves 2 x bytes per node and
        direction over the same NICs (bytes alone on 2 nodes), at 0.92 of the ring's rate (the
        derating in NCCL's tuning.cc), with latency 2((l-1) intra + ceil(log2 N) inter).
        `algorithm: auto` takes the faster of ring and tree for each call, as NCCL's tuner does.
    all_to_all across nodes: (l-1)/n of the bytes over NVLink, (n-l)/n through the NICs at each
        rank's share B k / g (every rank of the node sends at once; PXN on a rail-optimized
        fabric reaches every NIC, else the spine's oversubscription applies); the slower wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.plan.hardware import Hardware, MeasuredCurve

BUS_FACTOR = {"all_gather": lambda n: (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
              "all_to_all": lambda n: (n - 1) / n, "all_reduce": lambda n: 2 * (n - 1) / n,
              "broadcast": lambda n: 1.0}
TREE_DERATE = 0.92  # NCCL src/graph/tuning.cc: tree all-reduce busBw *= .92


@dataclass(frozen=True)
class Placement:
    size: int
    nodes: int
    per_node: int   # l: the group's ranks on one node
    nics: int = 1   # u: distinct NICs those ranks are attached to

    @property
    def where(self) -> str:
        return "intra" if self.nodes == 1 else "inter"


def place(ranks: list[int], gpus_per_node: int, nics_per_node: int | None = None) -> Placement:
    k = nics_per_node or gpus_per_node
    by_node: dict[int, list[int]] = {}
    for r in ranks:
        by_node.setdefault(r // gpus_per_node, []).append(r % gpus_per_node)
    first = next(iter(by_node.values()))
    nics = len({j * k // gpus_per_node for j in first})
    return Placement(len(ranks), len(by_node), len(ranks) // len(by_node), max(1, nics))


class LinkModel:
    """time_s(kind, nbytes, placement); `source(kind, placement)` says where a time comes from."""

    def __init__(self, hardware: Hardware, curves: tuple[MeasuredCurve, ...] = (), ranks_per_node: int = 1) -> None:
        self.hw = hardware
        # Extra latency per call with this many ranks busy on a host (Hardware.busy_latency_s):
        # the calibrated figure for the nearest rank count at or below, else the smallest.
        known = sorted(hardware.busy_latency_s)
        below = [r for r in known if r <= ranks_per_node]
        self.busy_s = hardware.busy_latency_s[below[-1] if below else known[0]] if known else 0.0
        # Curves given directly (--link-profile) win over the hardware file's own.
        self.curves = tuple(curves) + tuple(hardware.curves)

    def _curve(self, kind: str, where: Placement) -> MeasuredCurve | None:
        return next((c for c in self.curves if c.op == kind and c.group_size == where.size
                     and c.nodes == where.nodes), None)

    def source(self, kind: str, where: Placement) -> str:
        if where.size == 1:
            return "none"
        if self._curve(kind, where) is not None:
            return f"measured {kind} on {where.size} ranks"
        if where.nodes == 1:
            return "intra link"
        share = self._nic_share(where) if kind != "all_to_all" else self.hw.links.nics_per_node / self.hw.gpus_per_node
        algo = self._algorithm(kind, 1 << 30, where) if kind == "all_reduce" else "ring"
        return f"inter: {algo if kind != 'all_to_all' else 'p2p'}, {share:g} NIC(s) of {where.nodes} nodes"

    def time_s(self, kind: str, nbytes: float, where: Placement) -> float:
        if where.size == 1 or nbytes <= 0:
            return 0.0
        curve = self._curve(kind, where)
        link = curve.time_s(nbytes) if curve is not None else self._modelled(kind, nbytes, where)
        return link + self.busy_s

    # the model -----------------------------------------------------------------------------------
    def _links(self, kind: str, n: int) -> tuple[float, float, float, float]:
        """(intra B/s, intra latency s, NIC B/s, inter latency s)."""
        intra, inter = self.hw.intra, self.hw.inter or self.hw.intra
        if intra is None or inter is None:
            raise ValueError(f"{self.hw.source}: no measured {kind} curve for {n} ranks and no links.intra to "
                             "model one; add links.intra/inter or measure this group size")
        return intra.busbw_gbps * 1e9, intra.latency_us * 1e-6, inter.busbw_gbps * 1e9, inter.latency_us * 1e-6

    def _nic_share(self, where: Placement) -> float:
        """NICs' worth of bandwidth a ring of this group gets on each node (see the docstring)."""
        g, k = self.hw.gpus_per_node, self.hw.links.nics_per_node
        return min(where.nics, k * where.per_node / g)

    def _spine(self) -> float:
        return 1.0 if self.hw.links.rail_optimized else self.hw.links.oversubscription

    def _modelled(self, kind: str, nbytes: float, where: Placement) -> float:
        n, base = where.size, self.hw.links.base_latency_s
        kind = self.hw.runs_as.get(kind, kind)  # the traffic of the algorithm the backend really runs
        intra_bw, intra_lat, nic_bw, inter_lat = self._links(kind, n)
        steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
        if kind == "broadcast":
            steps = n - 1
        if where.nodes == 1:
            return base + steps * intra_lat + nbytes * BUS_FACTOR[kind](n) / intra_bw
        if kind == "all_to_all":
            lat = base + (where.per_node - 1) * intra_lat + (n - where.per_node) * inter_lat
            local = (where.per_node - 1) / n * nbytes / intra_bw
            per_rank = nic_bw * self.hw.links.nics_per_node / self.hw.gpus_per_node / self._spine()
            return lat + max(local, (n - where.per_node) / n * nbytes / per_rank)
        ring = self._ring(kind, nbytes, where, steps)
        if kind != "all_reduce" or self.hw.links.algorithm == "ring":
            return ring
        tree = self._tree(nbytes, where)
        return tree if self.hw.links.algorithm == "tree" else min(ring, tree)

    def _ring(self, kind: str, nbytes: float, where: Placement, steps: int) -> float:
        intra_bw, intra_lat, nic_bw, inter_lat = self._links(kind, where.size)
        busbw = min(intra_bw, nic_bw * self._nic_share(where) / self._spine())
        inter_steps = min(steps, 2 * (where.nodes - 1) if kind == "all_reduce" else where.nodes - 1)
        lat = self.hw.links.base_latency_s + (steps - inter_steps) * intra_lat + inter_steps * inter_lat
        return lat + nbytes * BUS_FACTOR[kind](where.size) / busbw

    def _tree(self, nbytes: float, where: Placement) -> float:
        intra_bw, intra_lat, nic_bw, inter_lat = self._links("all_reduce", where.size)
        l, nodes = where.per_node, where.nodes
        lat = self.hw.links.base_latency_s + 2 * ((l - 1) * intra_lat + math.ceil(math.log2(nodes)) * inter_lat)
        per_node = nbytes * (1.0 if nodes == 2 else 2.0)
        net = per_node / (nic_bw * self._nic_share(where) / self._spine() * TREE_DERATE)
        chain = 2 * (l - 1) / l * nbytes / intra_bw if l > 1 else 0.0
        return lat + max(net, chain)

    def _algorithm(self, kind: str, nbytes: float, where: Placement) -> str:
        if self.hw.links.algorithm != "auto":
            return self.hw.links.algorithm
        steps = 2 * (where.size - 1)
        return "tree" if self._tree(nbytes, where) < self._ring(kind, nbytes, where, steps) else "ring"
