"""The GPU configs as their machines would load them: gpu_check's cells, and the nightly sbatch's
default node count against its config, and the several-node config at any node count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.config.checks import HostLimits
from bench.config.matrix import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SBATCH = (CONFIGS / "slurm" / "nightly.sbatch").read_text()


def test_gpu_check_cells_cover_the_variants_on_one_gpu_and_the_pair_on_two() -> None:
    main = load_config(CONFIGS / "gpu-check-main.yaml", host=HostLimits(cuda_devices=1, nvml_error="no NVML here"))
    (cell,) = main.cells  # nvml.enabled auto: a host without NVML still runs it (the NVML row says why)
    assert cell.config.profile.memory_snapshot and cell.config.profile.enabled and cell.config.nvml.enabled == "auto"
    variants = load_config(CONFIGS / "gpu-check-variants.yaml", host=HostLimits(cuda_devices=1))
    seen = {(c.config.parallel.memory_pool, c.config.model.checkpoint, c.config.parallel.wp_unit,
             c.config.parallel.head, c.config.parallel.strategy) for c in variants.cells}
    assert {(True, 0.0, "module", "vocab_parallel", "isp"), (False, 0.5, "module", "vocab_parallel", "isp"),
            (False, 1.0, "module", "vocab_parallel", "isp"), (False, 0.0, "block", "vocab_parallel", "isp"),
            (False, 0.0, "module", "gathered", "isp")} <= seen
    assert {s[-1] for s in seen} == {"isp", "ddp", "fsdp2", "ulysses"}
    pair = load_config(CONFIGS / "gpu-check-pair.yaml", host=HostLimits(cuda_devices=2))
    assert {(c.config.run.kind, c.config.parallel.strategy) for c in pair.cells} == {
        ("training", "isp"), ("training", "fsdp2"), ("collectives", "isp")}
    for bench in (main, variants, pair):
        assert all(c.config.parallel.world_size <= 2 and c.config.run.check_loss is True for c in bench.cells)


def test_the_sbatch_default_node_count_matches_its_config() -> None:
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", SBATCH, re.M).group(1))  # type: ignore[union-attr]
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", SBATCH, re.M).group(1))  # type: ignore[union-attr]
    (one_node,) = re.findall(r"nodes == 1 \)\); then\n\s+config=(\S+)", SBATCH)
    assert nodes == 1 and one_node == "configs/gpu-nightly-8.yaml"
    nightly = load_config(REPO / one_node, host=HostLimits(nnodes=nodes, cuda_devices=gpus))
    assert {c.config.parallel.world_size for c in nightly.cells} == {nodes * gpus}


@pytest.mark.parametrize("nnodes", [2, 4, 8, 16])
def test_the_several_node_config_follows_the_node_count(nnodes: int) -> None:
    (sets,) = re.findall(r'scale=\(--set "parallel.world_size=\$\(\(nodes \* gpus\)\)" '
                         r'--set "data.global_batch=\$\(\(nodes \* gpus\)\)"\)', SBATCH)
    assert sets  # the sbatch passes exactly these two, both nodes x GPUs per node
    world = 8 * nnodes
    bench = load_config(CONFIGS / "gpu-nightly-nodes.yaml", [f"parallel.world_size={world}",
                        f"data.global_batch={world}"], host=HostLimits(nnodes=nnodes, cuda_devices=8))
    assert len(bench.cells) == 7 and {c.config.parallel.wp for c in bench.cells} == {8, world}
    (canary,) = [c for c in bench.cells if c.config.run.canary]  # the machine probe spans every node
    assert canary.id == "all-nodes-collectives" and canary.config.run.kind == "collectives"
    assert canary.config.parallel.wp == world and canary.config.collectives.group == "weight"
    for c in bench.cells:
        cfg = c.config
        assert cfg.parallel.world_size == world and cfg.parallel.sp == 8  # sp inside one node
        assert cfg.micro_bsz * cfg.data.seq_len // cfg.parallel.sp == 16384  # tokens per rank, any N
