"""The operations of one ISP training step, in the order isp_core issues them (isp_core's
isp_communicator.py and engine.ISPTrainer). A gather unit is one linear (wp_unit "module",
InternEvo) or a block's linears in one flat buffer ("block"). Per micro-step:

forward   embedding all-gather (sync); block 0's units launched before block 0; per block: norm,
          wqkv, the q and kv all-to-alls (sync), attention, the output all-to-all (sync), the next
          block's units launched at `launch_allgather_before` (wo by default), wo, norm, w1, w3,
          SwiGLU, w2; each linear waits for its unit, released after its last module. Head:
          all-gather (sync), matmul; vocab_parallel: logits all-to-all and a loss with three
          all-reduces; gathered: a local loss over the rank's own tokens.
backward  loss (and the logits all-to-all), head all-gather, matmul, reduce-scatter (sync); blocks
          last to first, a checkpointed block recomputed first (the last one launches its own
          units, a recompute the previous block's, keeping what it gathered); each module waits
          for its unit and launches the previous unit (only into non-checkpointed blocks); a
          unit's gradient is reduce-scattered asynchronously once its last gradient is in; the
          embedding gathered again (InternEvo's, unless embedding_backward_gather is off), its
          gradient reduce-scattered (sync); every outstanding reduce-scatter waited.
Without overlap nothing is prefetched and every collective blocks; with "module" a recompute
gathers again, with "block" it keeps its unit. Step end: bench/plan/grad_sync.py.
`build` checks the calls and bytes per group and kind against isp_core.comm_formula (the step end
against grad_sync's own sizes) and fails on any difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.plan.compute import Rates, Work
from bench.plan.grad_sync import GradSync, Optim
from bench.plan.replay import Schedule
from isp_core.comm_formula import _linear_shapes, predicted_comm
from isp_core.data import DataSpec
from isp_core.model import LlamaConfig

LINEAR_NAMES = ("wqkv", "wo", "w1", "w3", "w2")
BACKWARD_ORDER = ("w2", "w3", "w1", "wo", "wqkv")  # autograd's order through SwiGLU and attention
LAUNCH_POINTS = ("wqkv", "attn", "wo", "w1")


@dataclass(frozen=True)
class IspKnobs:
    """ISP variants, named as isp_core.engine.ISPSettings names them, with InternEvo's defaults."""

    wp_unit: str = "module"                 # "block": one all-gather per block's weights
    head: str = "vocab_parallel"            # "gathered": the head's weight gathered, loss on own tokens
    forward_overlap_per: str = "layer"      # "module": each unit, once at hand, prefetches the next
    launch_allgather_before: str = "wo"     # where a block launches the next block's gathers
    embedding_backward_gather: bool = True  # InternEvo gathers the embedding again in backward

    def check(self) -> None:
        allowed = {"wp_unit": ("module", "block"), "head": ("vocab_parallel", "gathered"),
                   "forward_overlap_per": ("layer", "module"), "launch_allgather_before": LAUNCH_POINTS}
        problems = [f"{k}={getattr(self, k)!r} (allowed: {', '.join(v)})" for k, v in allowed.items()
                    if getattr(self, k) not in v]
        if problems:
            raise ValueError("not an ISP variant: " + "; ".join(problems))


@dataclass
class Costs:
    """What an operation costs on this cell's hardware."""

    work: Work
    rates: Rates
    comm_s: Callable[[str, str, float], float]  # (kind, group, nbytes) -> seconds
    call_overhead_s: float = 0.0                 # host time per collective call


