"""Cross-field rules of a cell (sizes that must divide) and what the host can run.

Each rule names the key a user would change and what values would pass, because the
person reading the message is editing YAML, not reading the model code.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.config.schema import ISP_ONLY_DEFAULTS, Problem
from bench import strategies

if TYPE_CHECKING:
    from bench.config.cell import CellConfig


GROUP_KEY = {"weight": "wp", "sequence": "sp", "world": "world_size"}


def group_size(cell: CellConfig) -> int:
    return int(getattr(cell.parallel, GROUP_KEY[cell.collectives.group]))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def cell_problems(cell: CellConfig) -> list[Problem]:
    """Rules that depend only on the cell: each rank must get whole heads, rows and tokens."""
    if cell.run.kind == "collectives":  # no model runs: the rank grid and the sweep only
        return collectives_problems(cell) + _run_problems(cell)
    return _layout_problems(cell) + _shard_problems(cell) + _run_problems(cell) + _strategy_problems(cell)


def _layout_problems(cell: CellConfig) -> list[Problem]:
    m, p = cell.model, cell.parallel
    out = []
    if p.world_size % p.sp:
        out.append(Problem("parallel.sp", f"sp={p.sp} does not divide world_size={p.world_size}; "
                                          f"allowed: divisors of world_size ({_divisors(p.world_size)})"))
    if p.world_size % p.wp:
        out.append(Problem("parallel.wp", f"wp={p.wp} does not divide world_size={p.world_size}; "
                                          f"allowed: divisors of world_size ({_divisors(p.world_size)})"))
    if m.hidden % m.heads:
        out.append(Problem("model.hidden", f"hidden={m.hidden} is not a multiple of heads={m.heads}; "
                                           f"allowed: multiples of {m.heads}"))
    if m.heads % m.kv_heads:
        out.append(Problem("model.kv_heads", f"kv_heads={m.kv_heads} does not divide heads={m.heads}; "
                                             f"allowed: divisors of heads ({_divisors(m.heads)})"))
    # Ulysses-style all-to-all scatters heads over sp: each rank needs whole query heads.
    if m.heads % p.sp:
        out.append(Problem("parallel.sp", f"sp={p.sp} does not divide heads={m.heads} (attention is "
                                          f"head-sharded over sp); allowed: divisors of heads ({_divisors(m.heads)})"))
    # KV heads are either split over sp or replicated to it; anything between leaves a partial head.
    if m.kv_heads % p.sp and p.sp % m.kv_heads:
        out.append(Problem("parallel.sp", f"sp={p.sp} and kv_heads={m.kv_heads}: one must divide the other "
                                          "(kv heads are split or replicated over sp)"))
    if p.world_size % p.sp == 0:
        out += _batch_problems(cell)
    wdp = p.world_size // p.wp if p.world_size % p.wp == 0 else 0
    if wdp and p.zero1 != -1 and (p.zero1 < 1 or wdp % p.zero1):
        out.append(Problem("parallel.zero1", f"zero1={p.zero1} with a weight-data group of world_size/wp={wdp}: "
                                             f"allowed: -1 (the whole group) or a divisor of {wdp} "
                                             f"({_divisors(wdp)})"))
    return out


def _batch_problems(cell: CellConfig) -> list[Problem]:
    d, p = cell.data, cell.parallel
    out = []
    group = cell.dp * d.micro_num
    if d.global_batch % group:
        out.append(Problem("data.global_batch",
                           f"global_batch={d.global_batch} is not a multiple of dp*micro_num={cell.dp}*{d.micro_num}"
                           f" (dp = world_size/sp = {p.world_size}/{p.sp}); allowed: multiples of {group}"))
        return out
    # Packed data flattens a micro-batch into one row; sp splits that row over its ranks.
    row = cell.micro_bsz * d.seq_len if d.packed else d.seq_len
    if row % p.sp:
        what = f"micro_bsz*seq_len={cell.micro_bsz}*{d.seq_len}" if d.packed else f"seq_len={d.seq_len}"
        out.append(Problem("data.seq_len", f"the sequence each rank holds, {what}={row}, is not divisible by "
                                           f"sp={p.sp}; allowed: seq_len making it a multiple of {p.sp}"))
    return out


def _shard_problems(cell: CellConfig) -> list[Problem]:
    """Weights are row-sharded over wp and logits vocab-sharded over sp: each dim must split evenly."""
    m, p = cell.model, cell.parallel
    out = []
    # Only a vocab-parallel head (ISP's) splits the vocabulary over sp; the peers' head is a plain
    # linear on local tokens.
    vocab_parallel = strategies.get(p.strategy).vocab_parallel_head and p.head == "vocab_parallel"
    split = ((p.wp, "wp"), (p.sp, "sp")) if vocab_parallel else ((p.wp, "wp"),)
    for size, name in split:
        if m.vocab % size:
            out.append(Problem("model.vocab", f"vocab={m.vocab} is not divisible by {name}={size}; "
                                              f"allowed: multiples of {size}"))
    for key, value in (("hidden", m.hidden), ("mlp_hidden", m.mlp_hidden)):
        if value % p.wp:
            out.append(Problem(f"model.{key}", f"{key}={value} is not divisible by wp={p.wp} (weights are "
                                               f"sharded over wp); allowed: multiples of {p.wp}"))
    if m.hidden % m.heads == 0:
        qkv = (m.heads + 2 * m.kv_heads) * (m.hidden // m.heads)
        if qkv % p.wp:
            out.append(Problem("model.heads", f"the fused QKV weight has (heads+2*kv_heads)*head_dim={qkv} rows, "
                                              f"not divisible by wp={p.wp}; allowed: heads/kv_heads making it a "
                                              f"multiple of {p.wp}"))
    return out


def _strategy_problems(cell: CellConfig) -> list[Problem]:
    """What the strategy's registry entry allows (docs/peers.md): the peers have no weight group,
    and fsdp2/ddp no sequence split."""
    p, r = cell.parallel, cell.run
    strategy = strategies.get(p.strategy)
    out = []
    sweep = "; to sweep strategies, give each its sp/wp in include entries (configs/peers-cpu.yaml)"
    if not strategy.splits_sequence and p.sp != 1:
        out.append(Problem("parallel.sp", f"sp={p.sp} with strategy {p.strategy}, which splits no sequence "
                                          f"(dp = world_size); allowed: 1{sweep}"))
    if not strategy.weight_group and p.wp != 1:
        how = "every rank holds whole weights" if p.strategy == "ddp" else "FSDP2 shards weights over the world"
        out.append(Problem("parallel.wp", f"wp={p.wp} with strategy {p.strategy}, which has no weight group "
                                          f"({how}); allowed: 1{sweep}"))
    for key, default in ISP_ONLY_DEFAULTS.items():
        if p.strategy != "isp" and getattr(p, key) != default:
            out.append(Problem(f"parallel.{key}", f"{getattr(p, key)!r} with strategy {p.strategy}: only isp has "
                                                  f"this option; allowed: {default!r}"))
    if r.warmup_steps < strategy.min_warmup_steps:
        out.append(Problem("run.warmup_steps", f"{r.warmup_steps} with strategy {p.strategy}: "
                                               f"{strategy.warmup_reason}; allowed: >= {strategy.min_warmup_steps}"))
    if r.dtype == "float16":
        out.append(Problem("run.dtype", "float16 for a training cell: float16 training needs dynamic loss "
                                        "scaling, which this suite does not implement; allowed for training: "
                                        "float32, bfloat16 (float16 stays allowed for collectives cells)"))
    if r.attention == "flash" and r.device != "cuda":
        out.append(Problem("run.attention", f"flash with device {r.device}: flash-attn runs on CUDA only; "
                                            f"allowed on {r.device}: auto, sdpa"))
    return out


def _run_problems(cell: CellConfig) -> list[Problem]:
    r, prof, p = cell.run, cell.profile, cell.parallel
    out = []
    if r.backend == "nccl" and r.device != "cuda":
        out.append(Problem("run.backend", f"nccl needs run.device: cuda (device is {r.device!r}); "
                                          "allowed on cpu: 'gloo'"))
    if prof.memory_snapshot and r.device != "cuda":
        out.append(Problem("profile.memory_snapshot", "memory snapshots record the CUDA caching allocator; "
                                                      "allowed on cpu: false"))
    if isinstance(prof.ranks, list):
        bad = [rank for rank in prof.ranks if rank >= p.world_size]
        if bad:
            out.append(Problem("profile.ranks", f"ranks {bad} do not exist; allowed: 'all' or ranks "
                                                f"0..{p.world_size - 1}"))
    return out


@dataclass(frozen=True)
class HostLimits:
    """What this host can run. With `probe`, GPU count and NVML are asked only when a cell
    needs them (a cuda cell, nvml.enabled: true): torch and NVML are slow to start, and a
    typo in a CPU config should not wait for them."""

    nnodes: int = 1
    cpu_count: int = 1
    cuda_devices: int | None = None  # None with probe: ask torch
    nvml_error: str | None = None  # None: NVML works (or, with probe, ask it)
    probe: bool = False

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.cpu_count < 1 or (self.cuda_devices or 0) < 0:
            raise ValueError(f"impossible host limits {self}")

    def gpus(self) -> int:
        if self.cuda_devices is None and self.probe:
            return _cuda_device_count()
        return self.cuda_devices or 0

    def nvml_problem(self) -> str | None:
        return nvml_error() if self.nvml_error is None and self.probe else self.nvml_error


def probe_host(nnodes: int = 1) -> HostLimits:
    return HostLimits(nnodes=nnodes, cpu_count=os.cpu_count() or 1, probe=True)


@functools.cache
def _cuda_device_count() -> int:
    import torch  # late: see HostLimits

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@functools.cache
def nvml_error() -> str | None:
    """Why NVML cannot be used here, or None when it initialises."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as exc:  # ImportError or any NVMLError: both mean no sampling
        return f"{type(exc).__name__}: {exc}"
    return None


