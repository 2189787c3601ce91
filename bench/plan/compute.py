"""Seconds of each piece of compute, from achieved rates (calibrated) or peak x efficiency.

Work is counted per rank and per piece, in four currencies:
  matmul     2 x tokens x in x out FLOPs per linear forward (x2 backward, x1 recompute)
  attention  4 x causal pairs x head_dim x local heads FLOPs forward (x2 backward), the
             same count as bench's model FLOPs (metrics.model_flops_per_step)
  elementwise bytes a block's norms, rotary, residuals and SwiGLU read and write:
             ELEMENTWISE_H x hidden + ELEMENTWISE_M x mlp_hidden + ELEMENTWISE_QKV x
             (heads + 2 kv_heads) x head_dim elements per token forward (x2 backward)
  loss       bytes of the cross-entropy over the logits: LOSS_FWD (LOSS_BWD) fp32 passes
             over tokens x vocab elements
  optimizer  bytes AdamW reads and writes: OPTIMIZER_PASSES x the rank's parameter elements
The pass counts are rough; a calibrated rate absorbs their error in one constant per currency.

On a CPU with C `cores` shared by the r ranks of one node, each rank runs t = max(1, C // r)
threads (bench/launch.py). Its speed is t^a (a = `thread_scaling`: 1 when threads add linearly,
0 when a second thread buys nothing, as small matmuls on a loaded host show) times its share of
the cores when the node is oversubscribed, min(1, C / (r t)); the calibrated rates were
measured at t = C on one rank, so they are scaled by that speed over C^a. The host time per
collective call (Hardware.call_overhead_s, stored for a rank at full speed) is divided by it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.plan.hardware import Hardware

ELEMENTWISE_H, ELEMENTWISE_M, ELEMENTWISE_QKV = 12, 5, 4
LOSS_FWD, LOSS_BWD = 4, 3
OPTIMIZER_PASSES = 8
PHASE_FACTOR = {"forward": 1.0, "recompute": 1.0, "backward": 2.0}


@dataclass(frozen=True)
class Rates:
    matmul_flops: float     # per second
    attention_flops: float
    elementwise_bytes: float
    loss_bytes: float
    optimizer_bytes: float
    source: str
    share: float = 1.0      # this rank's speed relative to the calibration (1 for datasheet rates)


def rates_for(hw: Hardware, dtype: str, ranks_per_node: int) -> Rates:
    """A rank's rates on `hw` for `dtype`, `ranks_per_node` ranks sharing one node: a CPU
    calibration's achieved rates, else per class the measured rate for the dtype (compute.measured)
    or peak x efficiency; memory-bound pieces at memory_gbps x memory_efficiency."""
    if hw.achieved is not None:
        a = hw.achieved
        share = 1.0
        if hw.cores:  # calibrated with every core on one rank
            threads = max(1, hw.cores // ranks_per_node)
            speed = threads ** hw.thread_scaling * min(1.0, hw.cores / (ranks_per_node * threads))
            share = speed / hw.cores ** hw.thread_scaling
        return Rates(a["matmul_tflops"] * 1e12 * share, a["attention_tflops"] * 1e12 * share,
                     a["elementwise_gbps"] * 1e9 * share, a["loss_gbps"] * 1e9 * share,
                     a["optimizer_gbps"] * 1e9 * share, f"{hw.name}: calibrated rates x core share {share:.2f}",
                     share)
    peak, measured = hw.peak(dtype), hw.measured.get(dtype, {})
    if peak is None and len(measured) < 2:
        raise ValueError(f"{hw.source}: compute.peak_tflops has no {dtype} (and compute.measured has not both "
                         f"rates for it); allowed here: {', '.join(hw.peak_tflops) or 'none'}")
    mem = (hw.memory_gbps or 0.0) * hw.memory_efficiency * 1e9
    rate = {k: measured.get(f"{k}_tflops", (peak or 0.0) * hw.efficiency.get(k, 0.0)) * 1e12
            for k in ("matmul", "attention")}
    how = "; ".join(f"{k} {'measured' if f'{k}_tflops' in measured else f'peak {peak:g} x {hw.efficiency[k]:g}'}"
                    f" = {rate[k] / 1e12:.0f} TFLOP/s" for k in ("matmul", "attention"))
    return Rates(rate["matmul"], rate["attention"], mem, mem, mem, f"{hw.name}: {how}")


@dataclass(frozen=True)
class Work:
    """One rank's work per micro-step, split so the schedule can place each piece."""

    tokens: int              # per rank per micro-step (after the sequence split)
    element_size: int
    hidden: int
    mlp_hidden: int
    qkv_width: int
    vocab: int
    attention_flops_fwd: float  # one block, this rank

    def linear_s(self, numel_full: int, phase: str, r: Rates) -> float:
        return 2.0 * self.tokens * numel_full * PHASE_FACTOR[phase] / r.matmul_flops

    def attention_s(self, phase: str, r: Rates) -> float:
        return self.attention_flops_fwd * PHASE_FACTOR[phase] / r.attention_flops

    def elementwise_s(self, phase: str, r: Rates, share: float = 1.0) -> float:
        per_token = ELEMENTWISE_H * self.hidden + ELEMENTWISE_M * self.mlp_hidden + ELEMENTWISE_QKV * self.qkv_width
        return share * self.tokens * per_token * self.element_size * PHASE_FACTOR[phase] / r.elementwise_bytes

    def loss_s(self, phase: str, r: Rates) -> float:
        passes = LOSS_FWD if phase == "forward" else LOSS_BWD
        return passes * self.tokens * self.vocab * 4 / r.loss_bytes

    @staticmethod
    def optimizer_s(param_elements: int, element_size: int, r: Rates) -> float:
        return OPTIMIZER_PASSES * param_elements * element_size / r.optimizer_bytes
