"""The communication one ISP training step should issue, per rank, predicted from the config.

Counted in nccl-tests' byte conventions (see comm_stats). With E the element size, T the
tokens a rank holds per micro-step (micro_bsz x seq_len / sp), W_l the full numel of
linear l, per micro-step:

weight group (wp > 1)
  all_gather      wp_unit "module": each block linear: forward 1 + backward 1 (a checkpointed
                  block's recompute gathers again only without overlap: with overlap the
                  recompute's gather is kept for the backward); wp_unit "block": one gather
                  of all the block's linears together, forward 1 + backward 1 (the recompute's
                  gather is always kept); head 2 (forward, backward); embedding 2 (forward,
                  and again in backward as InternEvo does; 1 with embedding_backward_gather
                  False); bytes = full tensor(s) x E
  reduce_scatter  each linear (or each block, with "block"), head and embedding once;
                  bytes = full gradient(s) x E
sequence group (sp > 1)
  all_to_all      per block: q, kv and the attention output in forward, their gradients
                  in backward (6), 3 more for a checkpointed block's recompute;
                  q/out T*H*D*E, kv T*2*max(Hkv, sp)*D*E; head logits forward and backward
                  T*V*E each (head "vocab_parallel" only: the "gathered" head sends nothing
                  over the sequence group)
  all_reduce      vocab-parallel loss: 3 x (sp*T) fp32 values (head "vocab_parallel" only)
and once per step: all_reduce of the weight shards over the weight-data group
(sum of shard numels x E) and of the replicated norm weights over the world.
"""

from __future__ import annotations

from collections import defaultdict

from isp_core.data import DataSpec
from isp_core.model import LlamaConfig


def _linear_shapes(cfg: LlamaConfig) -> list[int]:
    d = cfg.head_dim
    return [cfg.hidden * (cfg.heads + 2 * cfg.kv_heads) * d,  # wqkv
            cfg.heads * d * cfg.hidden,                        # wo
            cfg.hidden * cfg.mlp_hidden,                       # w1
            cfg.hidden * cfg.mlp_hidden,                       # w3
            cfg.mlp_hidden * cfg.hidden]                       # w2


def predicted_comm(cfg: LlamaConfig, spec: DataSpec, world_size: int, sp: int, wp: int, overlap: bool,
                   element_size: int, retain_out_sharded: bool = True, wp_unit: str = "module",
                   head: str = "vocab_parallel",
                   embedding_backward_gather: bool = True) -> dict[str, dict[str, dict[str, int]]]:
    """{group: {kind: {"calls": n, "bytes": b}}} for one training step on one rank."""
    if wp_unit not in ("module", "block") or head not in ("vocab_parallel", "gathered"):
        raise ValueError(f"wp_unit={wp_unit!r} (module|block), head={head!r} (vocab_parallel|gathered)")
    calls: dict[tuple[str, str], int] = defaultdict(int)
    nbytes: dict[tuple[str, str], int] = defaultdict(int)

    def add(group: str, kind: str, n: int, size: int) -> None:
        if n:
            calls[(group, kind)] += n
            nbytes[(group, kind)] += n * size

    dp, micro = world_size // sp, spec.micro_num
    tokens = spec.micro_bsz(dp) * spec.seq_len // sp
    ckpt, layers, E = cfg.ckpt_blocks, cfg.layers, element_size
    table = cfg.vocab * cfg.hidden
    linears = _linear_shapes(cfg)
    if wp > 1:
        for block in range(layers):
            if wp_unit == "block":
                add("weight", "all_gather", 2 * micro, sum(linears) * E)
                add("weight", "reduce_scatter", micro, sum(linears) * E)
                continue
            gathers = 2 + (1 if block < ckpt and not overlap else 0)
            for numel in linears:
                add("weight", "all_gather", gathers * micro, numel * E)
                add("weight", "reduce_scatter", micro, numel * E)
        add("weight", "all_gather", 2 * micro, table * E)      # head
        add("weight", "reduce_scatter", micro, table * E)
        add("weight", "all_gather", (2 if embedding_backward_gather else 1) * micro, table * E)  # embedding
        add("weight", "reduce_scatter", micro, table * E)
    if sp > 1:
        d = cfg.head_dim
        q_bytes = tokens * cfg.heads * d * E
        kv_bytes = tokens * 2 * max(cfg.kv_heads, sp) * d * E
        for block in range(layers):
            passes = 3 if block < ckpt else 2  # forward, backward, and the recompute
            add("sequence", "all_to_all", passes * micro, q_bytes)       # q (grad of q)
            add("sequence", "all_to_all", passes * micro, kv_bytes)      # kv
            add("sequence", "all_to_all", passes * micro, q_bytes)       # attention output
        if head == "gathered":
            pass  # full-vocabulary logits of this rank's own tokens: nothing to exchange
        elif retain_out_sharded:
            add("sequence", "all_to_all", 2 * micro, tokens * cfg.vocab * E)
            add("sequence", "all_reduce", 3 * micro, sp * tokens * 4)
        else:
            add("sequence", "all_gather", micro, sp * tokens * cfg.vocab * E)
    if world_size // wp > 1:
        shard_numel = (layers * sum(linears) + 2 * table) // wp
        add("weight_data", "all_reduce", 1, shard_numel * E)
    if world_size > 1:
        add("world", "all_reduce", 1, (2 * layers + 1) * cfg.hidden * E)
    out: dict[str, dict[str, dict[str, int]]] = {}
    for (group, kind), n in sorted(calls.items()):
        out.setdefault(group, {})[kind] = {"calls": n, "bytes": nbytes[(group, kind)]}
    return out
