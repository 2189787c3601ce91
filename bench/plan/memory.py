"""Peak memory of one rank, by component, at the three moments a step peaks.

E is the element size of the cell's dtype, T the tokens a rank holds per micro-step, z the zero1
group (InternEvo's parallel.zero1: AdamW's states sharded over z ranks of the weight-data group).

optimizer state, per parameter element a rank holds
  bench (this suite's trainers): float32 AdamW moments (8 bytes), plus float32 master weights
      (4) when the parameters are bfloat16 (isp_core.mixed_precision); FSDP2's float32 shards
      are its masters and its sharded gradients are float32 too (bench/strategies/fsdp2.py)
  internevo (HybridZeroOptimizer): float32 masters and moments of the rank's 1/z partition
      (12 / z), the parameters and accumulated gradients in the cell's dtype, and at the step a
      float32 copy of the partition's gradients (4 / z) and the reduction's flat buckets
activations per block, per token
  bench: E (3 hidden + 4 mlp_hidden) + 4 (6 hidden + 1.3 heads + 2 head_dim), measured with
      saved-tensor hooks on isp_core's Block (tests/unit/test_plan_memory.py keeps it honest)
  internevo: E (5 hidden + qkv_width + 4 mlp_hidden) + 4 (2 + heads): fused RMSNorm (input and
      1/rms), FlashAttention (q, k, v, out, log-sum-exp), the SwiGLU's three mlp-wide tensors
      and w2's input: an assumption from the kernels' saved tensors, not measured here
  a checkpointed block keeps its input only (T hidden E) until its recompute, when one block's
  full activations come back, late in the backward (checkpoint: the first fraction of blocks)
logits and loss
  bench: the logits (E), their all-to-all copy with a vocab-parallel head over sp > 1 (E), and
      the chunked loss's float32 tensor (4), T vocab (E + 4) or (2E + 4); during the loss's
      backward the logits' gradient (T vocab E) and the head's full weight gradient join them
  internevo: FlashAttention's fused cross-entropy works in place: the head output and its
      all-to-all copy, T vocab 2E
The step peaks at the end of the forward or in the loss's backward (activations and logits
alive), at the end of the backward (ISP with overlap still holds the full gradient of every block linear until
collect_reduce_scatter(), each pending reduce-scatter keeping its input) or the optimizer step
(the float32 gradient copies). `runtime` (CUDA context and NCCL, or on CPU the interpreter,
torch and gloo) and the caching allocator's reserve (a fraction of the allocated peak) come on
top; `allocated_bytes` is what torch.cuda.max_memory_allocated would count.
"""

from __future__ import annotations

from dataclasses import dataclass

from isp_core.comm_formula import _linear_shapes
from isp_core.model import LlamaConfig

# InternEvo's hybrid_zero_optimizer.reduce_bucket_size in its configs (512 * 1024 * 1024), which it
# counts in gradient elements (hybrid_zero_optim.py:436 at c628a8c): 1 GiB buckets in bfloat16.
BUCKET_ELEMENTS = 512 << 20


def activation_bytes_per_token(cfg: LlamaConfig, E: int, framework: str = "bench") -> float:
    if framework == "internevo":
        qkv = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
        return E * (5 * cfg.hidden + qkv + 4 * cfg.mlp_hidden) + 4 * (2 + cfg.heads)
    return E * (3 * cfg.hidden + 4 * cfg.mlp_hidden) + 4 * (6 * cfg.hidden + 1.3 * cfg.heads + 2 * cfg.head_dim)


@dataclass(frozen=True)
class MemoryPlan:
    components: dict[str, float]  # at the peak moment
    peak_bytes: float             # what must fit: allocated + allocator reserve + runtime
    moment: str                   # "end of forward", "loss backward", "end of backward", "optimizer step"
    moments: dict[str, dict[str, float]]  # every moment's components
    allocated_bytes: float = 0.0  # the model's own tensors at the peak (torch's max allocated)


