"""nccl-tests-style micro-benchmark of ISP's own collectives, run by bench.worker.cell for a
`run.kind: collectives` cell (same torchrun launch, same rank grid, same groups).

Each op is a small spec, as in nccl-tests: the buffers for a count, how to run it (through
isp_core.collectives, the exact code path ISP trains with), and what every element must hold.
Per op and size: one checked call (#wrong), `warmup_iters` calls, then `iters` timed calls;
each sample is the slowest rank's time. Rank 0 prints the table and writes RUN_DIR/collectives/
<cell>.json and result.json; a wrong element or an average below the floor fails the cell.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.config.schema import ELEMENT_SIZE
from bench.metrics import collectives_spec as spec
from bench.strategies.common import TORCH_DTYPES
from bench.config.cell import CellConfig
from bench.metrics.formulas import algbw, busbw
from bench.metrics.phases import PhaseClock
from bench.worker.timing import StepTimer, gather_across_ranks, percentile
from isp_core.collectives import Pending, all_gather, all_reduce_, all_to_all, reduce_scatter
from bench.worker import hang_watch
from isp_core.comm_stats import CommStats
from isp_core.topology import CommGroup, ParallelTopology

# Test hook (docs/collectives.md): in the cell with this id, the last rank sets element 0 of
# every checked result to -1 after the collective, so the check must report #wrong > 0.
CORRUPT_ENV = "ISP_BENCH_CORRUPT"
_MOD = 13  # the pattern's values 0..12: exact in every dtype, and sums of a few ranks too


def pattern(rank: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    """Element e of group rank r's send buffer holds (r + e) % 13, so a chunk that lands in the
    wrong place, or from the wrong rank, differs from what is expected there. float32 on device."""
    e = torch.arange(start, start + count, device=device, dtype=torch.int64)
    return ((e + rank) % _MOD).to(torch.float32)


def pattern_sum(n: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    """sum over r < n of pattern(r, ...): whole cycles of 13 ranks add 0+1+...+12 = 78 each."""
    full, rest = divmod(n, _MOD)
    total = torch.full((count,), 78.0 * full, device=device)
    for r in range(rest):
        total += pattern(r, start, count, device)
    return total


@dataclass(frozen=True)
class OpSpec:
    """One collective: its buffers for `count` (the size column's elements), how to launch it,
    and the expected result on group rank g."""

    name: str
    make: Callable[[int, CommGroup, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor | None]]
    launch: Callable[[torch.Tensor, torch.Tensor | None, CommGroup, bool], Pending]
    expect: Callable[[int, CommGroup, torch.device], torch.Tensor]


def _ag_make(count: int, g: CommGroup, dtype: torch.dtype, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = count // g.size  # size = the full output: every rank sends count/n
    return pattern(g.rank, 0, chunk, dev).to(dtype), torch.empty(count, dtype=dtype, device=dev)


def _ag_expect(count: int, g: CommGroup, dev: torch.device) -> torch.Tensor:
    chunk = count // g.size
    return torch.cat([pattern(r, 0, chunk, dev) for r in range(g.size)])


def _rs_make(count: int, g: CommGroup, dtype: torch.dtype, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return pattern(g.rank, 0, count, dev).to(dtype), torch.empty(count // g.size, dtype=dtype, device=dev)


def _rs_expect(count: int, g: CommGroup, dev: torch.device) -> torch.Tensor:
    chunk = count // g.size  # rank g keeps chunk g of the average
    return pattern_sum(g.size, g.rank * chunk, chunk, dev) / g.size


def _a2a_expect(count: int, g: CommGroup, dev: torch.device) -> torch.Tensor:
    chunk = count // g.size  # chunk j comes from rank j, which sent its chunk g
    return torch.cat([pattern(j, g.rank * chunk, chunk, dev) for j in range(g.size)])


def _own(count: int, g: CommGroup, dtype: torch.dtype, dev: torch.device) -> tuple[torch.Tensor, None]:
    return pattern(g.rank, 0, count, dev).to(dtype), None


def _ar_launch(x: torch.Tensor, out: torch.Tensor | None, g: CommGroup, async_op: bool) -> Pending:
    return Pending.done(all_reduce_(x, g, op="sum", label="bench"))  # blocking in isp_core, always


OPS = {
    "all_gather": OpSpec("all_gather", _ag_make,
                         lambda x, out, g, a: all_gather(x, g, 0, async_op=a, out=out, label="bench"), _ag_expect),
    "reduce_scatter": OpSpec("reduce_scatter", _rs_make,
                             lambda x, out, g, a: reduce_scatter(x, g, 0, op="avg", async_op=a, out=out,
                                                                 label="bench"), _rs_expect),
    "all_to_all": OpSpec("all_to_all", _own, lambda x, out, g, a: all_to_all(x, g, 0, 0, async_op=a, label="bench"),
                         _a2a_expect),
    "all_reduce": OpSpec("all_reduce", _own, _ar_launch, lambda c, g, dev: pattern_sum(g.size, 0, c, dev)),
}


def count_wrong(result: torch.Tensor, expected: torch.Tensor, op: str, n: int) -> int:
    """Elements off by more than rounding allows: none for data movement; for reductions n
    roundings of the dtype's epsilon relative to the value (an average of n terms is inexact)."""
    diff = (result.float() - expected).abs()
    if spec.REDOP[op] == "none":
        return int((diff != 0).sum())
    tol = n * torch.finfo(result.dtype).eps * expected.abs().clamp(min=1.0)
    return int((diff > tol).sum())


def check(op: OpSpec, count: int, g: CommGroup, dtype: torch.dtype, dev: torch.device, corrupt: bool) -> int:
    """One call on the pattern; this rank's wrong elements."""
    x, out = op.make(count, g, dtype, dev)
    result = op.launch(x, out, g, False).wait()
    if corrupt:
        result.view(-1)[0] = -1.0
    return count_wrong(result.view(-1), op.expect(count, g, dev), op.name, g.size)


def time_op(op: OpSpec, count: int, g: CommGroup, dtype: torch.dtype, dev: torch.device,
            warmup: int, iters: int, async_op: bool) -> float:
    """Seconds per call on this rank, as nccl-tests times: after a barrier, `iters` launches
    back to back between two events, divided by iters. Blocking calls wait one by one (on
    NCCL that only orders the stream, the host keeps launching); async ones are all launched,
    then waited. Timing each call alone would add a launch and a sync to every sample."""
    x, out = op.make(count, g, dtype, dev)
    x.zero_()  # all_reduce_ works in place: zeros stay finite however many calls run
    for _ in range(warmup):
        op.launch(x, out, g, False).wait()
    timer = StepTimer(dev)  # barrier, then CUDA events (CPU: wall clock, closing barrier)
    with timer.step():
        if async_op:
            for pending in [op.launch(x, out, g, True) for _ in range(iters)]:
                pending.wait()
        else:
            for _ in range(iters):
                op.launch(x, out, g, False).wait()
    return timer.samples[0] / iters


def make_row(op: str, count: int, dtype: str, n: int, samples_s: list[float], wrong: int) -> dict[str, Any]:
    """One table row from one sample per rank (its seconds per call); time is their mean, as
    nccl-tests averages over ranks, and algbw/busbw come from it. skew_pct = 100 (max - min) / max
    over the ranks: how unevenly the ranks saw the same collective."""
    nbytes = count * ELEMENT_SIZE[dtype]
    xs = sorted(samples_s)
    t = sum(xs) / len(xs)
    return {"size_bytes": nbytes, "count": count, "type": spec.NCCL_TYPE[dtype], "redop": spec.REDOP[op],
            "time_us": t * 1e6, "min_us": xs[0] * 1e6, "max_us": xs[-1] * 1e6, "p99_us": percentile(xs, 99.0) * 1e6,
            "algbw_gbps": algbw(nbytes, t), "busbw_gbps": busbw(op, nbytes, t, n), "wrong": wrong,
            "skew_pct": 100.0 * (xs[-1] - xs[0]) / xs[-1] if xs[-1] > 0 else 0.0,
            "samples_us": [s * 1e6 for s in samples_s]}


def _world_sum(value: int, dev: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=dev)
    with hang_watch.track("all_reduce", 8):
        dist.all_reduce(t)
    return int(t.item())


def sweep(config: CellConfig, cell_id: str, dev: torch.device) -> dict[str, Any]:
    c, p = config.collectives, config.parallel
    topo = ParallelTopology.from_env(p.sp, p.wp, CommStats(hang_watch.ring()))
    topo.stats.enabled = False
    print(topo, flush=True)
    g = topo.groups[c.group]
    dtype, size = TORCH_DTYPES[config.run.dtype], ELEMENT_SIZE[config.run.dtype]
    corrupt = os.environ.get(CORRUPT_ENV) == cell_id and topo.rank == p.world_size - 1
    from isp_core.topology import group_layout

    doc: dict[str, Any] = {
        "cell": cell_id, "group": c.group, "group_size": g.size, "world_size": p.world_size,
        "group_ranks": group_layout(p.world_size, p.sp, p.wp)[c.group], "dtype": config.run.dtype,
        "device": config.run.device, "backend": config.run.backend, "async_op": c.async_op,
        "warmup_iters": c.warmup_iters, "iters": c.iters, "ops": {}}
    for name in c.ops:
        rows = []
        for count in spec.sweep_counts(name, c.min_bytes, c.max_bytes, c.factor, g.size, size):
            wrong = _world_sum(check(OPS[name], count, g, dtype, dev, corrupt), dev)
            seconds = time_op(OPS[name], count, g, dtype, dev, c.warmup_iters, c.iters, c.async_op)
            rows.append(make_row(name, count, config.run.dtype, g.size, gather_across_ranks(seconds), wrong))
        doc["ops"][name] = {"rows": rows}
    return spec.finish(doc, c.min_busbw_gbps)


def run_collectives(config: CellConfig, cell_id: str, out: Path, dev: torch.device,
                    clock: PhaseClock | None = None) -> int:
    """The whole cell on this rank; 1 when the cell fails (every rank agrees: the inputs are
    reduced over the world), after rank 0 has written the table and result.json."""
    from bench.results.records import write_json_atomic

    from bench.worker.finish import write_agreed_result

    clock = clock or PhaseClock()
    doc = sweep(config, cell_id, dev)
    clock.lap("measure")  # the sweep of sizes is this cell's measurement
    if dist.get_rank() == 0:
        print(spec.format_table(doc), flush=True)
        write_json_atomic(out.parents[2] / "collectives" / f"{cell_id}.json", doc)
    metrics = {"collectives": doc, "phases_s": clock.as_record()}
    write_agreed_result(out, {"metrics": metrics, "error": doc["error"]})
    return 1 if doc["error"] else 0  # the process group is torn down by bench.worker's main
