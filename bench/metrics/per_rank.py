"""Every rank's own figures and the straggler: `metrics.per_rank` and `metrics.straggler`.

Per rank (each rank's median over the measured steps, bench/worker/rank_figures.py):
`step_time_s` (its own time to finish the step), `compute_s`, `comm_s`, `exposed_comm_s`; with
NVML on every rank `power_w` (mean power), `sm_clock_mhz` (mean SM clock) and the
`throttle_reasons` seen. For each figure: the values, min, median (over ranks; the mean of the
two middle ones for an even count), max, and the rank and node of the min and the max.

A straggler is a rank whose compute_s is more than `run.straggler_pct` above the median rank's:
    lag_pct(r) = 100 * (compute_s[r] / median_r compute_s - 1)
Compute, not step time: in a synchronous step every rank ends together (the fast ones wait in
collectives for the slow one), but only the slow one spends the extra time outside them. With
several nodes, a node's compute is the median of its ranks', and a node is a straggler when
that is more than the threshold above the median node's.

Where the split comes from (`measured_by`): the rank's host clock around its collective waits
(CPU/gloo: the rank's own time), or on CUDA, when the cell was profiled, each rank's trace
(NCCL kernels against compute kernels, bench/metrics/overlap.py) for compute, comm and exposed
comm; on CUDA without a trace the host split is kept and says so.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

from bench.metrics.measurement import Measurement, RankMeasurement

SPLIT = ("compute_s", "comm_s", "exposed_comm_s")
HOST = "host clock: time blocked in collective waits vs the rest of the rank's step"
HOST_CUDA = HOST + " (CUDA: the host only enqueues, so this is not GPU communication time)"
TRACE = "profiled trace: NCCL kernels vs compute kernels of each rank (profiled steps)"


def figure(values: list[float], node_of_rank: list[int]) -> dict[str, Any]:
    """min, median, max over ranks, with the rank and node of the min and the max."""
    lo = min(range(len(values)), key=lambda r: values[r])
    hi = max(range(len(values)), key=lambda r: values[r])
    return {"values": values, "min": values[lo], "min_rank": lo, "min_node": node_of_rank[lo],
            "median": statistics.median(values), "max": values[hi], "max_rank": hi, "max_node": node_of_rank[hi]}


def _median_of(steps: dict[str, Any], key: str) -> float:
    return statistics.median(steps[key])


def _nvml_figures(ranks: list[RankMeasurement]) -> dict[str, Any]:
    nvml = [r.nvml or {} for r in ranks]
    if not all(n.get("available") for n in nvml):
        return {}
    out: dict[str, Any] = {"throttle_reasons": [list(n.get("throttle_reasons") or []) for n in nvml]}
    for name, key in (("power_w", "power_mean_w"), ("sm_clock_mhz", "sm_clock_mean_mhz")):
        values = [n.get(key) for n in nvml]
        if all(isinstance(v, (int, float)) for v in values):
            out[name] = values
    return out


def _trace_split(ranks: list[RankMeasurement]) -> Optional[dict[str, list[float]]]:
    """Per rank compute/comm/exposed from the profiled trace, when every rank has one."""
    overlaps = [((r.profile or {}).get("figures") or {}).get("overlap") for r in ranks]
    if not all(overlaps):
        return None
    return {key: [float(o[key]) for o in overlaps] for key in SPLIT}


def per_rank(m: Measurement, device_type: str) -> Optional[dict[str, Any]]:
    """metrics.per_rank, or None when the ranks sent no per-step figures (an older worker)."""
    steps = [r.steps for r in m.ranks]
    if not all(steps):
        return None
    nodes = [int(s["node"]) for s in steps]
    values = {"step_time_s": [_median_of(s, "step_s") for s in steps],
              **{key: [_median_of(s, key) for s in steps] for key in SPLIT}}
    measured_by = HOST
    if device_type == "cuda":
        trace = _trace_split(m.ranks)
        measured_by = TRACE if trace else HOST_CUDA
        values.update(trace or {})
    nvml = _nvml_figures(m.ranks)
    values.update({k: v for k, v in nvml.items() if k != "throttle_reasons"})
    out: dict[str, Any] = {"node_of_rank": nodes, "measured_by": measured_by}
    out.update({name: figure(v, nodes) for name, v in values.items()})
    if "throttle_reasons" in nvml:
        out["throttle_reasons"] = nvml["throttle_reasons"]
    out["step_samples"] = [list(s["step_s"]) for s in steps]
    return out


def _lag(value: float, median: float) -> float:
    return 100.0 * (value / median - 1.0) if median > 0 else 0.0


def straggler(per_rank_metrics: dict[str, Any], threshold_pct: float) -> dict[str, Any]:
    """metrics.straggler from metrics.per_rank: the slowest rank by compute, every rank and
    (several nodes) every node more than `threshold_pct` above the median."""
    compute = per_rank_metrics["compute_s"]["values"]
    nodes = per_rank_metrics["node_of_rank"]
    median = statistics.median(compute)
    lags = [_lag(c, median) for c in compute]
    slowest = max(range(len(compute)), key=lambda r: compute[r])
    out: dict[str, Any] = {
        "threshold_pct": threshold_pct, "figure": "compute_s",
        "slowest": {"rank": slowest, "node": nodes[slowest], "lag_pct": lags[slowest]},
        "stragglers": [{"rank": r, "node": nodes[r], "lag_pct": lag} for r, lag in enumerate(lags)
                       if lag > threshold_pct],
        "node_stragglers": []}
    by_node = {n: statistics.median([c for c, k in zip(compute, nodes) if k == n]) for n in sorted(set(nodes))}
    if len(by_node) > 1:
        node_median = statistics.median(by_node.values())
        out["node_stragglers"] = [{"node": n, "lag_pct": _lag(v, node_median)} for n, v in by_node.items()
                                  if _lag(v, node_median) > threshold_pct]
    return out
