"""FSDP2, DDP and Ulysses+FSDP2 beside ISP: same losses as one process, bytes as predicted.

Real gloo processes (tests/support/dist_harness.py). Each case trains 3 steps; its losses must equal
the world-size-1 reference, and its last step's communication must equal, per group and kind,
both the formula (bench.strategies.peer_formula) and what reached c10d (peer_cases.C10dWitness).
"""

from __future__ import annotations

import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml

from tests.support import peer_cases
from bench.config import STRATEGIES as config_strategies
from bench.config import CellConfig, ConfigError
from bench.config.checks import HostLimits
from bench.config.matrix import build, load_config
from tests.support.dist_harness import run_ranks
from bench.strategies.peer_formula import (BUCKET_CAP_BYTES, FIRST_BUCKET_BYTES, ddp_buckets, padded_numel,
                                   parameter_groups, predicted_peer_comm)
from bench.strategies import NAMES as peer_strategies
from bench.strategies.peer_trainer import train_reference as reference_losses

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4  # relative, per step: the worker's bench.metrics.loss_check.REL_TOL


@lru_cache(maxsize=None)
def reference(vocab: int) -> list[float]:
    return reference_losses(peer_cases.model_config(vocab=vocab), peer_cases.data_spec(vocab), steps=3)


def check(results: list[dict]) -> None:
    for r in results:
        case, want = r["case"], reference(r["case"][4] if len(r["case"]) > 4 else 66)
        assert r["losses"] == pytest.approx(want, rel=TOL), f"{case}: losses {r['losses']} vs {want}"
        assert r["counted_by_kind"] == r["witness"], f"{case}: counted {r['counted']} but c10d saw {r['witness']}"
        assert r["counted"] == r["predicted"], f"{case}: counted {r['counted']} != predicted {r['predicted']}"


WORKER_BASE = {"model": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 64, "mlp_hidden": 48},
               "data": {"seq_len": 16, "global_batch": 4, "micro_num": 2},
               "run": {"warmup_steps": 1, "measure_steps": 2},
               "profile": {"enabled": True, "wait": 0, "warmup": 0, "active": 2}, "nvml": {"enabled": False}}
LAYOUTS_2 = {"isp": (2, 2), "ulysses": (2, 1), "fsdp2": (1, 1), "ddp": (1, 1)}


