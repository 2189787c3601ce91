"""The communication one training step of a peer strategy should issue, per rank, from the config.

Bytes follow nccl-tests' conventions (see comm_stats). E is the element size, n the world
size, m = micro_num, T the tokens a rank holds per micro-step (micro_bsz x seq_len / sp).

FSDP2 (strategy fsdp2, and the weights of ulysses), group "world". One parameter group per
block and one for the root (embedding, final norm, head). Every parameter's shard is padded
so that dim 0 is a multiple of n, padded(p) = ceil(p.shape[0] / n) * n * prod(p.shape[1:]);
a group's all-gather output and reduce-scatter input are both sum(padded(p)) x E.
  all_gather      each block 2 per micro-step: forward, and again in backward because
                  fully_shard reshards non-root modules after forward; the root 1 per
                  micro-step: fully_shard's default keeps the root's parameters unsharded
                  from forward to backward (reshard_after_forward=None -> False for the root)
  reduce_scatter  each block and the root 1 per micro-step: FSDP2 reduce-scatters in every
                  backward, gradient accumulation included
  A recomputed (checkpointed) block gathers nothing more: its backward's gather serves the
  recompute. With n = 1 FSDP2 communicates nothing.
DDP, group "world": one all_reduce of every gradient per step (`no_sync` on the earlier
  micro-steps); bytes = all parameters x E; calls = the buckets. From its second step on, DDP
  packs gradients into buckets in the order they become ready (here the reverse of the
  registration order), closing a bucket once it reaches FIRST_BUCKET_BYTES for the first and
  BUCKET_CAP_BYTES for the others. Its first step uses one bucket; the config requires a
  warm-up step so measured steps are all alike.
Ulysses, group "sequence": per block and micro-step the all-to-alls of q (T*H*D*E), kv
  (T*2*max(Hkv, sp)*D*E) and the attention output (T*H*D*E), in forward and again for their
  gradients in backward, and a third time in a checkpointed block's recompute. The head is the
  plain linear on local tokens: no logits traffic, unlike ISP's vocab-parallel head.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from isp_core.data import DataSpec
from isp_core.model import LlamaConfig, LlamaModel

FIRST_BUCKET_BYTES = 1024 * 1024       # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_CAP_BYTES = 25 * 1024 * 1024    # DistributedDataParallel's default bucket_cap_mb=25

Counts = dict[str, dict[str, dict[str, int]]]


def parameter_groups(cfg: LlamaConfig) -> dict[str, list[tuple[int, ...]]]:
    """Parameter shapes per FSDP2 group ("block0".., "root"), each in registration order."""
    model = LlamaModel(cfg, device=torch.device("meta"))
    groups: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for name, param in model.named_parameters():
        parts = name.split(".")
        groups[f"block{parts[1]}" if parts[0] == "layers" else "root"].append(tuple(param.shape))
    return dict(groups)


def padded_numel(shape: tuple[int, ...], n: int) -> int:
    """Elements FSDP2 moves for one parameter: dim 0 padded to a multiple of n."""
    return math.ceil(shape[0] / n) * n * math.prod(shape[1:])


def ddp_buckets(cfg: LlamaConfig, element_size: int) -> list[int]:
    """Bytes of each DDP bucket after the rebuild, in gradient-ready order."""
    model = LlamaModel(cfg, device=torch.device("meta"))
    buckets, size = [], 0
    for param in reversed(list(model.parameters())):
        size += param.numel() * element_size
        if size >= (FIRST_BUCKET_BYTES if not buckets else BUCKET_CAP_BYTES):
            buckets.append(size)
            size = 0
    return buckets + ([size] if size else [])


class _Tally:
    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, group: str, kind: str, n: int, size: int) -> None:
        if n:
            self.calls[(group, kind)] += n
            self.bytes[(group, kind)] += n * size

    def counts(self) -> Counts:
        out: Counts = {}
        for (group, kind), n in sorted(self.calls.items()):
            out.setdefault(group, {})[kind] = {"calls": n, "bytes": self.bytes[(group, kind)]}
        return out


def _fsdp2(tally: _Tally, cfg: LlamaConfig, world_size: int, micro: int, E: int) -> None:
    if world_size == 1:
        return
    for group, shapes in parameter_groups(cfg).items():
        size = sum(padded_numel(s, world_size) for s in shapes) * E
        tally.add("world", "all_gather", (1 if group == "root" else 2) * micro, size)
        tally.add("world", "reduce_scatter", micro, size)


def _ulysses_all_to_alls(tally: _Tally, cfg: LlamaConfig, spec: DataSpec, world_size: int, sp: int,
                         E: int) -> None:
    if sp == 1:
        return
    micro = spec.micro_num
    tokens = spec.micro_bsz(world_size // sp) * spec.seq_len // sp
    q_bytes = tokens * cfg.heads * cfg.head_dim * E
    kv_bytes = tokens * 2 * max(cfg.kv_heads, sp) * cfg.head_dim * E
    for block in range(cfg.layers):
        passes = 3 if block < cfg.ckpt_blocks else 2
        for size in (q_bytes, kv_bytes, q_bytes):  # q, kv, attention output
            tally.add("sequence", "all_to_all", passes * micro, size)


def predicted_peer_comm(strategy: str, cfg: LlamaConfig, spec: DataSpec, world_size: int, sp: int,
                        element_size: int) -> Counts:
    """{group: {kind: {"calls": n, "bytes": b}}} for one training step of `strategy` on one rank."""
    tally = _Tally()
    if strategy == "fsdp2":
        _fsdp2(tally, cfg, world_size, spec.micro_num, element_size)
    elif strategy == "ulysses":
        _ulysses_all_to_alls(tally, cfg, spec, world_size, sp, element_size)
        _fsdp2(tally, cfg, world_size, spec.micro_num, element_size)
    elif strategy == "ddp":
        if world_size > 1:
            for size in ddp_buckets(cfg, element_size):
                tally.add("world", "all_reduce", 1, size)
    else:
        raise ValueError(f"no peer formula for strategy {strategy!r}")
    return tally.counts()
