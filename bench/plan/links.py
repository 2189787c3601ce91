"""Seconds of one collective call, from measured curves or from the links of a hardware file.

Measured: the curve a collectives run recorded for this op on groups of this size spanning as
many nodes (log-log interpolation, bench/roofline.py's rule): a curve measured inside one node
says nothing of a group of the same size across nodes. Hardware file: an alpha-beta model on the link the
group's ranks span. Ranks r and s share a node when r // gpus_per_node == s // gpus_per_node
(InternEvo's rank order, isp_core.topology.group_layout):

    t = steps x latency + bytes x bus_factor(kind, n) / busbw       (busbw: nccl-tests' sense)

steps = n - 1 (ring all-gather, reduce-scatter, all-to-all), 2 (n - 1) for all-reduce. A group
within one node uses the intra link. A group across nodes is limited by each GPU's NIC: ring
collectives take the inter busbw; an all-to-all sends (l - 1)/n of its bytes over NVLink and
(n - l)/n over the NIC (l = the group's ranks per node), each at its own bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.plan.hardware import Hardware, MeasuredCurve

BUS_FACTOR = {"all_gather": lambda n: (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
              "all_to_all": lambda n: (n - 1) / n, "all_reduce": lambda n: 2 * (n - 1) / n}


@dataclass(frozen=True)
class Placement:
    size: int
    nodes: int
    per_node: int  # the group's ranks on one node

    @property
    def where(self) -> str:
        return "intra" if self.nodes == 1 else "inter"


def place(ranks: list[int], gpus_per_node: int) -> Placement:
    nodes = {r // gpus_per_node for r in ranks}
    return Placement(len(ranks), len(nodes), len(ranks) // len(nodes))


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
        return f"{where.where} link"

    def time_s(self, kind: str, nbytes: float, where: Placement) -> float:
        if where.size == 1 or nbytes <= 0:
            return 0.0
        curve = self._curve(kind, where)
        link = curve.time_s(nbytes) if curve is not None else self._alpha_beta(kind, nbytes, where)
        return link + self.busy_s

    def _alpha_beta(self, kind: str, nbytes: float, where: Placement) -> float:
        n, hw = where.size, self.hw
        kind = hw.runs_as.get(kind, kind)  # the traffic of the algorithm the backend really runs
        intra = hw.intra
        inter = hw.inter or hw.intra
        if intra is None or inter is None:
            raise ValueError(f"{hw.source}: no measured {kind} curve for {n} ranks and no links.intra to "
                             "model one; add links.intra/inter or measure this group size")
        steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
        if where.nodes == 1:
            return steps * intra.latency_us * 1e-6 + nbytes * BUS_FACTOR[kind](n) / (intra.busbw_gbps * 1e9)
        latency = max(intra.latency_us, inter.latency_us) * 1e-6 * steps
        if kind == "all_to_all":
            local = (where.per_node - 1) / n * nbytes / (intra.busbw_gbps * 1e9)
            remote = (n - where.per_node) / n * nbytes / (inter.busbw_gbps * 1e9)
            return latency + max(local, remote)
        return latency + nbytes * BUS_FACTOR[kind](n) / (inter.busbw_gbps * 1e9)