@pytest.fixture(scope="module")
def world_size_2(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    """One set of 2 processes: the training cases, then one whole worker cell per strategy."""
    cases = [("isp", 2, 2), ("ulysses", 2, 1), ("fsdp2", 1, 1), ("ddp", 1, 1),
             ("ddp", 1, 1, 0.0, 8160)]  # vocab 8160: the head fills DDP's 1 MiB first bucket
    configs = [{**WORKER_BASE, "parallel": {"world_size": 2, "strategy": s, "sp": sp, "wp": wp}}
               for s, (sp, wp) in LAYOUTS_2.items()]
    run_dir = tmp_path_factory.mktemp("run")
    return run_ranks(2, peer_cases.run_cases_and_cells, cases, configs, str(run_dir))[0]


def test_world_size_2_losses_and_bytes(world_size_2: tuple[list[dict], list[dict]]) -> None:
    results = world_size_2[0]
    check(results)
    ddp_big = results[-1]["counted"]["world"]["all_reduce"]
    assert ddp_big["calls"] == 2, "DDP's buckets were not rebuilt after the first step"


def test_world_size_4_losses_and_bytes() -> None:
    # vocab 66 does not divide by 4: FSDP2 pads the embedding and head shards to 68 rows.
    cases = [("isp", 2, 2), ("ulysses", 4, 1), ("fsdp2", 1, 1, 0.5), ("ddp", 1, 1, 0.5),
             ("ulysses", 2, 1, 0.5)]  # checkpointing: Ulysses' recompute repeats its all-to-alls
    results = run_ranks(4, peer_cases.run_cases, cases)
    check(results[0])
    for rank_results in results[1:]:  # every rank communicates alike
        assert [r["counted"] for r in rank_results] == [r["counted"] for r in results[0]]


def test_cells_through_the_worker(world_size_2: tuple[list[dict], list[dict]]) -> None:
    """bench.worker.cell.run_cell for each strategy: every metric of an ISP cell, formula and loss checks."""
    metrics = world_size_2[1]
    for strategy, m in zip(LAYOUTS_2, metrics, strict=True):
        assert m["comm"]["matches_prediction"], f"{strategy}: {m['comm']['mismatches']}"
        assert m["loss_matches_reference"] and m["loss_max_rel_diff"] <= TOL, strategy
        assert len(m["loss_reference"]) == 2 == len(m["loss"])
        for key in ("step_time_s", "tokens_per_s", "peak_memory_bytes", "exposed_comm_s", "overlap_pct",
                    "comm_time_s", "bandwidth"):
            assert key in m, f"{strategy}: no {key}"
    assert all(m["loss_reference"] == metrics[0]["loss_reference"] for m in metrics)
    assert set(metrics[1]["comm"]["counted_per_step"]) == {"sequence", "world"}  # ulysses


# --- formulas, without processes ------------------------------------------------------------

def test_formula_pieces_match_torch_defaults() -> None:
    assert FIRST_BUCKET_BYTES == torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
    assert BUCKET_CAP_BYTES == torch.nn.parallel.distributed._DEFAULT_BUCKET_CAP_MB * 2**20
    assert padded_numel((66, 32), 4) == 68 * 32 and padded_numel((64, 32), 4) == 64 * 32
    groups = parameter_groups(peer_cases.model_config())
    assert list(groups) == ["root", "block0", "block1"] and len(groups["block0"]) == 7
    cfg = peer_cases.model_config(vocab=8160)
    assert ddp_buckets(cfg, 4)[0] >= FIRST_BUCKET_BYTES and len(ddp_buckets(cfg, 4)) == 2
    assert predicted_peer_comm("fsdp2", cfg, peer_cases.data_spec(8160), 1, 1, 4) == {}


# --- config ----------------------------------------------------------------------------------

SMALL = {"model": {"hidden": 64, "layers": 1, "heads": 4, "kv_heads": 2, "vocab": 256, "mlp_hidden": 128},
         "data": {"seq_len": 32, "global_batch": 8, "micro_num": 1},
         "parallel": {"world_size": 2, "sp": 1, "wp": 1}}


def messages(parallel: dict, **sections: dict) -> list[str]:
    doc = {"name": "t", "base": yaml.safe_load(yaml.safe_dump(SMALL))}
    doc["base"]["parallel"].update(parallel)
    for name, values in sections.items():
        doc["base"].setdefault(name, {}).update(values)
    with pytest.raises(ConfigError) as info:
        build(doc, "t.yaml", "t", host=HostLimits(cpu_count=2))
    return info.value.messages


@pytest.mark.parametrize("parallel, sections, parts", [
    ({"strategy": "fsdp2", "sp": 2}, {}, ("t.yaml: base.parallel.sp", "strategy fsdp2", "allowed: 1")),
    ({"strategy": "ddp", "wp": "world"}, {}, ("base.parallel.wp", "wp=2 with strategy ddp", "allowed: 1")),
    ({"strategy": "ulysses", "sp": 2, "wp": 2}, {}, ("base.parallel.wp", "FSDP2 shards", "allowed: 1")),
    ({"strategy": "ulysses", "world_size": 4, "sp": 3}, {}, ("base.parallel.sp", "divisors of world_size")),
    ({"strategy": "ulysses", "world_size": 4, "sp": 4}, {"model": {"heads": 6, "kv_heads": 2, "hidden": 96}},
     ("base.parallel.sp", "does not divide heads=6")),
    ({"strategy": "fsdp2", "world_size": 4}, {"data": {"global_batch": 6}},
     ("base.data.global_batch", "dp*micro_num=4*1", "multiples of 4")),
    ({"strategy": "ddp"}, {"run": {"warmup_steps": 0}}, ("base.run.warmup_steps", "rebuilds its gradient buckets")),
    ({"strategy": "isp", "sp": 2, "wp": 2}, {"run": {"dtype": "float16"}},
     ("base.run.dtype", "float16 training needs dynamic loss scaling", "allowed for training: float32, bfloat16")),
    ({"strategy": "isp", "sp": 2, "wp": 2}, {"run": {"attention": "flash"}},
     ("base.run.attention", "flash-attn runs on CUDA only")),
])
def test_invalid_combinations_are_config_errors(parallel: dict, sections: dict, parts: tuple[str, ...]) -> None:
    msgs = messages(parallel, **sections)
    assert any(all(p in m for p in parts) for m in msgs), f"no message with {parts} in {msgs}"


def test_valid_peer_cells_and_shipped_configs() -> None:
    # Ulysses' head is a plain linear: vocab need not divide by sp (ISP's vocab-parallel head must).
    cell = CellConfig.from_dict({**SMALL, "model": {**SMALL["model"], "vocab": 255},
                                 "parallel": {"world_size": 2, "sp": 2, "wp": 1, "strategy": "ulysses"}})
    assert cell.dp == 1
    assert config_strategies == peer_strategies  # bench/config/schema.py stays torch-free, so it keeps its own copy
    cpu = load_config(REPO / "configs" / "peers-cpu.yaml", host=HostLimits(cpu_count=2))
    assert sorted({c.config.parallel.strategy for c in cpu.cells}) == ["ddp", "fsdp2", "isp", "ulysses"]
    assert {c.config.parallel.world_size for c in cpu.cells} == {2, 4}
    gpu = load_config(REPO / "configs" / "peers-gpu.yaml", host=HostLimits(cuda_devices=8))
    assert len(gpu.cells) == 4 and all(c.config.run.dtype == "bfloat16" for c in gpu.cells)


def test_cli_exits_2_on_a_strategy_that_does_not_fit() -> None:
    out = subprocess.run([sys.executable, "run_bench.py", "--dry-run", "--set", "parallel.strategy=ddp"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "(parallel.sp): sp=2 with strategy ddp" in out.stderr + out.stdout
