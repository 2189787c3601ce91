"""The schema of one benchmark cell: seven small frozen sections and the rules for their fields.

Each field carries its `Rule` in the dataclass metadata, so the same rule checks a YAML value
(with the key path the user wrote), a matrix value and a dataclass built directly from Python.
Cross-field rules (sizes that must divide, host capacity) live in `checks.py`; the cell that
holds the sections and runs those rules in `cell.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from bench.strategies import NAMES as strategy_names

# isp, and PyTorch's own peers on the same model and tokens (bench/strategies, docs/peers.md).
STRATEGIES: tuple[str, ...] = strategy_names
DEVICES: tuple[str, ...] = ("cpu", "cuda")
BACKENDS: tuple[str, ...] = ("gloo", "nccl")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
ELEMENT_SIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of each dtype
# sp and wp may say "world": the cell's world_size, so one matrix axis over world_size works.
WORLD = "world"
# What a cell runs: training steps, or nccl-tests-style collective sweeps (docs/collectives.md).
KINDS: tuple[str, ...] = ("training", "collectives")
ATTENTION: tuple[str, ...] = ("auto", "flash", "sdpa")  # isp_core.attention.ATTENTION_BACKENDS
COLLECTIVE_OPS: tuple[str, ...] = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce")
COLLECTIVE_GROUPS: tuple[str, ...] = ("weight", "sequence", "world")
# ISP's variants (isp_core names them too; repeated here so the config layer needs no torch).
WP_UNITS: tuple[str, ...] = ("module", "block")
HEAD_MODES: tuple[str, ...] = ("vocab_parallel", "gathered")
FORWARD_OVERLAP: tuple[str, ...] = ("layer", "module")
LAUNCH_BEFORE: tuple[str, ...] = ("wo", "wqkv", "attn", "w1")
ISP_ONLY_DEFAULTS: dict[str, object] = {"wp_unit": "module", "head": "vocab_parallel", "forward_overlap_per": "layer",
                                        "launch_allgather_before": "wo", "embedding_backward_gather": True,
                                        "zero1": 1}
from bench.config.rules import (ConfigError, Problem, Rule, Section, _clip, _f, _show,  # noqa: F401
                                field_problems, suggest)

@dataclass(frozen=True)
class ModelConfig(Section):
    NAME: ClassVar[str] = "model"
    hidden: int = _f(256, "int", "model width (InternEvo model.hidden_size)", lo=1)
    layers: int = _f(4, "int", "transformer blocks (model.num_layers)", lo=1)
    heads: int = _f(8, "int", "query heads (model.num_attention_heads)", lo=1)
    kv_heads: int = _f(4, "int", "key/value heads, GQA (model.num_kv_attention_heads)", lo=1)
    vocab: int = _f(4096, "int", "vocabulary size (model.vocab_size)", lo=1)
    mlp_hidden: int = _f(704, "int", "SwiGLU inner width (model.mlp_ratio * hidden)", lo=1)
    checkpoint: float = _f(0.0, "float", "fraction of blocks recomputed (model.checkpoint)", lo=0.0, hi=1.0)


@dataclass(frozen=True)
class DataConfig(Section):
    NAME: ClassVar[str] = "data"
    seq_len: int = _f(1024, "int", "tokens per sample (data.seq_len)", lo=1)
    global_batch: int = _f(4, "int", "samples per optimizer step over all dp ranks", lo=1)
    micro_num: int = _f(2, "int", "micro-batches per step, gradient accumulation (data.micro_num)", lo=1)
    packed: bool = _f(True, "bool", "flatten a micro-batch into one row, as InternEvo packed data")
    seed: int = _f(0, "int", "seed of the synthetic tokens and the init", lo=0)


@dataclass(frozen=True)
class ParallelConfig(Section):
    NAME: ClassVar[str] = "parallel"
    world_size: int = _f(2, "int", "ranks in the job, all nodes", lo=1)
    sp: int = _f(2, "int", "sequence-parallel size (parallel.tensor size, mode isp)", lo=1, words=(WORLD,))
    wp: int = _f(2, "int", "weight-parallel size (parallel.weight size)", lo=1, words=(WORLD,))
    overlap: bool = _f(True, "bool", "prefetch weights / overlap comm (parallel.weight overlap)")
    memory_pool: bool = _f(False, "bool", "reuse gathered-weight buffers (parallel.weight memory_pool)")
    strategy: str = _f("isp", "str", "isp, or a peer: fsdp2, ddp (sp=wp=1), ulysses (wp=1)", choices=STRATEGIES)
    # ISP's variants (docs/isp-variants.md); the defaults are InternEvo's behaviour.
    wp_unit: str = _f("module", "str", "isp: one weight all-gather per linear (module) or per block (block)",
                      choices=WP_UNITS)
    head: str = _f("vocab_parallel", "str", "isp: logits all-to-all'd to [B,S,V/sp] (vocab_parallel) or "
                   "full-vocab logits of local tokens (gathered)", choices=HEAD_MODES)
    forward_overlap_per: str = _f("layer", "str", "isp: forward prefetch per block (layer) or per unit (module); "
                                  "parallel.weight.forward_overlap_per", choices=FORWARD_OVERLAP)
    launch_allgather_before: str = _f("wo", "str", "isp: module before which the next block's gathers start "
                                      "(layer prefetch); parallel.weight.launch_allgather_before",
                                      choices=LAUNCH_BEFORE)
    embedding_backward_gather: bool = _f(True, "bool", "isp: gather the embedding again in backward, as InternEvo "
                                         "does (false: the saving InternEvo could take, docs/isp-variants.md)")
    # InternEvo's parallel.zero1.size. The trainers here keep AdamW whole on each rank (1); the
    # planner also models -1 (the whole weight-data group) and sizes between (docs/plan.md).
    zero1: int = _f(1, "int", "isp: optimizer-state sharding group (InternEvo parallel.zero1.size): 1 none, -1 "
                    "the weight-data group, or a divisor of it; runs need 1, plan models any", lo=-1)

    def __post_init__(self) -> None:
        for name in ("sp", "wp"):
            if getattr(self, name) == WORLD and isinstance(self.world_size, int):
                object.__setattr__(self, name, self.world_size)
        super().__post_init__()


@dataclass(frozen=True)
class RunConfig(Section):
    NAME: ClassVar[str] = "run"
    kind: str = _f("training", "str", "what the cell runs: training steps or collective sweeps", choices=KINDS)
    canary: bool = _f(False, "bool", "a machine probe for `nightly`: judged first; when it moves, the other "
                                     "cells' changes that night are labelled machine changes, not code regressions")
    device: str = _f("cpu", "str", "where ranks compute", choices=DEVICES)
    backend: str = _f("gloo", "str", "torch.distributed backend", choices=BACKENDS)
    dtype: str = _f("float32", "str", "compute dtype (bfloat16: fp32 masters; float16: collectives only)", choices=DTYPES)
    attention: str = _f("auto", "str", "attention kernel: auto (flash when it runs), flash, sdpa", choices=ATTENTION)
    warmup_steps: int = _f(2, "int", "steps run before timing", lo=0)
    measure_steps: int = _f(5, "int", "timed steps", lo=1)
    timeout_s: float = _f(600.0, "float", "wall-clock limit of the cell's torchrun job", gt=0.0)
    lr: float = _f(1e-3, "float", "AdamW learning rate", lo=0.0)
    peak_tflops: float | None = _f(None, "float", "device peak for MFU; null: the GPU's table entry (a GPU "
                                                  "not in the table gets mfu null, with the reason)", gt=0.0,
                                     nullable=True)
    check_loss: Any = _f("auto", "auto_bool", "compare losses with a 1-process run in the same dtype; auto: "
                                              "whenever the reference fits the device, else the record says why")
    straggler_pct: float = _f(5.0, "float", "a rank whose compute time is more than this % above the median "
                                            "rank's is a straggler (metrics.straggler)", gt=0.0)
    reuse_workers: bool = _f(False, "bool", "run cells of the same world size one after another in one torchrun "
                                            "job (one node): no start-up per cell; CPU peak RSS then unavailable")


@dataclass(frozen=True)
class ProfileConfig(Section):
    NAME: ClassVar[str] = "profile"
    enabled: bool = _f(False, "bool", "run torch.profiler over the schedule below")
    wait: int = _f(1, "int", "profiler schedule: steps skipped", lo=0)
    warmup: int = _f(1, "int", "profiler schedule: steps traced but dropped", lo=0)
    active: int = _f(2, "int", "profiler schedule: steps recorded (a trace needs two ProfilerStep#)", lo=2)
    repeat: int = _f(1, "int", "profiler schedule: cycles (0: until the run ends)", lo=0)
    ranks: Any = _f("all", "ranks", "ranks that write a trace")
    record_shapes: bool = _f(False, "bool", "torch.profiler record_shapes")
    with_stack: bool = _f(False, "bool", "torch.profiler with_stack")
    profile_memory: bool = _f(False, "bool", "torch.profiler profile_memory")
    memory_snapshot: bool = _f(False, "bool", "CUDA memory snapshot for memory_viz (cuda only)")
    nvtx: bool = _f(False, "bool", "NVTX ranges for Nsight Systems: steps, forward, backward, optimizer and the "
                                   "isp.* labels (cuda; on cpu the record says inactive)")


@dataclass(frozen=True)
class NvmlConfig(Section):
    NAME: ClassVar[str] = "nvml"
    enabled: Any = _f("auto", "auto_bool", "GPU power/clock sampling: auto (when NVML works), true, false")
    interval_ms: int = _f(100, "int", "sampling period", lo=1)


@dataclass(frozen=True)
class CollectivesConfig(Section):
    """nccl-tests-style sweep of a `run.kind: collectives` cell; ignored by training cells."""

    NAME: ClassVar[str] = "collectives"
    ops: tuple[str, ...] = _f(COLLECTIVE_OPS, "subset", "collectives swept, in this order", choices=COLLECTIVE_OPS)
    group: str = _f("weight", "str", "group measured: weight (wp ranks), sequence (sp), world",
                    choices=COLLECTIVE_GROUPS)
    min_bytes: int = _f(1024, "bytes", "smallest message (nccl-tests -b)", lo=1)
    max_bytes: int = _f(4 << 20, "bytes", "largest message (nccl-tests -e)", lo=1)
    factor: int = _f(2, "int", "size multiplier between steps (nccl-tests -f)", lo=2)
    warmup_iters: int = _f(5, "int", "untimed calls per op and size (nccl-tests -w)", lo=0)
    iters: int = _f(20, "int", "timed calls per op and size (nccl-tests -n)", lo=1)
    async_op: bool = _f(False, "bool", "launch all iters, then wait once (else wait after each call)")
    min_busbw_gbps: float | None = _f(None, "float", "fail the cell below this average busbw; null: no floor",
                                        gt=0.0, nullable=True)


SECTIONS: dict[str, type] = {
    c.NAME: c for c in (ModelConfig, DataConfig, ParallelConfig, RunConfig, ProfileConfig, NvmlConfig,
                        CollectivesConfig)
}


def rule_for(dotted: str) -> Rule | None:
    """The rule of a dotted key such as 'parallel.sp', or None when there is no such key."""
    section, _, name = dotted.partition(".")
    cls = SECTIONS.get(section)
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    return fields[name].metadata["rule"] if name in fields else None


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
