"""Rank functions for the peer-strategy tests (module level so spawned processes import them).

Each case trains one strategy for a few steps on the shared token stream and returns its
losses and its counted, predicted and dispatcher-witnessed communication. The witness is a
TorchDispatchMode that sees every c10d op this rank issues (on CPU the whole step runs on
this thread), so the counts are checked against what reached torch.distributed itself.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.config import CellConfig
from bench.worker.cell import run_cell
from isp_core.comm_formula import predicted_comm
from isp_core.data import DataSpec, micro_batches
from isp_core.engine import ISPSettings
from isp_core.model import LlamaConfig
from bench.strategies.peer_formula import predicted_peer_comm
from bench.strategies import build_trainer
from isp_core.topology import ParallelTopology

# c10d op -> (kind, index of the tensor whose size nccl-tests counts)
C10D_KINDS = {"_allgather_base_": ("all_gather", 0), "_reduce_scatter_base_": ("reduce_scatter", 1),
              "allreduce_": ("all_reduce", 0), "alltoall_base_": ("all_to_all", 1)}


class C10dWitness(TorchDispatchMode):
    """Totals per kind of the c10d collectives dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "bytes": 0})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("c10d::"):
            kind, index = C10D_KINDS[name.split("::")[1]]
            arg = args[index]
            tensor = arg[0] if isinstance(arg, (list, tuple)) else arg
            self.seen[kind]["calls"] += 1
            self.seen[kind]["bytes"] += tensor.numel() * tensor.element_size()
        return func(*args, **(kwargs or {}))


def model_config(checkpoint: float = 0.0, vocab: int = 66) -> LlamaConfig:
    # vocab 66 does not divide by 4: FSDP2 pads the embedding and head shards at world size 4.
    return LlamaConfig(hidden=32, layers=2, heads=4, kv_heads=2, vocab=vocab, mlp_hidden=48, checkpoint=checkpoint)


def data_spec(vocab: int = 66) -> DataSpec:
    return DataSpec(seq_len=16, global_batch=8, micro_num=2, packed=True, seed=3, vocab=vocab)


_topologies: dict[tuple[int, int], ParallelTopology] = {}


def topology(rank: int, world_size: int, sp: int, wp: int) -> ParallelTopology:
    if (sp, wp) not in _topologies:  # new_group is collective: every rank builds the same ones
        _topologies[(sp, wp)] = ParallelTopology(world_size, sp, wp, rank)
    return _topologies[(sp, wp)]


def _by_kind(counts: dict) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "bytes": 0})
    for kinds in counts.values():
        for kind, c in kinds.items():
            out[kind]["calls"] += c["calls"]
            out[kind]["bytes"] += c["bytes"]
    return dict(out)


def run_strategy(rank: int, world_size: int, strategy: str, sp: int, wp: int, checkpoint: float = 0.0,
                 vocab: int = 66, steps: int = 3) -> dict[str, Any]:
    """Train `steps` steps; losses are the mean over ranks, counts those of the last step."""
    topo = topology(rank, world_size, sp, wp)
    cfg, spec = model_config(checkpoint, vocab), data_spec(vocab)
    trainer = build_trainer(strategy, cfg, topo, ISPSettings(overlap=True), seed=0)
    losses, witness = [], C10dWitness()
    for step in range(steps):
        batches = micro_batches(spec, step, topo.dp, topo.dp_rank, sp, topo.sequence.rank)
        topo.stats.reset()
        if step == steps - 1:
            with witness:
                losses.append(trainer.train_step(batches))
        else:
            losses.append(trainer.train_step(batches))
    counted = topo.stats.snapshot()
    mean = torch.tensor(losses, dtype=torch.float64)
    torch.distributed.all_reduce(mean)
    if strategy == "isp":
        predicted = predicted_comm(cfg, spec, world_size, sp, wp, overlap=True, element_size=4)
    else:
        predicted = predicted_peer_comm(strategy, cfg, spec, world_size, sp, 4)
    return {"losses": (mean / world_size).tolist(), "counted": counted, "predicted": predicted,
            "witness": dict(witness.seen), "counted_by_kind": _by_kind(counted)}


def run_cases(rank: int, world_size: int, cases: list[tuple]) -> list[dict[str, Any]]:
    """Each case is (strategy, sp, wp[, checkpoint[, vocab]])."""
    return [{"case": case, **run_strategy(rank, world_size, *case)} for case in cases]


def run_worker_cells(rank: int, world_size: int, configs: list[dict], run_dir: str) -> list[Any]:
    """Whole cells through bench.worker.cell.run_cell (build, measure, profile, reduce, metrics)."""
    return [run_cell(CellConfig.from_dict(c), f"cell{i}", Path(run_dir), torch.device("cpu"))
            for i, c in enumerate(configs)]


def run_cases_and_cells(rank: int, world_size: int, cases: list[tuple], configs: list[dict],
                        run_dir: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Both of the above in one set of processes (starting processes costs more than a case)."""
    return run_cases(rank, world_size, cases), run_worker_cells(rank, world_size, configs, run_dir)