@dataclass(frozen=True)
class Optimizer:
    """How AdamW holds its state: `framework` bench or internevo, zero1 group z, parameters' E."""

    framework: str = "bench"
    zero1: int = 1
    master_fp32: bool = False

    def state(self, elements: float, E: int, fp32_shards: bool = False) -> float:
        if self.framework == "internevo":
            return elements * 12 / self.zero1
        masters = 0 if fp32_shards or (E == 4 and not self.master_fp32) else 4
        return elements * (8 + masters) / self.zero1

    def step_grads(self, elements: float, E: int, largest: float) -> float:
        """What the step allocates beyond the gradients: float32 copies of them (bfloat16 masters),
        and torch's AdamW's temporaries, two float32 tensors of the largest parameter (measured
        on torch 2.13's AdamW with the CPU allocator, tests/unit/test_plan_memory.py); InternEvo:
        the partition's float32 gradients and two reduction buckets."""
        if self.framework == "internevo":
            return elements * 4 / self.zero1 + 2 * min(BUCKET_ELEMENTS, elements) * E
        return (elements * 4 if E != 4 else 0.0) + 2 * 4 * largest / self.zero1


def activations(cfg: LlamaConfig, T: int, E: int, framework: str = "bench") -> float:
    """Alive at the end of the forward: every block's, a checkpointed block's input only."""
    ckpt = cfg.ckpt_blocks
    full = activation_bytes_per_token(cfg, E, framework) * T
    return (cfg.layers - ckpt) * full + ckpt * T * cfg.hidden * E


def _backward_activations(cfg: LlamaConfig, T: int, E: int, framework: str) -> float:
    """Late in the backward: the checkpointed inputs and one recomputed block (else two [T, h])."""
    ckpt = cfg.ckpt_blocks
    full = activation_bytes_per_token(cfg, E, framework) * T
    return ckpt * T * cfg.hidden * E + (full if ckpt else 2 * T * cfg.hidden * E)


def _logits(cfg: LlamaConfig, T: int, E: int, framework: str, exchanged: bool) -> float:
    """What the head and loss keep for backward: the logits (E), their all-to-all copy when the
    head is vocab-parallel over sp > 1 (E), and the chunked loss's float32 tensor (4)."""
    if framework == "internevo":
        return T * cfg.vocab * 2 * E
    return T * cfg.vocab * ((2 * E if exchanged else E) + 4)


def _loss_backward(forward: dict[str, float], T: int, vocab: int, table: float, E: int) -> dict[str, float]:
    """The loss's backward: every activation still alive, plus the logits' gradient and the head
    weight's full gradient (measured: tests/unit/test_plan_memory.py)."""
    return {**forward, "gradients": forward["gradients"] + table * E, "comm_buffers": forward["comm_buffers"]
            + T * vocab * E}


def _peak(moments: dict[str, dict[str, float]], reserve: float) -> MemoryPlan:
    def allocated(parts: dict[str, float]) -> float:
        return sum(v for k, v in parts.items() if k != "runtime")

    name = max(moments, key=lambda m: allocated(moments[m]))
    for parts in moments.values():
        parts["allocator_reserve"] = reserve * allocated(parts)
    parts = moments[name]
    return MemoryPlan(parts, sum(parts.values()), name, moments, allocated(parts) - parts["allocator_reserve"])


