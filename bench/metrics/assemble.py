"""Turns one cell's raw measurements (rank 0's view plus every rank's) into its metrics record.

Formulas are documented where they live: timing.summarize, metrics.model_flops_per_step,
metrics.busbw, overlap.overlap_stats, isp_core.comm_formula.predicted_comm (isp) and
bench.strategies.peer_formula.predicted_peer_comm (fsdp2, ddp, ulysses), bench.metrics.loss_check.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from bench.config.cell import CellConfig
from bench import strategies
from bench.config.schema import ELEMENT_SIZE
from bench.metrics import roofline
from bench.metrics.formulas import (achieved_tflops, algbw, busbw, causal_pairs_per_step, diff_counts, mfu,
                                    model_flops_per_step, peak_tflops_for)
from bench.worker.timing import summarize
from bench.metrics.loss_check import compare as compare_losses
from bench.metrics.measurement import Measurement
from bench.metrics.per_rank import per_rank, straggler
from bench.strategies.common import data_spec, model_config
from bench.strategies.isp import settings_from
from isp_core.data import global_batch


def per_step_comm(counted_total: dict, steps: int) -> dict:
    """Counts over the measured steps divided by the number of steps (they are equal each step)."""
    out: dict = {}
    for group, kinds in counted_total.items():
        for kind, c in kinds.items():
            out.setdefault(group, {})[kind] = {"calls": c["calls"] // steps, "bytes": c["bytes"] // steps}
            assert c["calls"] % steps == 0 and c["bytes"] % steps == 0, "steps communicated unequally"
    return out


def comm_metrics(config: CellConfig, counted_total: dict) -> dict[str, Any]:
    p = config.parallel
    counted = per_step_comm(counted_total, config.run.measure_steps)
    predicted = strategies.predicted_comm(p.strategy, model_config(config), data_spec(config), p.world_size, p.sp,
                                          p.wp, p.overlap, ELEMENT_SIZE[config.run.dtype], settings=settings_from(p))
    mismatches = diff_counts(counted, predicted)
    return {"counted_per_step": counted, "predicted_per_step": predicted,
            "matches_prediction": not mismatches, "mismatches": mismatches,
            "bytes_per_step": sum(c["bytes"] for kinds in counted.values() for c in kinds.values())}


def flops_metrics(config: CellConfig, first_step: int, median_s: float, device: torch.device) -> dict[str, Any]:
    m, spec = config.model, data_spec(config)
    steps = range(first_step, first_step + config.run.measure_steps)
    pairs = sum(causal_pairs_per_step(global_batch(spec, s)[1]) for s in steps) / len(steps)
    flops = model_flops_per_step(m.hidden, m.layers, m.heads, m.kv_heads, m.vocab, m.mlp_hidden,
                                 config.tokens_per_step, int(pairs))
    tflops = achieved_tflops(flops, median_s, config.parallel.world_size)
    peak, source = peak_tflops_for(device, config.run.dtype, config.run.peak_tflops)
    out = {"flops_per_step": flops, "tflops_per_rank": tflops, "peak_tflops": peak, "mfu": mfu(tflops, peak)}
    out["mfu_reason" if peak is None else "peak_tflops_source"] = source
    return out


def trace_metrics(config: CellConfig, profile: Optional[dict], counted: dict) -> Optional[dict[str, Any]]:
    """Overlap and per-kind communication time (per step) that the rank computed from its own
    trace (bench.metrics.trace_figures), with bandwidth from the counted bytes."""
    if not profile or not profile.get("figures"):
        return None
    figures = profile["figures"]
    return {**figures, "bandwidth": bandwidth(config, counted, figures["comm_time_s"])}


def bandwidth(config: CellConfig, counted: dict, times: dict[str, float]) -> dict[str, Any]:
    """algbw/busbw per kind, when all of a kind's traffic ran on one group (the size n is then known)."""
    sizes = {"sequence": config.parallel.sp, "weight": config.parallel.wp,
             "weight_data": config.parallel.world_size // config.parallel.wp,
             "world": config.parallel.world_size, "data": config.parallel.world_size // config.parallel.sp}
    out = {}
    for kind, seconds in times.items():
        groups = [g for g, kinds in counted.items() if kind in kinds]
        nbytes = sum(counted[g][kind]["bytes"] for g in groups)
        if seconds <= 0 or not groups:
            continue
        entry = {"bytes": nbytes, "seconds": seconds, "algbw_gbps": algbw(nbytes, seconds), "groups": groups}
        if len(groups) == 1:
            entry["busbw_gbps"] = busbw(kind, nbytes, seconds, sizes[groups[0]])
        out[kind] = entry
    return out


def peak_memory_bytes(memory: list[dict[str, Any]], key: str) -> Optional[int]:
    """The max over ranks; None when any rank's peak is unavailable."""
    values = [mem.get(key, 0) for mem in memory]
    return None if any(v is None for v in values) else max(values)


def assemble_metrics(config: CellConfig, m: Measurement, device: torch.device) -> dict[str, Any]:
    timing = summarize(m.samples)
    world = config.parallel.world_size
    # ISP: each sequence group holds sp identical copies of its loss; the peers: each rank its own
    # tokens' mean, equal token counts. Either way the sum over ranks / world is the global mean.
    losses = [sum(r.losses[i] for r in m.ranks) / world for i in range(len(m.ranks[0].losses))]
    memory = [r.memory for r in m.ranks]
    peak_key = "peak_allocated_bytes" if device.type == "cuda" else "peak_rss_bytes"
    comm = comm_metrics(config, m.comm)
    metrics: dict[str, Any] = {
        "step_time_s": timing,
        "tokens_per_step": config.tokens_per_step,
        "tokens_per_s": config.tokens_per_step / timing["median"],
        "attention": m.attention,
        "loss": losses,
        "peak_memory_bytes": peak_memory_bytes(memory, peak_key),
        "memory_per_rank": memory,
        "memory_pool_bytes": m.pool_bytes,
        "comm": comm,
        **flops_metrics(config, m.first_measured_step, timing["median"], device),
    }
    if metrics["peak_memory_bytes"] is None:  # a reused worker on CPU (bench/worker/memory.py)
        metrics["peak_memory_unavailable"] = next(mem["peak_rss_unavailable"] for mem in memory
                                                  if mem.get("peak_rss_unavailable"))
    if m.loss_reference is not None:
        metrics.update(compare_losses(losses, m.loss_reference, config.run.dtype))
    else:
        metrics["loss_check_skipped"] = m.loss_check_skipped or "no reference given"
    traces = [trace_metrics(config, r.profile, comm["counted_per_step"]) for r in m.ranks]
    if any(traces):
        per_rank_overlap = [t["overlap"] for t in traces if t]
        metrics["overlap"] = {
            "per_rank": per_rank_overlap,
            "max_exposed_comm_s": max(o["exposed_comm_s"] for o in per_rank_overlap),
            "min_overlap_pct": min((o["overlap_pct"] for o in per_rank_overlap if o["overlap_pct"] is not None),
                                   default=None)}
        metrics["exposed_comm_s"] = metrics["overlap"]["max_exposed_comm_s"]
        metrics["overlap_pct"] = metrics["overlap"]["min_overlap_pct"]
        metrics["comm_time_s"] = traces[0]["comm_time_s"]
        metrics["bandwidth"] = traces[0]["bandwidth"]
        if traces[0]["nccl"]:  # CUDA: bytes and bandwidth the NCCL kernels themselves report
            metrics["nccl_trace"] = traces[0]["nccl"]
        metrics["traces"] = [p for r in m.ranks if r.profile for p in r.profile["traces"]]
    if any(r.profile and r.profile.get("memory_snapshot") for r in m.ranks):  # per rank, relative to the run folder
        metrics["memory_snapshots"] = [(r.profile or {}).get("memory_snapshot") for r in m.ranks]
    nvml = [r.nvml for r in m.ranks]
    if any(n is not None for n in nvml):
        metrics["nvml"] = nvml_metrics(nvml, m)
    if m.link_curves and (roof := roofline_metrics(config, metrics, m.link_curves)) is not None:
        metrics["roofline"] = roof
    if (ranks := per_rank(m, device.type)) is not None:  # each rank's own figures, the straggler
        metrics["per_rank"] = ranks
        metrics["straggler"] = straggler(ranks, config.run.straggler_pct)
    return metrics


def roofline_metrics(config: CellConfig, metrics: dict[str, Any], curves: list[roofline.Curve]) -> Any:
    """metrics.roofline; a bug here must not cost the sweep the cell's record."""
    try:
        return roofline.roofline(config, metrics, curves)
    except Exception as exc:  # noqa: BLE001 - recorded, not raised
        return {"error": f"{type(exc).__name__}: {exc}"}


def nvml_metrics(per_rank: list[Optional[dict]], m: Measurement) -> dict[str, Any]:
    first = next(n for n in per_rank if n is not None)
    if not first.get("available", False):
        return {"available": False, "reason": first.get("reason", "unknown")}
    out: dict[str, Any] = {"available": True, "per_rank": per_rank}
    energy = [n.get("energy_per_token_j") for n in per_rank if n]
    if all(isinstance(e, (int, float)) for e in energy):
        out["energy_per_token_j"] = sum(energy)  # every rank spends energy on the same tokens
    if m.nvml_off_samples and m.nvml_on_samples:  # the same step indices without and with the sampler
        with_s = summarize(m.nvml_on_samples)["median"]
        without = summarize(m.nvml_off_samples)["median"]
        out["sampler_overhead_pct"] = 100.0 * (with_s / without - 1.0)
    return out
