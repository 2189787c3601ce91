"""One cell's prediction: memory by component, communication per group, the replayed step.

Inputs are a cell's config (any world size, nothing is launched or probed), a Hardware, and
optionally measured link curves and a runtime (fixed memory) figure. See docs/plan.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from bench.plan.compute import Work, rates_for
from bench.plan.grad_sync import Optim, zero1_size
from bench.plan.hardware import Hardware, MeasuredCurve
from bench.plan.isp_schedule import Costs, IspKnobs
from bench.plan.isp_schedule import build as build_isp
from bench.plan.links import LinkModel, place
from bench.plan.memory import MemoryPlan, Optimizer, isp_memory, peer_memory
from bench.plan.peer_schedule import build as build_peer
from bench.plan.replay import replay
from isp_core.comm_formula import _linear_shapes
from isp_core.data import DataSpec, global_batch
from isp_core.model import LlamaConfig
from isp_core.topology import group_layout

ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
EXACT_TOKENS = 1 << 22  # below this many tokens per step the real document lengths are drawn


@dataclass
class Prediction:
    cell: str
    strategy: str
    world_size: int
    sp: int
    wp: int
    memory: MemoryPlan
    capacity_bytes: float
    comm: dict[str, dict[str, dict[str, Any]]]
    step_time_s: float
    compute_s: float
    exposed_comm_s: float
    comm_time_s: dict[str, float]
    tokens_per_s: float
    tflops_per_rank: float
    mfu: float | None
    tflops_internevo: float = 0.0  # the same step under InternEvo's FLOP count (internevo_flops)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.peak_bytes <= self.capacity_bytes

    @property
    def margin_bytes(self) -> float:
        return self.capacity_bytes - self.memory.peak_bytes


def llama(model: Any) -> LlamaConfig:
    return LlamaConfig(hidden=model.hidden, layers=model.layers, heads=model.heads, kv_heads=model.kv_heads,
                       vocab=model.vocab, mlp_hidden=model.mlp_hidden, checkpoint=model.checkpoint)


def data_spec(config: Any) -> DataSpec:
    d = config.data
    return DataSpec(d.seq_len, d.global_batch, d.micro_num, d.packed, d.seed, config.model.vocab)


def attention_pairs(spec: DataSpec, first_step: int, steps: int) -> float:
    """Causally attended (query, key) pairs per step, over the whole global batch."""
    if not spec.packed:
        return spec.global_batch * spec.seq_len * (spec.seq_len + 1) / 2
    if spec.global_batch * spec.seq_len <= EXACT_TOKENS:
        total = 0
        for step in range(first_step, first_step + steps):
            docs = global_batch(spec, step)[1]
            total += sum(d * (d + 1) // 2 for seq in docs for d in seq)
        return total / steps
    # Too many tokens to draw: the same document-length rule (data.py) on a Python RNG.
    rng, total, samples = random.Random(spec.seed), 0.0, 64
    for _ in range(samples):
        left, lo, hi = spec.seq_len, max(1, spec.seq_len // 8), max(2, spec.seq_len // 2)
        while left > 0:
            d = min(rng.randint(lo, hi), left)
            total += d * (d + 1) / 2
            left -= d
    return total / samples * spec.global_batch


def model_flops(cfg: LlamaConfig, tokens: int, pairs: float) -> float:
    """bench's model FLOPs (metrics.model_flops_per_step): 6 N tokens + 12 layers hidden pairs."""
    n = cfg.layers * sum(_linear_shapes(cfg)) + cfg.hidden * cfg.vocab
    return 6.0 * n * tokens + 12.0 * cfg.layers * cfg.hidden * pairs


def internevo_flops(cfg: LlamaConfig, global_batch: int, seq_len: int) -> float:
    """FLOPs per step as InternEvo's `get_megatron_flops` counts them, to compare with its claims:
    every attention pair of the full s x s square (no causal halving), q, k, v and o projections
    as if every head had its own k and v (8 h^2 per token, GQA ignored), and with checkpointing
    the recompute counted (factor 4 instead of 3)."""
    factor = 4 if cfg.checkpoint > 0 else 3
    # InternLM2 configs give mlp_ratio = mlp_hidden / hidden; SwiGLU multiplies it by 3/2.
    mlp_term = 4 * 1.5 * cfg.mlp_hidden / cfg.hidden
    b, s, h = global_batch, seq_len, cfg.hidden
    return factor * ((8 + mlp_term) * b * s * h * h + 4 * b * s * s * h) * cfg.layers + 6 * b * s * h * cfg.vocab


@dataclass(frozen=True)
class PlanInputs:
    hardware: Hardware
    curves: tuple[MeasuredCurve, ...] = ()
    runtime_bytes: float | None = None  # None: the hardware file's reserved_gib
    master_fp32: bool = False
    knobs: IspKnobs = field(default_factory=IspKnobs)
    # "bench": this suite's trainers; "internevo": InternEvo's HybridZeroOptimizer and fused
    # kernels (bench/plan/grad_sync.py, memory.py), for ISP cells
    framework: str = "bench"


