"""One training cell on every rank: build the strategy's trainer, warm up, measure, profile,
gather what every rank saw, and (rank 0) assemble the metrics.

Phases, each a short function: set up the process group and device, build the model,
warm up, time the measured steps (with the NVML sampler running), time a few steps
without the sampler (its overhead), profile separate steps (so tracing never distorts the
timings), reduce across ranks. `bench/worker/__main__.py` runs it under torchrun.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from bench import strategies
from bench.config.cell import CellConfig
from bench.metrics import loss_check
from bench.metrics.assemble import assemble_metrics
from bench.metrics.measurement import Measurement, RankMeasurement
from bench.metrics.phases import PhaseClock
from bench.metrics.trace_figures import trace_file_figures
from bench.strategies.common import TORCH_DTYPES, data_spec, model_config, to_device
from bench.worker.memory import peak_memory, reset_peak
from bench.worker.nvml import NvmlSampler, local_device_ids
from bench.worker.nvtx import NvtxRanges, nvtx_step
from bench.worker import hang_watch
from bench.worker.rank_figures import captured, rank_steps
from bench.worker.profiling import Profiler, dump_memory_snapshot, start_memory_history, steps_needed, stop_memory_history
from bench.worker.timing import StepTimer, all_ranks_agree, reduce_max_across_ranks
from isp_core.attention import attention_backend
from isp_core.data import DataSpec, MicroBatch, micro_batches
from bench.strategies.isp import settings_from
from isp_core.comm_stats import CommStats
from isp_core.topology import ParallelTopology

NVML_OVERHEAD_STEPS = 3


@dataclass
class Cell:
    """Everything one rank needs to run the cell."""

    config: CellConfig
    cell_id: str
    run_dir: Path
    rank: int
    device: torch.device
    topo: ParallelTopology
    trainer: Any  # the strategy's trainer: train_step(micro_batches) -> float
    spec: DataSpec
    attention: dict[str, Any]  # which attention kernel runs and why (AttentionBackend.as_record)
    clock: PhaseClock = field(default_factory=PhaseClock)  # seconds per phase (metrics.phases_s)


def setup(config: CellConfig, store: Optional[Any] = None) -> torch.device:
    """The device and the default process group: from torchrun's environment, or on `store`
    (a reused worker's fresh one per cell)."""
    run = config.run
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if run.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) != config.parallel.world_size:
        raise RuntimeError(f"torchrun started {os.environ.get('WORLD_SIZE')} ranks but the cell "
                           f"needs parallel.world_size={config.parallel.world_size}")
    # device_id binds the NCCL communicator to this rank's GPU at once (eager init, no guessing
    # the device from the first collective's tensors).
    where = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                      "world_size": config.parallel.world_size}
    dist.init_process_group(run.backend, device_id=device if device.type == "cuda" else None, **where)
    return device


def build(config: CellConfig, cell_id: str, run_dir: Path, device: torch.device,
          clock: Optional[PhaseClock] = None) -> Cell:
    p, clock = config.parallel, clock or PhaseClock()
    # Raises (the cell fails) when run.attention is flash and flash-attn cannot run here.
    attention = attention_backend(config.run.attention, device, TORCH_DTYPES[config.run.dtype])
    print(f"attention: {attention.name} ({attention.reason})", flush=True)
    clock.lap("build")
    topo = ParallelTopology.from_env(p.sp, p.wp, CommStats(hang_watch.ring()), build=strategies.get(p.strategy).groups)
    clock.lap("process_group")  # new_group is collective: part of the process-group set-up
    trainer = strategies.build_trainer(p.strategy, model_config(config), topo, settings_from(p),
                                       seed=config.data.seed, dtype=TORCH_DTYPES[config.run.dtype], device=device,
                                       lr=config.run.lr)
    print(f"strategy {p.strategy}; {topo}", flush=True)
    clock.lap("build")
    return Cell(config, cell_id, run_dir, topo.rank, device, topo, trainer, data_spec(config),
                attention.as_record(), clock)


def batches_for(cell: Cell, step: int) -> list[MicroBatch]:
    topo = cell.topo
    return to_device(micro_batches(cell.spec, step, topo.dp, topo.dp_rank, topo.sp, topo.sequence.rank), cell.device)