def host_problems(cell: CellConfig, host: HostLimits) -> list[Problem]:
    p, r = cell.parallel, cell.run
    out = []
    if p.world_size % host.nnodes:
        out.append(Problem("parallel.world_size", f"world_size={p.world_size} does not split over "
                                                  f"nnodes={host.nnodes}; allowed: multiples of {host.nnodes}"))
    per_node = p.world_size // host.nnodes
    if r.device == "cuda" and (gpus := host.gpus()) == 0:
        out.append(Problem("run.device", "cuda but torch sees no GPU on this host; allowed here: 'cpu'"))
    elif r.device == "cuda" and p.world_size > host.nnodes * gpus:
        out.append(Problem("parallel.world_size", f"world_size={p.world_size} needs {p.world_size} GPUs but "
                                                  f"nnodes={host.nnodes} x {gpus} visible GPUs = "
                                                  f"{host.nnodes * gpus}; allowed: <= {host.nnodes * gpus}"))
    cap = max(4, host.cpu_count)
    if r.device == "cpu" and per_node > cap:
        out.append(Problem("parallel.world_size", f"{per_node} gloo ranks per node on {host.cpu_count} cores: "
                                                  "ranks beyond max(4, cpu count) only measure contention; "
                                                  f"allowed: <= {cap} per node"))
    if p.zero1 != 1:  # InternEvo's optimizer-state sharding: planned (bench/plan), not run here
        out.append(Problem("parallel.zero1", f"{p.zero1}: the trainers keep AdamW whole on every rank, so a "
                                             "run needs 1; `run_bench.py plan` models any zero1 (docs/plan.md)"))
    if r.reuse_workers and host.nnodes > 1:
        out.append(Problem("run.reuse_workers", f"true on nnodes={host.nnodes}: a reused worker job runs on one "
                                                "node; allowed here: false"))
    if cell.nvml.enabled is True and (why := host.nvml_problem()):
        out.append(Problem("nvml.enabled", f"true but NVML cannot start here ({why}); "
                                           "allowed here: 'auto' or false"))
    return out


def collectives_problems(cell: CellConfig) -> list[Problem]:
    """The rank grid must divide (the groups are ISP's) and the measured group must send something."""
    p, c = cell.parallel, cell.collectives
    out = []
    for name, size in (("sp", p.sp), ("wp", p.wp)):
        if p.world_size % size:
            out.append(Problem(f"parallel.{name}", f"{name}={size} does not divide world_size={p.world_size}; "
                                                   f"allowed: divisors of world_size ({_divisors(p.world_size)})"))
    if not out and group_size(cell) < 2:
        key = GROUP_KEY[c.group]
        out.append(Problem("collectives.group", f"the {c.group} group has {key}={group_size(cell)} rank: nothing "
                                                "is sent; allowed: a group of >= 2 ranks (raise "
                                                f"parallel.{key}, or group: world with world_size >= 2)"))
    if c.min_bytes > c.max_bytes:
        out.append(Problem("collectives.min_bytes", f"min_bytes={c.min_bytes} > max_bytes={c.max_bytes}; "
                                                    f"allowed: <= {c.max_bytes}"))
    return out