def isp_memory(cfg: LlamaConfig, T: int, wp: int, sp: int, overlap: bool, memory_pool: bool, E: int,
               micro_num: int, runtime: float, master_fp32: bool = False, optimizer: Optimizer | None = None,
               reserve: float = 0.0, head: str = "vocab_parallel") -> MemoryPlan:
    opt = optimizer or Optimizer(master_fp32=master_fp32)
    linears = _linear_shapes(cfg)
    block, table = sum(linears), cfg.vocab * cfg.hidden
    norms = (2 * cfg.layers + 1) * cfg.hidden
    shard = (cfg.layers * block + 2 * table) / wp + norms
    gathered_fwd = (2 * block if overlap else max(linears)) if wp > 1 else 0.0
    head_gathered = table if wp > 1 else 0.0
    grads_shard = shard * E if micro_num > 1 or opt.framework == "internevo" else 0.0
    vocab_parallel = head == "vocab_parallel"
    comm = 2 * T * cfg.vocab * E if sp > 1 and vocab_parallel and opt.framework == "bench" else 0.0
    common = {"runtime": runtime, "weight_shards": shard * E, "optimizer_state": opt.state(shard, E)}
    forward = {**common, "gathered_weights": (gathered_fwd + head_gathered) * E, "gradients": grads_shard,
               "activations": activations(cfg, T, E, opt.framework),
               "logits_loss": _logits(cfg, T, E, opt.framework, sp > 1 and vocab_parallel), "comm_buffers": comm}
    held_full = cfg.layers * block if (overlap and wp > 1) else max(linears)
    backward = {**common, "gathered_weights": (2 * block if (wp > 1 and memory_pool and overlap) else 0.0) * E,
                "gradients": shard * E + held_full * E + (cfg.layers * block / wp * E if overlap and wp > 1 else 0.0),
                "activations": _backward_activations(cfg, T, E, opt.framework), "logits_loss": 0.0,
                "comm_buffers": 0.0}
    step = {**common, "gradients": shard * E, "comm_buffers": opt.step_grads(shard, E, max(max(linears), table) / wp)}
    return _peak({"end of forward": forward, "loss backward": _loss_backward(forward, T, cfg.vocab, table, E),
                  "end of backward": backward, "optimizer step": step}, reserve)


def peer_memory(strategy: str, cfg: LlamaConfig, T: int, world: int, E: int, micro_num: int, runtime: float,
                total_elements: float, root_elements: float, block_elements: float, gpu: bool,
                master_fp32: bool = False, reserve: float = 0.0) -> MemoryPlan:
    """FSDP2 / Ulysses: float32 shards over the world (the masters; gradients sharded in float32
    too), the root unsharded from forward to backward, one block gathered in E (two on a GPU,
    where the next is prefetched); DDP: everything whole plus its gradient buckets (a second
    copy of the gradients), float32 masters when the parameters are bfloat16."""
    opt = Optimizer(master_fp32=master_fp32)
    sharded = strategy in ("fsdp2", "ulysses") and world > 1
    params = total_elements / world if sharded else total_elements
    param_E, grad_E = (4, 4) if sharded else (E, E)
    common = {"runtime": runtime, "weight_shards": params * param_E,
              "optimizer_state": opt.state(params, E, fp32_shards=sharded)}
    gathered = (root_elements + (2 if gpu else 1) * block_elements) if sharded else 0.0
    grads = params * grad_E if micro_num > 1 else 0.0
    forward = {**common, "gathered_weights": gathered * E, "gradients": grads,
               "activations": activations(cfg, T, E), "logits_loss": _logits(cfg, T, E, "bench", False),
               "comm_buffers": 0.0}
    bucket = total_elements * E if strategy == "ddp" and world > 1 else 0.0
    backward = {**common, "gathered_weights": (root_elements + block_elements) * E if sharded else 0.0,
                "gradients": params * grad_E + (2 * block_elements * E if sharded else 0.0),
                "activations": _backward_activations(cfg, T, E, "bench"), "logits_loss": 0.0, "comm_buffers": bucket}
    step = {**common, "gradients": params * grad_E,
            "comm_buffers": opt.step_grads(0 if sharded else params, 4 if sharded else E,
                                           root_elements / 2 / (world if sharded else 1))}  # the table
    loss = _loss_backward(forward, T, cfg.vocab, cfg.vocab * cfg.hidden, E)
    return _peak({"end of forward": forward, "loss backward": loss, "end of backward": backward,
                  "optimizer step": step}, reserve)