def _knobs(parallel: Any, default: IspKnobs) -> IspKnobs:
    """The ISP variants of the cell's parallel section (defaults for keys an old record lacks)."""
    names = ("wp_unit", "head", "forward_overlap_per", "launch_allgather_before", "embedding_backward_gather")
    return IspKnobs(**{n: getattr(parallel, n, getattr(default, n)) for n in names})


def _placements(hw: Hardware, world: int, sp: int, wp: int, z: int) -> dict[str, Any]:
    """Each group's placement on the nodes; zero1: z consecutive members of a weight-data group."""
    layout = group_layout(world, sp, wp)
    out = {g: place(groups[0], hw.gpus_per_node, hw.links.nics_per_node) for g, groups in layout.items()}
    out["zero1"] = place(list(range(0, z * wp, wp)), hw.gpus_per_node, hw.links.nics_per_node)
    return out


def predict(cell_id: str, config: Any, inputs: PlanInputs) -> Prediction:
    cfg, spec, p, r = llama(config.model), data_spec(config), config.parallel, config.run
    hw, E = inputs.hardware, ELEMENT_SIZE[r.dtype]
    world, sp, wp = p.world_size, p.sp, p.wp
    gpu = r.device == "cuda"
    ranks_per_node = min(world, hw.gpus_per_node)
    rates = rates_for(hw, r.dtype, ranks_per_node)
    z = zero1_size(getattr(p, "zero1", 1), world // wp) if p.strategy == "isp" else 1
    framework = inputs.framework if p.strategy == "isp" else "bench"
    placements = _placements(hw, world, sp, wp, z)
    links = LinkModel(hw, inputs.curves, ranks_per_node)
    tokens = spec.micro_bsz(world // sp) * spec.seq_len // sp
    pairs = attention_pairs(spec, r.warmup_steps, r.measure_steps)
    pairs_per_micro_rank = pairs / ((world // sp) * spec.micro_num)
    work = Work(tokens, E, cfg.hidden, cfg.mlp_hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.vocab,
                4.0 * pairs_per_micro_rank * cfg.head_dim * cfg.heads / sp)
    costs = Costs(work, rates, lambda kind, group, nbytes: links.time_s(kind, nbytes, placements[group]),
                  hw.call_overhead_s / rates.share)
    runtime = hw.reserved_bytes if inputs.runtime_bytes is None else inputs.runtime_bytes
    total_elements = cfg.layers * (sum(_linear_shapes(cfg)) + 2 * cfg.hidden) + 2 * cfg.vocab * cfg.hidden + cfg.hidden
    if p.strategy == "isp":
        knobs = _knobs(p, inputs.knobs)
        sched = build_isp(cfg, spec, world, sp, wp, p.overlap, E, costs, host_sync=not gpu, knobs=knobs,
                          optim=Optim(framework, z))
        memory = isp_memory(cfg, tokens, wp, sp, p.overlap, p.memory_pool, E, spec.micro_num, runtime,
                            optimizer=Optimizer(framework, z, inputs.master_fp32), reserve=hw.allocator_reserve,
                            head=knobs.head)
    else:
        params = total_elements // world if p.strategy in ("fsdp2", "ulysses") else total_elements
        sched = build_peer(p.strategy, cfg, spec, world, sp, E, costs, host_sync=not gpu, param_elements=params)
        block = sum(_linear_shapes(cfg)) + 2 * cfg.hidden
        memory = peer_memory(p.strategy, cfg, tokens, world, E, spec.micro_num, runtime, total_elements,
                             2 * cfg.vocab * cfg.hidden + cfg.hidden, block, gpu, inputs.master_fp32,
                             reserve=hw.allocator_reserve)
    timeline = replay(sched)
    step = timeline.step_s
    comm = {}
    for group, kinds in sched.tally().items():
        for kind, c in kinds.items():
            where = placements.get(group)
            seconds = sum(e - s for op, s, e in zip(timeline.ops, timeline.start, timeline.end)
                          if op.group == group and op.kind == kind)
            comm.setdefault(group, {})[kind] = {**c, "seconds": seconds, "group_size": where.size if where else None,
                                                "link": links.source(kind, where) if where else "?"}
    flops = model_flops(cfg, config.data.global_batch * spec.seq_len, pairs)
    tflops = flops / step / world / 1e12 if step > 0 else 0.0
    peak = r.peak_tflops or hw.peak(r.dtype)
    capacity = hw.memory_bytes * (1.0 - hw.margin)
    notes = [rates.source] + ([f"framework {framework}, zero1 {z}"] if p.strategy == "isp" else [])
    legacy = internevo_flops(cfg, config.data.global_batch, spec.seq_len) / step / world / 1e12 if step > 0 else 0.0
    return Prediction(cell_id, p.strategy, world, sp, wp, memory, capacity, comm, step, timeline.compute_s(),
                      timeline.exposed_comm_s(), timeline.comm_time_by_kind(),
                      config.data.global_batch * spec.seq_len / step if step > 0 else 0.0, tflops,
                      tflops / peak if peak else None, legacy, notes)

