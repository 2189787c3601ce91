"""The operations of one training step of the peers (FSDP2, DDP, Ulysses + FSDP2).

FSDP2 (docs/peers.md, bench/strategies/peer_formula.py): one parameter group per block and the root.
  forward   the root's all-gather, then each block's; on a GPU the host runs ahead, so block
            i+1's gather is in flight during block i (FSDP2's implicit prefetch); on a CPU the
            host gathers each block when it reaches it (no overlap)
  backward  blocks last to first, each one's gather prefetched one block ahead (FSDP2's
            default backward prefetch; on a CPU that gather blocks, FSDP2 unshards with
            async_op=False); each block's gradient reduce-scattered (asynchronously
            on a GPU's stream, blocking on a CPU); the root (kept unsharded since forward)
            reduce-scatters after the embedding
DDP       plain compute; in the last micro-step's backward each gradient bucket all-reduces
          asynchronously as soon as its last gradient is ready (buckets: peer_formula.ddp_buckets)
Ulysses   FSDP2 over the world for the weights, plus the q, kv and output all-to-alls of
          every block (three more in a recompute); its head is a plain linear on local tokens.
As for ISP, the per-group totals are checked against peer_formula.predicted_peer_comm.
"""

from __future__ import annotations

import torch

from bench.plan.compute import Work
from bench.plan.isp_schedule import BACKWARD_ORDER, LINEAR_NAMES, Costs
from bench.plan.replay import Schedule
from bench.strategies.peer_formula import (
    BUCKET_CAP_BYTES,
    FIRST_BUCKET_BYTES,
    ddp_buckets,
    padded_numel,
    parameter_groups,
    predicted_peer_comm,
)
from isp_core.comm_formula import _linear_shapes
from isp_core.data import DataSpec
from isp_core.model import LlamaConfig, LlamaModel