def run_steps(cell: Cell, first_step: int, count: int, timer: Optional[StepTimer] = None,
              profiler: Optional[Profiler] = None) -> list[float]:
    """Train `count` steps (data prepared before the clock starts); returns the local losses."""
    losses = []
    for step in range(first_step, first_step + count):
        batches = batches_for(cell, step)
        with nvtx_step(step), (timer.step() if timer is not None else contextlib.nullcontext()):
            losses.append(cell.trainer.train_step(batches))
        if profiler is not None:
            profiler.step()
    return losses


@dataclass
class LocalMeasurement:
    """What this rank measured, before the ranks agree on the step times."""

    samples: list[float]
    rank: RankMeasurement
    first_measured_step: int
    nvml_off_samples: Optional[list[float]] = None
    nvml_on_samples: Optional[list[float]] = None


def measure(cell: Cell) -> LocalMeasurement:
    run, stats = cell.config.run, cell.topo.stats
    step = 0
    run_steps(cell, step, run.warmup_steps)
    cell.clock.lap("warmup")
    step += run.warmup_steps
    reset_peak(cell.device)
    stats.reset()
    sampler = make_sampler(cell)
    timer = StepTimer(cell.device)
    if sampler is not None:
        sampler.start()
    with captured() as launches:  # each launch's times: the rank's compute/comm split per step
        losses = run_steps(cell, step, run.measure_steps, timer)
    if sampler is not None:
        sampler.stop()
    cell.clock.lap("measure")
    step += run.measure_steps
    comm = stats.snapshot()
    stats.enabled = False  # later phases must not change the per-step counts
    out = LocalMeasurement(timer.samples, RankMeasurement(losses, comm, peak_memory(cell.device)), run.warmup_steps)
    out.rank.steps = rank_steps(timer, launches)
    if sampler is not None:
        out.rank.nvml = window_summary(sampler, run.measure_steps, cell.config.tokens_per_step)
    out.nvml_off_samples, out.nvml_on_samples = nvml_overhead(cell, sampler, run.warmup_steps)
    if sampler is not None:
        sampler.close()
    cell.clock.lap("nvml_overhead")
    out.rank.profile = profile(cell, step)
    cell.clock.lap("profile", ran=cell.config.profile.enabled)
    return out


def window_summary(sampler: NvmlSampler, steps: int, tokens_per_step: int) -> dict[str, Any]:
    """The sampler's summary of `steps` measured steps: the window's energy over the window's
    tokens (every measured step's, not one step's), so energy/token = energy/step / tokens/step."""
    return sampler.summary(steps, tokens_per_step * steps)


def nvml_overhead(cell: Cell, sampler: Optional[NvmlSampler], first: int
                  ) -> tuple[Optional[list[float]], Optional[list[float]]]:
    """Step times of the first measured step indices run again without, then with, the sampler.

    The same indices (the same packed document lengths) on both sides, so the difference is
    the sampler's. Every rank takes part in the decision: when any rank's NVML is unavailable,
    no rank runs the extra steps (a rank skipping them alone would leave the others waiting
    in a collective)."""
    if not all_ranks_agree(sampler is not None and sampler.available, cell.device):
        return None, None
    count = min(NVML_OVERHEAD_STEPS, cell.config.run.measure_steps)
    off, on = StepTimer(cell.device), StepTimer(cell.device)
    run_steps(cell, first, count, off)
    sampler.start()
    run_steps(cell, first, count, on)
    sampler.stop()
    return off.samples, on.samples


def make_sampler(cell: Cell) -> Optional[NvmlSampler]:
    """None when NVML is switched off; otherwise a sampler, which may report itself unavailable."""
    enabled = cell.config.nvml.enabled
    if enabled is False:
        return None
    # NVML numbers GPUs its own way; local_device_ids() maps this rank's CUDA device to it by UUID.
    ids = local_device_ids() if cell.device.type == "cuda" else []
    sampler = NvmlSampler(ids, cell.config.nvml.interval_ms)
    if cell.device.type != "cuda" and sampler.available:
        sampler.close()
        return None
    return sampler


