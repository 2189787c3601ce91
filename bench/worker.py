"""Runs one benchmark cell on every rank of a torchrun job and writes its metrics.

    python -m torch.distributed.run --nproc-per-node=N -m bench.worker \
        --cell-config RUN/cells/ID/config.json --out RUN/cells/ID/result.json --log-dir RUN/logs/ID

Phases, each a short function: set up the process group and device, build the model,
warm up, time the measured steps (with the NVML sampler running), time a few steps
without the sampler (its overhead), profile separate steps (so tracing never distorts the
timings), reduce across ranks, and rank 0 writes result.json atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from bench import loss_check
from bench.cell_metrics import assemble_metrics
from bench.config import CellConfig
from bench.memory import peak_memory, reset_peak
from bench.nvml import NvmlSampler, local_device_ids
from bench.profiling import Profiler, dump_memory_snapshot, start_memory_history, steps_needed, stop_memory_history
from bench.timing import StepTimer, reduce_max_across_ranks
if TYPE_CHECKING:
    from isp_core.peers import PeerTrainer
from isp_core.data import DataSpec, MicroBatch, micro_batches
from isp_core.engine import ISPSettings, ISPTrainer, build_isp_model
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    trainer: ISPTrainer | PeerTrainer
    spec: DataSpec


def redirect_output(log_dir: Path, rank: int) -> None:
    """Send this rank's stdout and stderr (C-level writes too) to logs/<cell>/rank<r>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def setup(config: CellConfig) -> torch.device:
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
    dist.init_process_group(run.backend)
    return device


def build(config: CellConfig, cell_id: str, run_dir: Path, device: torch.device) -> Cell:
    m, d, p = config.model, config.data, config.parallel
    topo = ParallelTopology.from_env(p.sp, p.wp)
    cfg = LlamaConfig(hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads, vocab=m.vocab,
                      mlp_hidden=m.mlp_hidden, checkpoint=m.checkpoint)
    spec = DataSpec(d.seq_len, d.global_batch, d.micro_num, d.packed, d.seed, m.vocab)
    if p.strategy == "isp":
        isp = build_isp_model(cfg, topo, ISPSettings(p.overlap, p.memory_pool), seed=d.seed,
                              dtype=DTYPES[config.run.dtype], device=device)
        trainer: ISPTrainer | PeerTrainer = ISPTrainer(isp, lr=config.run.lr)
    else:  # PyTorch's FSDP2 / DDP / Ulysses+FSDP2 on the same model and tokens (docs/peers.md)
        from isp_core.peers import build_trainer  # only peer cells need torch's FSDP2/DDP internals

        trainer = build_trainer(p.strategy, cfg, topo, seed=d.seed, dtype=DTYPES[config.run.dtype],
                                device=device, lr=config.run.lr)
    print(f"strategy {p.strategy}; {topo}", flush=True)
    return Cell(config, cell_id, run_dir, topo.rank, device, topo, trainer, spec)


def batches_for(cell: Cell, step: int) -> list[MicroBatch]:
    topo = cell.topo
    out = micro_batches(cell.spec, step, topo.dp, topo.dp_rank, topo.sp, topo.sequence.rank)
    for mb in out:
        for name in ("tokens", "positions", "labels", "cu_seqlens"):
            value = getattr(mb, name)
            if value is not None:
                setattr(mb, name, value.to(cell.device, non_blocking=True))
    return out


def run_steps(cell: Cell, first_step: int, count: int, timer: Optional[StepTimer] = None,
              profiler: Optional[Profiler] = None) -> list[float]:
    """Train `count` steps (data prepared before the clock starts); returns the local losses."""
    losses = []
    for step in range(first_step, first_step + count):
        batches = batches_for(cell, step)
        if timer is None:
            losses.append(cell.trainer.train_step(batches))
        else:
            with timer.step():
                losses.append(cell.trainer.train_step(batches))
        if profiler is not None:
            profiler.step()
    return losses


def measure(cell: Cell) -> dict[str, Any]:
    run, stats = cell.config.run, cell.topo.stats
    step = 0
    run_steps(cell, step, run.warmup_steps)
    step += run.warmup_steps
    reset_peak(cell.device)
    stats.reset()
    sampler = make_sampler(cell)
    timer = StepTimer(cell.device)
    if sampler is not None:
        sampler.start()
    losses = run_steps(cell, step, run.measure_steps, timer)
    if sampler is not None:
        sampler.stop()
    step += run.measure_steps
    comm = stats.snapshot()
    stats.enabled = False  # later phases must not change the per-step counts
    out: dict[str, Any] = {"samples": timer.samples, "losses": losses, "comm": comm,
                           "memory": peak_memory(cell.device), "first_measured_step": run.warmup_steps}
    if sampler is not None:
        out["nvml"] = sampler.summary(run.measure_steps, cell.config.tokens_per_step)
        if sampler.available:
            without = StepTimer(cell.device)
            run_steps(cell, step, NVML_OVERHEAD_STEPS, without)
            step += NVML_OVERHEAD_STEPS
            out["nvml_off_samples"] = without.samples
        sampler.close()
    out["profile"] = profile(cell, step)
    return out


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
    out: dict[str, Any] = {"traces": [str(p) for p in prof.trace_paths], "active_steps": settings.active}
    if snapshot:
        # Loadable by PyTorch's memory_viz; covers the profiled steps only, like the traces.
        path = dump_memory_snapshot(trace_root / cell.cell_id / f"rank{cell.rank}_memory.pickle")
        stop_memory_history()
        out["memory_snapshot"] = str(path)
    return out


def gather_per_rank(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run_cell(config: CellConfig, cell_id: str, run_dir: Path, device: torch.device) -> Optional[dict]:
    cell = build(config, cell_id, run_dir, device)
    raw = measure(cell)
    raw["samples"] = reduce_max_across_ranks(raw["samples"])
    if "nvml_off_samples" in raw:
        raw["nvml_off_samples"] = reduce_max_across_ranks(raw["nvml_off_samples"])
    per_rank = gather_per_rank({k: raw.get(k) for k in ("losses", "comm", "memory", "nvml", "profile")})
    if cell.rank != 0:
        return None
    pool = cell.trainer.isp.communicator.memory_pool if isinstance(cell.trainer, ISPTrainer) else None
    # After every rank is done measuring: the single-process reference never touches the timings.
    reference = None if loss_check.skip_reason(config) else loss_check.reference_losses(config, device)
    return assemble_metrics(cell.config, raw, per_rank, pool.bytes_held()["total"] if pool else 0, device,
                            loss_reference=reference)


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell-config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--log-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    redirect_output(args.log_dir, rank)
    try:
        config = CellConfig.from_dict(json.loads(args.cell_config.read_text()))
        device = setup(config)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
        if config.run.kind == "collectives":  # nccl-tests-style sweep: docs/collectives.md
            from bench.collectives_bench import run_collectives

            return run_collectives(config, args.cell_config.parent.name, args.out, device)
        metrics = run_cell(config, args.cell_config.parent.name, args.out.parents[2], device)
        if rank == 0:
            write_json_atomic(args.out, {"metrics": metrics})
        dist.barrier()
        dist.destroy_process_group()
        return 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise


if __name__ == "__main__":
    sys.exit(main())
