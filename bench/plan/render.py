"""The plan as a table (terminal), Markdown (reports) or JSON (machines)."""

from __future__ import annotations

import json
from typing import Any

from tabulate import tabulate

from bench.plan.planner import Plan
from bench.plan.predict import Prediction

GIB = 1024 ** 3


def prediction_dict(p: Prediction) -> dict[str, Any]:
    return {"cell": p.cell, "strategy": p.strategy, "world_size": p.world_size, "sp": p.sp, "wp": p.wp,
            "step_time_s": p.step_time_s, "compute_s": p.compute_s, "exposed_comm_s": p.exposed_comm_s,
            "comm_time_s": p.comm_time_s, "tokens_per_s": p.tokens_per_s, "tflops_per_rank": p.tflops_per_rank,
            "mfu": p.mfu, "tflops_per_rank_internevo_formula": p.tflops_internevo, "peak_memory_bytes": p.memory.peak_bytes, "memory_moment": p.memory.moment,
            "memory_bytes": p.memory.components, "capacity_bytes": p.capacity_bytes, "fits": p.fits,
            "margin_bytes": p.margin_bytes, "comm": p.comm, "notes": p.notes}


def _rows(plan: Plan) -> list[list[Any]]:
    rows = []
    for rank, p in enumerate(plan.ranking(), 1):
        fit = f"yes ({p.margin_bytes / GIB:+.1f})" if p.fits else f"NO ({p.margin_bytes / GIB:+.1f})"
        rows.append([rank, p.cell, p.strategy, p.world_size, p.sp, p.wp, f"{p.step_time_s:.4g}",
                     f"{p.exposed_comm_s:.3g}", f"{p.tokens_per_s:,.0f}", f"{p.tflops_per_rank:.3g}",
                     "-" if p.mfu is None else f"{100 * p.mfu:.1f}%", f"{p.memory.peak_bytes / GIB:.2f}", fit])
    return rows


HEADERS = ["rank", "cell", "strategy", "ws", "sp", "wp", "step s", "exposed comm s", "tokens/s", "TFLOP/s/rank",
           "MFU", "peak GiB", "fits (margin GiB)"]


def _details(p: Prediction, fmt: str) -> str:
    mem = [[k, f"{v / GIB:.3f}"] for k, v in p.memory.components.items()]
    comm = [[g, k, c["calls"], f"{c['bytes'] / 2**20:.2f}", f"{c['seconds'] * 1e3:.3f}", c["group_size"], c["link"]]
            for g, kinds in p.comm.items() for k, c in kinds.items()]
    head = f"### {p.cell}" if fmt == "github" else f"{p.cell}:"
    parts = [head, f"peak memory per rank at the {p.memory.moment}:",
             tabulate(mem, ["component", "GiB"], tablefmt=fmt)]
    if comm:
        parts += ["communication per step:", tabulate(comm, ["group", "kind", "calls", "MiB", "busy ms", "ranks",
                                                             "time from"], tablefmt=fmt)]
    parts += [f"compute rates: {'; '.join(p.notes)}"]
    return "\n\n".join(parts) if fmt == "github" else "\n".join(parts)


def render(plan: Plan, fmt: str, hardware_name: str) -> str:
    if fmt == "json":
        return json.dumps({"hardware": hardware_name, "ranking": [prediction_dict(p) for p in plan.ranking()],
                           "skipped": [{"cell": c, "why": w} for c, w in plan.skipped]}, indent=1)
    table_fmt = "github" if fmt == "md" else "simple"
    out = [f"plan on {hardware_name} (highest tokens/s first; layouts that do not fit last):",
           tabulate(_rows(plan), HEADERS, tablefmt=table_fmt)]
    out += [f"not planned: {c}: {w}" for c, w in plan.skipped]
    out += [_details(p, table_fmt) for p in plan.ranking()]
    return "\n\n".join(out) + "\n"
