"""Peak memory of one rank, by component, at the two moments a step peaks.

E is the element size of the cell's dtype; parameters, gradients and AdamW moments are held in
that dtype (ISPTrainer and the peers step AdamW on the parameters themselves); `master_fp32`
adds InternEvo's fp32 master copy and fp32 moments instead. T: tokens a rank holds per micro-step.

activations per block, per token (measured with saved-tensor hooks on isp_core's Block,
tests/unit/test_plan_memory.py keeps it honest):
    E x (3 hidden + 4 mlp_hidden) + 4 x (6 hidden + 1.3 heads + 2 head_dim)
  a checkpointed block keeps only its input (T x hidden x E) until its recompute.
logits and loss: the head output and its all-to-all copy (E each) and the fp32 softmax the
  loss saves, T x vocab x (2 E + 8).
The step peaks either at the end of the forward (every activation and the logits alive) or at
the end of the backward, where ISP with overlap still holds the full gradient of every block
linear: collect_reduce_scatter() reads the asynchronous reduce-scatters only after the whole
backward, and each keeps its full input alive until then (isp_core/isp_communicator.py).
`runtime` is the fixed part (CUDA context and NCCL, or on CPU the interpreter, torch and gloo):
the hardware file's reserved_gib, or a world-size-1 cell's measured peak minus its prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

from isp_core.comm_formula import _linear_shapes
from isp_core.model import LlamaConfig


def activation_bytes_per_token(cfg: LlamaConfig, E: int) -> float:
    return E * (3 * cfg.hidden + 4 * cfg.mlp_hidden) + 4 * (6 * cfg.hidden + 1.3 * cfg.heads + 2 * cfg.head_dim)


@dataclass(frozen=True)
class MemoryPlan:
    components: dict[str, float]  # at the peak moment
    peak_bytes: float
    moment: str                   # "end of forward" or "end of backward"
    moments: dict[str, dict[str, float]]  # both moments' components


def _activations(cfg: LlamaConfig, T: int, E: int) -> float:
    ckpt = cfg.ckpt_blocks
    full = activation_bytes_per_token(cfg, E) * T
    return (cfg.layers - ckpt) * full + ckpt * T * cfg.hidden * E + (full if ckpt else 0.0)


def _optimizer(shard_elements: float, E: int, master_fp32: bool) -> float:
    return shard_elements * (12 if master_fp32 else 2 * E)


def _peak(forward: dict[str, float], backward: dict[str, float]) -> MemoryPlan:
    f, b = sum(forward.values()), sum(backward.values())
    moments = {"end of forward": forward, "end of backward": backward}
    if f >= b:
        return MemoryPlan(forward, f, "end of forward", moments)
    return MemoryPlan(backward, b, "end of backward", moments)


def isp_memory(cfg: LlamaConfig, T: int, wp: int, sp: int, overlap: bool, memory_pool: bool, E: int,
               micro_num: int, runtime: float, master_fp32: bool = False) -> MemoryPlan:
    linears = _linear_shapes(cfg)
    block, table = sum(linears), cfg.vocab * cfg.hidden
    norms = (2 * cfg.layers + 1) * cfg.hidden
    shard = (cfg.layers * block + 2 * table) / wp + norms
    gathered_fwd = (2 * block if overlap else max(linears)) if wp > 1 else 0.0
    if wp > 1 and memory_pool and overlap:
        gathered_fwd = 2 * block
    head_gathered = table if wp > 1 else 0.0
    grads_shard = shard * E if micro_num > 1 else 0.0  # accumulated from the earlier micro-steps
    logits = T * cfg.vocab * (2 * E + 8)
    comm = 2 * T * cfg.vocab * E if sp > 1 else 0.0   # the logits all-to-all's send and receive
    common = {"runtime": runtime, "weight_shards": shard * E, "optimizer_state": _optimizer(shard, E, master_fp32)}
    forward = {**common, "gathered_weights": (gathered_fwd + head_gathered) * E, "gradients": grads_shard,
               "activations": _activations(cfg, T, E), "logits_loss": logits, "comm_buffers": comm}
    held_full = cfg.layers * block if (overlap and wp > 1) else max(linears)
    backward = {**common, "gathered_weights": (2 * block if (wp > 1 and memory_pool and overlap) else 0.0) * E,
                "gradients": shard * E + held_full * E + (cfg.layers * block / wp * E if overlap and wp > 1 else 0.0),
                "activations": T * cfg.hidden * E * 2, "logits_loss": 0.0, "comm_buffers": 0.0}
    return _peak(forward, backward)


def peer_memory(strategy: str, cfg: LlamaConfig, T: int, world: int, E: int, micro_num: int, runtime: float,
                total_elements: float, root_elements: float, block_elements: float, gpu: bool,
                master_fp32: bool = False) -> MemoryPlan:
    """FSDP2 / Ulysses: shards over the world, the root unsharded from forward to backward, one
    block gathered (two on a GPU, where the next is prefetched); DDP: everything whole plus its
    gradient buckets (a second copy of the gradients)."""
    sharded = strategy in ("fsdp2", "ulysses") and world > 1
    params = total_elements / world if sharded else total_elements
    logits = T * cfg.vocab * (E + 8)
    common = {"runtime": runtime, "weight_shards": params * E, "optimizer_state": _optimizer(params, E, master_fp32)}
    gathered = (root_elements + (2 if gpu else 1) * block_elements) if sharded else 0.0
    grads = params * E if micro_num > 1 else 0.0
    forward = {**common, "gathered_weights": gathered * E, "gradients": grads,
               "activations": _activations(cfg, T, E), "logits_loss": logits, "comm_buffers": 0.0}
    bucket = total_elements * E if strategy == "ddp" and world > 1 else 0.0
    backward = {**common, "gathered_weights": (root_elements + block_elements) * E if sharded else 0.0,
                "gradients": params * E + (2 * block_elements * E if sharded else 0.0),
                "activations": T * cfg.hidden * E * 2, "logits_loss": 0.0, "comm_buffers": bucket}
    return _peak(forward, backward)
