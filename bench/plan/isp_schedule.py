"""The operations of one ISP training step, in the order isp_core issues them.

Mirrors isp_core/isp_communicator.py (see its docstring) and engine.ISPTrainer, per micro-step:

forward   embedding all-gather (sync); block 0's gathers launched before block 0; per block:
          norm, wqkv, the q and kv all-to-alls (sync), attention, the output all-to-all (sync),
          then the next block's gathers are launched (at wo's pre-forward hook), wo, norm, w1,
          w3, SwiGLU, w2; each linear waits for its own gather. Head: all-gather (sync),
          matmul, logits all-to-all, the loss with its three all-reduces (vocab-parallel).
backward  loss, logits all-to-all, head all-gather, matmul, reduce-scatter (sync); blocks
          last to first: a checkpointed block is recomputed first (the last checkpointed
          block launches its own gathers, each recompute launches the previous block's at wo,
          and keeps what it gathered for its backward); each linear's backward waits for its
          weight, launches the previous linear's gather (one module ahead, only into
          non-checkpointed blocks), computes, and reduce-scatters its gradient asynchronously;
          the embedding's reduce-scatter (sync); then every outstanding reduce-scatter is waited.
step end  all-reduce of the shards' gradients over the weight-data group and of the norms over
          the world (sync), AdamW on this rank's parameters.
Without overlap every gather and reduce-scatter is synchronous inside its linear, and a
checkpointed block's recompute gathers again.

The bytes of every call come from the model's shapes; `build` checks their sum per group and
kind against isp_core.comm_formula.predicted_comm, the one source of truth, and fails on any
difference. IspKnobs carries issue 12's variants with today's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.plan.compute import Rates, Work
from bench.plan.replay import Schedule
from isp_core.comm_formula import _linear_shapes, predicted_comm
from isp_core.data import DataSpec
from isp_core.model import LlamaConfig

LINEAR_NAMES = ("wqkv", "wo", "w1", "w3", "w2")
BACKWARD_ORDER = ("w2", "w3", "w1", "wo", "wqkv")  # autograd's order through SwiGLU and attention
LAUNCH_POINTS = ("wqkv", "attn", "wo", "w1")


@dataclass(frozen=True)
class IspKnobs:
    """ISP variants, named as isp_core.engine.ISPSettings names them (issue 12's knobs), with
    today's defaults. Modelled: the defaults, every `launch_allgather_before` point and both
    `forward_overlap_per` (timing only); wp_unit="block" and the gathered head change the calls,
    and are refused (ValueError) until isp_core.comm_formula counts them."""

    wp_unit: str = "module"                 # "block": one all-gather per block's weights
    head: str = "vocab_parallel"            # "gathered": the head's weight gathered, loss on own tokens
    forward_overlap_per: str = "layer"      # "module": each linear, once at hand, prefetches the next
    launch_allgather_before: str = "wo"     # where a block launches the next block's gathers

    def check(self) -> None:
        problems = []
        if self.wp_unit != "module":
            problems.append(f"wp_unit={self.wp_unit!r} (modelled: 'module')")
        if self.head != "vocab_parallel":
            problems.append(f"head={self.head!r} (modelled: 'vocab_parallel')")
        if self.forward_overlap_per not in ("layer", "module"):
            problems.append(f"forward_overlap_per={self.forward_overlap_per!r} (allowed: 'layer', 'module')")
        if self.launch_allgather_before not in LAUNCH_POINTS:
            problems.append(f"launch_allgather_before={self.launch_allgather_before!r} "
                            f"(allowed: {', '.join(LAUNCH_POINTS)})")
        if problems:
            raise ValueError("not modelled yet: " + "; ".join(problems))


@dataclass
class Costs:
    """What an operation costs on this cell's hardware."""

    work: Work
    rates: Rates
    comm_s: Callable[[str, str, float], float]  # (kind, group, nbytes) -> seconds
    call_overhead_s: float = 0.0                 # host time per collective call


class _IspStep:
    def __init__(self, cfg: LlamaConfig, world: int, sp: int, wp: int, overlap: bool, E: int, tokens: int,
                 costs: Costs, sched: Schedule, knobs: IspKnobs) -> None:
        self.cfg, self.world, self.sp, self.wp, self.overlap, self.E = cfg, world, sp, wp, overlap, E
        self.T, self.c, self.s, self.knobs = tokens, costs, sched, knobs
        self.numel = dict(zip(LINEAR_NAMES, _linear_shapes(cfg)))
        self.ckpt = cfg.ckpt_blocks
        self.pending: dict[tuple[int, str], int] = {}   # gathers in flight
        self.held: set[tuple[int, str]] = set()
        self.scatters: list[int] = []

    # communication helpers ------------------------------------------------------------------
    def _comm(self, name: str, group: str, kind: str, nbytes: float, sync: bool, needs_compute: bool) -> int:
        return self.s.comm(name, group, kind, int(nbytes), self.c.comm_s(kind, group, nbytes), sync, needs_compute)

    def gather_sync(self, name: str, numel: int) -> None:
        if self.wp > 1:
            self._comm(f"ag.{name}", "weight", "all_gather", numel * self.E, True, False)

    def scatter(self, name: str, numel: int, sync: bool) -> None:
        if self.wp > 1:
            i = self._comm(f"rs.{name}", "weight", "reduce_scatter", numel * self.E, sync, True)
            if not sync:
                self.scatters.append(i)

    def a2a(self, name: str, nbytes: float) -> None:
        if self.sp > 1:
            self._comm(f"a2a.{name}", "sequence", "all_to_all", nbytes, True, True)

    def launch(self, block: int, name: str) -> None:
        key = (block, name)
        if self.wp == 1 or key in self.pending or key in self.held:
            return
        self.pending[key] = self._comm(f"ag.{block}.{name}", "weight", "all_gather",
                                       self.numel[name] * self.E, False, False)

    def wait(self, block: int, name: str) -> None:
        if self.wp == 1:
            return
        if not self.overlap:
            self.gather_sync(f"{block}.{name}", self.numel[name])
            return
        key = (block, name)
        if key not in self.held:
            self.launch(block, name)
            self.s.wait(self.pending.pop(key))
            self.held.add(key)

    # compute helpers ------------------------------------------------------------------------
    def linear(self, block: int, name: str, phase: str) -> None:
        self.s.compute(f"{phase}.{block}.{name}", self.c.work.linear_s(self.numel[name], phase, self.c.rates))

    def elementwise(self, block: int, phase: str, share: float, what: str) -> None:
        self.s.compute(f"{phase}.{block}.{what}", self.c.work.elementwise_s(phase, self.c.rates, share))

    # one block --------------------------------------------------------------------------------
    def block_forward(self, i: int, phase: str) -> None:
        """phase 'forward' or 'recompute' (the recompute keeps its weights for the backward)."""
        cfg, T, E = self.cfg, self.T, self.E
        q_bytes = T * cfg.heads * cfg.head_dim * E
        kv_bytes = T * 2 * max(cfg.kv_heads, self.sp) * cfg.head_dim * E
        self.elementwise(i, phase, 0.25, "norm")
        self._launch_point(i, phase, "wqkv")
        self._module_forward(i, "wqkv", phase)
        self.elementwise(i, phase, 0.25, "rotary")
        self.a2a(f"{phase}.{i}.q", q_bytes)
        self.a2a(f"{phase}.{i}.kv", kv_bytes)
        self._launch_point(i, phase, "attn")
        self.s.compute(f"{phase}.{i}.attention", self.c.work.attention_s(phase, self.c.rates))
        self.a2a(f"{phase}.{i}.out", q_bytes)
        self._launch_point(i, phase, "wo")
        self._module_forward(i, "wo", phase)
        self.elementwise(i, phase, 0.2, "ffn_norm")
        self._launch_point(i, phase, "w1")
        self._module_forward(i, "w1", phase)
        self._module_forward(i, "w3", phase)
        self.elementwise(i, phase, 0.3, "swiglu")
        self._module_forward(i, "w2", phase)

    def _launch_point(self, i: int, phase: str, here: str) -> None:
        """Forward: the next block's gathers; recompute: the previous block's (it runs backwards)."""
        per_layer = self.knobs.forward_overlap_per == "layer"
        if not self.overlap or not per_layer or here != self.knobs.launch_allgather_before:
            return
        target = i + 1 if phase == "forward" else i - 1
        if 0 <= target < self.cfg.layers:
            for name in LINEAR_NAMES:
                self.launch(target, name)

    def _module_forward(self, i: int, name: str, phase: str) -> None:
        self.wait(i, name)
        if self.overlap and self.knobs.forward_overlap_per == "module":
            self._launch_next_module(i, name, phase)
        self.linear(i, name, phase)
        if phase == "forward":
            self.held.discard((i, name))

    def _launch_next_module(self, i: int, name: str, phase: str) -> None:
        """forward_overlap_per="module": a module whose weight is at hand launches the next one;
        a recompute's last module launches the previous block (recomputes run backwards)."""
        pos = LINEAR_NAMES.index(name)
        if phase == "forward":
            target = (i, LINEAR_NAMES[pos + 1]) if pos + 1 < len(LINEAR_NAMES) else (i + 1, LINEAR_NAMES[0])
            if target[0] < self.cfg.layers:
                self.launch(*target)
        elif pos == len(LINEAR_NAMES) - 1 and i > 0:
            for other in LINEAR_NAMES:
                self.launch(i - 1, other)

    def block_backward(self, i: int) -> None:
        cfg, T, E = self.cfg, self.T, self.E
        q_bytes = T * cfg.heads * cfg.head_dim * E
        kv_bytes = T * 2 * max(cfg.kv_heads, self.sp) * cfg.head_dim * E
        for name in BACKWARD_ORDER:
            if name == "wqkv":  # attention's backward sits between wo and wqkv
                self.a2a(f"backward.{i}.out", q_bytes)
                self.s.compute(f"backward.{i}.attention", self.c.work.attention_s("backward", self.c.rates))
                self.a2a(f"backward.{i}.q", q_bytes)
                self.a2a(f"backward.{i}.kv", kv_bytes)
                self.elementwise(i, "backward", 0.5, "rotary_norm")
            self.wait(i, name)
            if self.overlap:
                prev = self._previous(i, name)
                if prev is not None and prev[0] >= self.ckpt:
                    self.launch(*prev)
            self.linear(i, name, "backward")
            if name == "w3":
                self.elementwise(i, "backward", 0.5, "swiglu_norm")
            self.scatter(f"{i}.{name}", self.numel[name], sync=not self.overlap)
            self.held.discard((i, name))

    @staticmethod
    def _previous(i: int, name: str) -> tuple[int, str] | None:
        pos = LINEAR_NAMES.index(name)
        if pos > 0:
            return i, LINEAR_NAMES[pos - 1]
        return (i - 1, LINEAR_NAMES[-1]) if i > 0 else None

    # head, embedding, micro-step, step ----------------------------------------------------------
    def head(self, phase: str) -> None:
        """The vocab-parallel head: logits all-to-all over the sequence group, loss with three
        all-reduces (isp_core/loss.py); with sp = 1 a plain cross-entropy."""
        cfg, T, E, table = self.cfg, self.T, self.E, self.cfg.vocab * self.cfg.hidden
        head_s = 2.0 * T * table * (2.0 if phase == "backward" else 1.0) / self.c.rates.matmul_flops
        if phase == "forward":
            self.gather_sync("head", table)
            self.s.compute("forward.head", head_s)
            if self.sp == 1:
                self.s.compute("forward.loss", self.c.work.loss_s("forward", self.c.rates))
                return
            self.a2a("forward.logits", T * cfg.vocab * E)
            for _ in range(3):  # max, target logit, sum of exponentials
                self.s.compute("forward.loss", self.c.work.loss_s("forward", self.c.rates) / 3)
                self._comm("ar.loss", "sequence", "all_reduce", self.sp * T * 4, True, True)
            return
        self.s.compute("backward.loss", self.c.work.loss_s("backward", self.c.rates))
        self.a2a("backward.logits", T * cfg.vocab * E)
        self.gather_sync("head.backward", table)
        self.s.compute("backward.head", head_s)
        self.scatter("head", table, sync=True)

    def micro_step(self) -> None:
        table = self.cfg.vocab * self.cfg.hidden
        self.gather_sync("embedding", table)
        self.s.compute("forward.embedding", self.c.work.elementwise_s("forward", self.c.rates, 0.05))
        if self.overlap and self.knobs.forward_overlap_per == "layer":  # "module": on demand
            for name in LINEAR_NAMES:
                self.launch(0, name)
        for i in range(self.cfg.layers):
            self.block_forward(i, "forward")
        self.head("forward")
        self.head("backward")
        for i in reversed(range(self.cfg.layers)):
            if i < self.ckpt:
                if self.overlap and i == self.ckpt - 1:
                    for name in LINEAR_NAMES:
                        self.launch(i, name)
                self.block_forward(i, "recompute")
            self.block_backward(i)
        self.s.compute("backward.embedding", self.c.work.elementwise_s("backward", self.c.rates, 0.05))
        self.scatter("embedding", table, sync=True)
        if self.scatters:
            self.s.wait(*self.scatters)
            self.scatters = []
        self.s.compute("collect_reduce_scatter", 0.0)
        assert not self.pending and not self.held, f"schedule left weights gathered: {self.pending} {self.held}"


def build(cfg: LlamaConfig, spec: DataSpec, world: int, sp: int, wp: int, overlap: bool, element_size: int,
          costs: Costs, host_sync: bool, knobs: IspKnobs = IspKnobs(), shard_elements: int = 0) -> Schedule:
    """The whole step's operations; `shard_elements`: this rank's parameters, for AdamW."""
    knobs.check()
    tokens = spec.micro_bsz(world // sp) * spec.seq_len // sp
    sched = Schedule(host_sync=host_sync, call_overhead_s=costs.call_overhead_s)
    step = _IspStep(cfg, world, sp, wp, overlap, element_size, tokens, costs, sched, knobs)
    for _ in range(spec.micro_num):
        step.micro_step()
    linears = _linear_shapes(cfg)
    table = cfg.vocab * cfg.hidden
    if world // wp > 1:
        shard = (cfg.layers * sum(linears) + 2 * table) // wp
        sched.comm("ar.grad_sync.weight_data", "weight_data", "all_reduce", shard * element_size,
                   costs.comm_s("all_reduce", "weight_data", shard * element_size), True, True)
    if world > 1:
        norms = (2 * cfg.layers + 1) * cfg.hidden * element_size
        sched.comm("ar.grad_sync.world", "world", "all_reduce", norms, costs.comm_s("all_reduce", "world", norms),
                   True, True)
    sched.compute("optimizer", Work.optimizer_s(shard_elements, element_size, costs.rates))
    expected = predicted_comm(cfg, spec, world, sp, wp, overlap, element_size)
    if sched.tally() != expected:
        raise AssertionError(f"ISP schedule disagrees with isp_core.comm_formula: {sched.tally()} != {expected}")
    return sched