def profile(cell: Cell, first_step: int) -> Optional[dict[str, Any]]:
    settings = cell.config.profile
    if not settings.enabled:
        return None
    trace_root = cell.run_dir / "traces"
    snapshot = settings.memory_snapshot and cell.device.type == "cuda" and start_memory_history()
    with Profiler(settings, cell.cell_id, cell.rank, trace_root=trace_root) as prof:
        run_steps(cell, first_step, steps_needed(settings), profiler=prof)
    # Paths as they are in the run folder (node 0's, where every node's traces end up), and this
    # rank's own trace figures, computed here where its file is: rank 0 never opens another
    # rank's file (no shared disk across nodes).
    out: dict[str, Any] = {"traces": [str(p.relative_to(cell.run_dir)) for p in prof.trace_paths],
                           "active_steps": settings.active}
    if prof.trace_paths:
        out["figures"] = trace_file_figures(str(prof.trace_paths[0]), cell.device.type, settings.active)
    if snapshot:
        # Loadable by PyTorch's memory_viz; covers the profiled steps only, like the traces.
        path = dump_memory_snapshot(trace_root / cell.cell_id / f"rank{cell.rank}_memory.pickle")
        stop_memory_history()
        out["memory_snapshot"] = str(path.relative_to(cell.run_dir)) if path else None
    return out


def gather_per_rank(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    with hang_watch.track("all_gather_object"):
        dist.all_gather_object(out, value)
    return out


def run_cell(config: CellConfig, cell_id: str, run_dir: Path, device: torch.device,
             link_curves: Optional[list[Any]] = None, clock: Optional[PhaseClock] = None,
             shared: Optional[dict[str, Any]] = None) -> Optional[dict]:
    """Measure on every rank; rank 0 returns the cell's metrics, the others None. `shared` is the
    runner's word on the loss reference (bench/sweep/references.py); None: compute one here."""
    cell = build(config, cell_id, run_dir, device, clock)
    with NvtxRanges(config.profile.nvtx, device, getattr(cell.trainer, "optimizer", None)) as nvtx:
        local = measure(cell)
    samples = reduce_max_across_ranks(local.samples)
    # None on every rank or on none (nvml_overhead decides together).
    off = reduce_max_across_ranks(local.nvml_off_samples) if local.nvml_off_samples is not None else None
    on = reduce_max_across_ranks(local.nvml_on_samples) if local.nvml_on_samples is not None else None
    ranks = gather_per_rank(local.rank)
    if cell.rank != 0:
        return None
    pool = getattr(cell.trainer, "memory_pool", None)
    pool_bytes = pool.bytes_held()["total"] if pool is not None else 0
    cell.clock.skip()  # the reductions above are the runner's reduce_and_teardown
    # After every rank is done measuring: the single-process reference never touches the timings.
    reference, skipped = loss_reference(cell, shared)
    cell.clock.lap("loss_reference", ran=computes_reference(shared))
    measurement = Measurement(samples, local.first_measured_step, ranks, off, on, pool_bytes, reference,
                              link_curves or [], cell.attention, skipped)
    metrics = assemble_metrics(cell.config, measurement, device)
    if shared is not None:
        # Which reference: its key's name (the file holds the key itself) and the cell that computed it.
        metrics["loss_reference_source"] = {"key": shared["name"], "file": shared["file"], "cell": shared["cell"]}
    if config.profile.nvtx:  # asked for: say whether the ranges were there (on CPU they are not)
        metrics["nvtx"] = {"active": nvtx.active, "status": nvtx.status}
    metrics["phases_s"] = cell.clock.as_record()
    return metrics


def computes_reference(shared: Optional[dict[str, Any]]) -> bool:
    """Whether this cell computes the loss reference: the runner says so, or said nothing."""
    return shared is None or bool(shared.get("compute"))


def loss_reference(cell: Cell, shared: Optional[dict[str, Any]]) -> tuple[Optional[list[float]], Optional[str]]:
    """(losses, None) or (None, why not): the sweep's shared reference, or one computed here when
    the runner says this cell computes it (or said nothing)."""
    if not computes_reference(shared):
        return shared.get("losses"), shared.get("reason")
    config = cell.config if shared is None else loss_check.reference_config(cell.config)
    if cell.device.type == "cuda":  # the whole device for the reference: the cell's state is done with
        cell.trainer = None
        gc.collect()
        torch.cuda.empty_cache()
    return loss_check.run_reference(config, cell.device)