class _PeerStep:
    def __init__(self, strategy: str, cfg: LlamaConfig, world: int, sp: int, E: int, tokens: int, costs: Costs,
                 sched: Schedule) -> None:
        self.strategy, self.cfg, self.world, self.sp, self.E, self.T = strategy, cfg, world, sp, E, tokens
        self.c, self.s = costs, sched
        self.numel = dict(zip(LINEAR_NAMES, _linear_shapes(cfg)))
        self.fsdp = strategy in ("fsdp2", "ulysses") and world > 1
        self.group_bytes = {g: sum(padded_numel(s, world) for s in shapes) * E
                            for g, shapes in parameter_groups(cfg).items()}
        self.gathers: dict[str, int] = {}
        self.scatters: list[int] = []
        self.ready: dict[str, int] = {}  # DDP: compute op after which a module's gradients exist

    def gather(self, group: str, sync: bool) -> None:
        if not self.fsdp or group in self.gathers:
            return
        nbytes = self.group_bytes[group]
        # FSDP2 unshards with async_op=False, prefetches included: its own stream makes that
        # asynchronous on a GPU; on a CPU every gather blocks where it is issued.
        self.gathers[group] = self.s.comm(f"ag.{group}", "world", "all_gather", nbytes,
                                          self.c.comm_s("all_gather", "world", nbytes), self.s.host_sync, False)
        if sync:
            self.use(group)

    def use(self, group: str) -> None:
        if self.fsdp:
            if group not in self.gathers:
                self.gather(group, False)
            self.s.wait(self.gathers.pop(group))

    def scatter(self, group: str) -> None:
        """FSDP2 reduce-scatters without async_op on its own CUDA stream: asynchronous to compute
        on a GPU, a blocking call on a CPU."""
        if self.fsdp:
            nbytes = self.group_bytes[group]
            sync = self.s.host_sync
            op = self.s.comm(f"rs.{group}", "world", "reduce_scatter", nbytes,
                             self.c.comm_s("reduce_scatter", "world", nbytes), sync, True)
            if not sync:
                self.scatters.append(op)

    def a2a(self, name: str, nbytes: float) -> None:
        if self.strategy == "ulysses" and self.sp > 1:
            self.s.comm(f"a2a.{name}", "sequence", "all_to_all", int(nbytes),
                        self.c.comm_s("all_to_all", "sequence", nbytes), True, True)

    def block(self, i: int, phase: str) -> None:
        cfg, T, E, w, r = self.cfg, self.T, self.E, self.c.work, self.c.rates
        q_bytes = T * cfg.heads * cfg.head_dim * E
        kv_bytes = T * 2 * max(cfg.kv_heads, self.sp) * cfg.head_dim * E
        if phase == "backward":
            for name in BACKWARD_ORDER:
                if name == "wqkv":
                    self.a2a(f"backward.{i}.out", q_bytes)
                    self.s.compute(f"backward.{i}.attention", w.attention_s("backward", r))
                    self.a2a(f"backward.{i}.q", q_bytes)
                    self.a2a(f"backward.{i}.kv", kv_bytes)
                self.s.compute(f"backward.{i}.{name}", w.linear_s(self.numel[name], "backward", r))
            self.ready[f"block{i}"] = self.s.compute(f"backward.{i}.elementwise", w.elementwise_s("backward", r))
            return
        self.s.compute(f"{phase}.{i}.pre", w.linear_s(self.numel["wqkv"], phase, r) + w.elementwise_s(phase, r, 0.5))
        self.a2a(f"{phase}.{i}.q", q_bytes)
        self.a2a(f"{phase}.{i}.kv", kv_bytes)
        self.s.compute(f"{phase}.{i}.attention", w.attention_s(phase, r))
        self.a2a(f"{phase}.{i}.out", q_bytes)
        mlp = sum(w.linear_s(self.numel[n], phase, r) for n in ("wo", "w1", "w3", "w2"))
        self.s.compute(f"{phase}.{i}.post", mlp + w.elementwise_s(phase, r, 0.5))

    def micro_step(self, last: bool) -> None:
        cfg, w, r, L = self.cfg, self.c.work, self.c.rates, self.cfg.layers
        ahead = not self.s.host_sync
        self.gather("root", sync=True)
        self.s.compute("forward.embedding", w.elementwise_s("forward", r, 0.05))
        for i in range(L):
            self.use(f"block{i}")
            if ahead and i + 1 < L:
                self.gather(f"block{i + 1}", sync=False)
            self.block(i, "forward")
        head_s = 2.0 * self.T * cfg.vocab * cfg.hidden / r.matmul_flops
        self.s.compute("forward.head", head_s)
        self.s.compute("forward.loss", w.loss_s("forward", r))
        self.s.compute("backward.loss", w.loss_s("backward", r))
        self.ready["head"] = self.s.compute("backward.head", 2 * head_s)
        self.gather(f"block{L - 1}", sync=False)
        for i in reversed(range(L)):
            self.use(f"block{i}")
            if i > 0:
                self.gather(f"block{i - 1}", sync=False)
            if i < cfg.ckpt_blocks:
                self.block(i, "recompute")
            self.block(i, "backward")
            self.scatter(f"block{i}")
        self.ready["embedding"] = self.s.compute("backward.embedding", w.elementwise_s("backward", r, 0.05))
        self.scatter("root")
        if last and self.strategy == "ddp" and self.world > 1:
            self._ddp_all_reduces()
        self.s.wait(*self.scatters)
        self.scatters = []
        self.s.compute("step.wait_gradients", 0.0)

    def _ddp_all_reduces(self) -> None:
        """Walk the gradients in ready order, close buckets as DDP does, launch each at its last grad."""
        model = LlamaModel(self.cfg, device=torch.device("meta"))
        sizes, size, launched = [], 0, []
        for name, param in reversed(list(model.named_parameters())):
            parts = name.split(".")
            owner = f"block{parts[1]}" if parts[0] == "layers" else ("embedding" if parts[0] == "tok_embeddings"
                                                                    else "head")
            size += param.numel() * self.E
            if size >= (FIRST_BUCKET_BYTES if not sizes else BUCKET_CAP_BYTES):
                sizes.append(size)
                launched.append(owner)
                size = 0
        if size:
            sizes.append(size)
            launched.append("embedding")
        assert sizes == ddp_buckets(self.cfg, self.E), "bucket walk disagrees with peer_formula.ddp_buckets"
        for nbytes, owner in zip(sizes, launched):
            self.scatters.append(self.s.comm(f"ar.bucket.{owner}", "world", "all_reduce", nbytes,
                                             self.c.comm_s("all_reduce", "world", nbytes), False, False,
                                             deps=(self.ready[owner],)))


def build(strategy: str, cfg: LlamaConfig, spec: DataSpec, world: int, sp: int, element_size: int, costs: Costs,
          host_sync: bool, param_elements: int) -> Schedule:
    tokens = spec.micro_bsz(world // sp) * spec.seq_len // sp
    sched = Schedule(host_sync=host_sync, call_overhead_s=costs.call_overhead_s)
    step = _PeerStep(strategy, cfg, world, sp, element_size, tokens, costs, sched)
    for micro in range(spec.micro_num):
        step.micro_step(last=micro == spec.micro_num - 1)
    sched.compute("optimizer", Work.optimizer_s(param_elements, element_size, costs.rates))
    expected = predicted_peer_comm(strategy, cfg, spec, world, sp, element_size)
    if sched.tally() != expected:
        raise AssertionError(f"{strategy} schedule disagrees with bench.strategies.peer_formula: {sched.tally()} != {expected}")
    return sched