class _IspStep:
    def __init__(self, cfg: LlamaConfig, sp: int, wp: int, overlap: bool, E: int, tokens: int,
                 costs: Costs, sched: Schedule, knobs: IspKnobs, sync: GradSync) -> None:
        self.cfg, self.sp, self.wp, self.overlap, self.E = cfg, sp, wp, overlap, E
        self.T, self.c, self.s, self.knobs, self.sync = tokens, costs, sched, knobs, sync
        self.numel = dict(zip(LINEAR_NAMES, _linear_shapes(cfg)))
        self.block_unit = knobs.wp_unit == "block"
        self.units = ("block",) if self.block_unit else LINEAR_NAMES
        self.unit_numel = {"block": sum(self.numel.values()), **self.numel}
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
        """The gradient's reduce-scatter; then its shard is final (for InternEvo's buckets)."""
        if self.wp > 1:
            i = self._comm(f"rs.{name}", "weight", "reduce_scatter", numel * self.E, sync, True)
            if not sync:
                self.scatters.append(i)
            self.sync.ready(numel // self.wp, i)
        else:
            self.sync.ready(numel, self.s.last_compute)

    def a2a(self, name: str, nbytes: float) -> None:
        if self.sp > 1:
            self._comm(f"a2a.{name}", "sequence", "all_to_all", nbytes, True, True)

    def unit(self, name: str) -> str:
        return "block" if self.block_unit else name

    def launch(self, block: int, unit: str) -> None:
        key = (block, unit)
        if self.wp == 1 or key in self.pending or key in self.held:
            return
        self.pending[key] = self._comm(f"ag.{block}.{unit}", "weight", "all_gather",
                                       self.unit_numel[unit] * self.E, False, False)

    def wait(self, block: int, name: str) -> None:
        if self.wp == 1:
            return
        key = (block, self.unit(name))
        if not self.overlap and not self.block_unit:  # every use gathers, synchronously
            self.gather_sync(f"{block}.{name}", self.numel[name])
        elif key not in self.held:
            if self.overlap:
                self.launch(*key)
                self.s.wait(self.pending.pop(key))
            else:  # a block unit, gathered when its first module needs it
                self.gather_sync(f"{block}.block", self.unit_numel["block"])
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
        """Forward: the next block's units; recompute: the previous block's (it runs backwards)."""
        per_layer = self.knobs.forward_overlap_per == "layer"
        if not self.overlap or not per_layer or here != self.knobs.launch_allgather_before:
            return
        target = i + 1 if phase == "forward" else i - 1
        if 0 <= target < self.cfg.layers:
            for unit in self.units:
                self.launch(target, unit)

    def _module_forward(self, i: int, name: str, phase: str) -> None:
        self.wait(i, name)
        if self.overlap and self.knobs.forward_overlap_per == "module":
            self._launch_next_unit(i, self.unit(name), phase)
        self.linear(i, name, phase)
        if phase == "forward" and (not self.block_unit or name == LINEAR_NAMES[-1]):
            self.held.discard((i, self.unit(name)))

    def _launch_next_unit(self, i: int, unit: str, phase: str) -> None:
        """forward_overlap_per="module": the next unit in forward; in a recompute the next unit
        of this block, and from its last unit the first unit of the block before."""
        pos = self.units.index(unit)
        if pos + 1 < len(self.units):
            self.launch(i, self.units[pos + 1])
        elif phase == "forward" and i + 1 < self.cfg.layers:
            self.launch(i + 1, self.units[0])
        elif phase == "recompute" and i > 0:
            self.launch(i - 1, self.units[0])

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
                prev = self._previous(i, self.unit(name))
                if prev is not None and prev[0] >= self.ckpt:
                    self.launch(*prev)
            self.linear(i, name, "backward")
            if name == "w3":
                self.elementwise(i, "backward", 0.5, "swiglu_norm")
            if not self.block_unit:
                self.scatter(f"{i}.{name}", self.numel[name], sync=not self.overlap)
                self.held.discard((i, name))
        if self.block_unit:
            self.scatter(f"{i}.block", self.unit_numel["block"], sync=not self.overlap)
            self.held.discard((i, "block"))
        self.sync.ready(2 * cfg.hidden, self.s.last_compute)  # the block's two norms

    def _previous(self, i: int, unit: str) -> tuple[int, str] | None:
        pos = self.units.index(unit)
        if pos > 0:
            return i, self.units[pos - 1]
        return (i - 1, self.units[-1]) if i > 0 else None

    # head, embedding, micro-step ------------------------------------------------------------------
    def head(self, phase: str) -> None:
        """The head: vocab_parallel (logits all-to-all over the sequence group, loss with three
        all-reduces, isp_core/loss.py; a plain loss with sp = 1) or gathered (a plain loss over
        the rank's own tokens: no sequence-group traffic)."""
        cfg, T, E, table = self.cfg, self.T, self.E, self.cfg.vocab * self.cfg.hidden
        head_s = 2.0 * T * table * (2.0 if phase == "backward" else 1.0) / self.c.rates.matmul_flops
        vocab_parallel = self.sp > 1 and self.knobs.head == "vocab_parallel"
        if phase == "forward":
            self.gather_sync("head", table)
            self.s.compute("forward.head", head_s)
            if not vocab_parallel:
                self.s.compute("forward.loss", self.c.work.loss_s("forward", self.c.rates))
                return
            self.a2a("forward.logits", T * cfg.vocab * E)
            for _ in range(3):  # max, target logit, sum of exponentials
                self.s.compute("forward.loss", self.c.work.loss_s("forward", self.c.rates) / 3)
                self._comm("ar.loss", "sequence", "all_reduce", self.sp * T * 4, True, True)
            return
        self.s.compute("backward.loss", self.c.work.loss_s("backward", self.c.rates))
        if vocab_parallel:
            self.a2a("backward.logits", T * cfg.vocab * E)
        self.gather_sync("head.backward", table)
        self.s.compute("backward.head", head_s)
        self.scatter("head", table, sync=True)
        self.sync.ready(cfg.hidden, self.s.last_compute)  # the final norm

    def micro_step(self) -> None:
        table = self.cfg.vocab * self.cfg.hidden
        self.gather_sync("embedding", table)
        self.s.compute("forward.embedding", self.c.work.elementwise_s("forward", self.c.rates, 0.05))
        if self.overlap and self.knobs.forward_overlap_per == "layer":  # "module": on demand
            for unit in self.units:
                self.launch(0, unit)
        for i in range(self.cfg.layers):
            self.block_forward(i, "forward")
        self.head("forward")
        self.head("backward")
        for i in reversed(range(self.cfg.layers)):
            if i < self.ckpt:
                if self.overlap and i == self.ckpt - 1:
                    units = self.units if self.knobs.forward_overlap_per == "layer" else self.units[:1]
                    for unit in units:
                        self.launch(i, unit)
                self.block_forward(i, "recompute")
            self.block_backward(i)
        if self.knobs.embedding_backward_gather:  # InternEvo's second gather of the table
            self.gather_sync("embedding.backward", table)
        self.s.compute("backward.embedding", self.c.work.elementwise_s("backward", self.c.rates, 0.05))
        self.scatter("embedding", table, sync=True)
        if self.scatters:
            self.s.wait(*self.scatters)
            self.scatters = []
        self.s.compute("collect_reduce_scatter", 0.0)
        assert not self.pending and not self.held, f"schedule left weights gathered: {self.pending} {self.held}"


def build(cfg: LlamaConfig, spec: DataSpec, world: int, sp: int, wp: int, overlap: bool, element_size: int,
          costs: Costs, host_sync: bool, knobs: IspKnobs = IspKnobs(), optim: Optim = Optim()) -> Schedule:
    """The whole step's operations (`optim`: framework and zero1 of the step end)."""
    knobs.check()
    tokens = spec.micro_bsz(world // sp) * spec.seq_len // sp
    sched = Schedule(host_sync=host_sync, call_overhead_s=costs.call_overhead_s)
    sync = GradSync(sched, costs.comm_s, costs.rates, element_size, world // wp, optim)
    step = _IspStep(cfg, sp, wp, overlap, element_size, tokens, costs, sched, knobs, sync)
    for micro in range(spec.micro_num):
        sync.last = micro == spec.micro_num - 1
        step.micro_step()
    shard = (cfg.layers * sum(_linear_shapes(cfg)) + 2 * cfg.vocab * cfg.hidden) // wp
    sync.step_end(cfg.layers, cfg.hidden, shard, world)
    expected = predicted_comm(cfg, spec, world, sp, wp, overlap, element_size, wp_unit=knobs.wp_unit,
                              head=knobs.head, embedding_backward_gather=knobs.embedding_backward_gather)
    expected = {g: k for g, k in expected.items() if g not in ("weight_data", "world")}
    expected = dict(sorted({**expected, **sync.expected(cfg.layers, cfg.hidden, shard, world)}.items()))
    if sched.tally() != expected:
        raise AssertionError(f"ISP schedule disagrees with isp_core.comm_formula: {sched.tally()} != {expected}")
    return sched
