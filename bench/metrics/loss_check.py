"""Every cell's losses against one process training on the same tokens in the same dtype.

The reference is the plain LlamaModel with the same initial weights, the same loss and the
same AdamW (in bfloat16: float32 master weights and AdamW state, as every layout trains),
trained on each step's whole global batch for the warm-up steps plus the measured ones; its
losses at the measured steps are compared, per step, with the cell's (the mean over its
data-parallel replicas): |cell - reference| <= REL_TOL[dtype] * |reference|.

Tolerances. float32: 1e-4 (sharded sums reorder float32 additions; seen < 1e-6). bfloat16:
5e-3: every matmul, all-gather and reduce-scatter rounds to bfloat16 (relative step 2^-8), the
layouts sum partial results in different orders, and AdamW carries the differences into the
weights, but the loss is a mean over many tokens, which averages the rounding out: a 2-rank
CPU cell (sp = wp = 2, 3 measured steps) was seen 2e-5 from its bfloat16 reference. Provisional
on GPUs (different kernels, bigger models): not yet measured there. Rank 0 runs the reference after all measuring, so it never
touches the timings. `run.check_loss: auto` runs it whenever it is estimated to fit the
device's free memory (`fits`); otherwise, or when it runs out of memory, the record says why.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from bench.config.cell import CellConfig

REL_TOL = {"float32": 1e-4, "bfloat16": 5e-3}
HEADROOM = 1.25  # the estimate below is rough: keep a quarter of it spare


def skip_reason(config: CellConfig) -> Optional[str]:
    """Why this cell's losses are not checked (from its config alone), or None."""
    run = config.run
    if run.check_loss is False:
        return "run.check_loss is false"
    if run.dtype not in REL_TOL:
        return f"dtype {run.dtype} trains no cell (no tolerance defined)"
    return None


def reference_bytes(config: CellConfig) -> int:
    """Rough device memory of the one-process reference: 16 bytes per parameter (weights,
    gradients, AdamW's two moments; bfloat16 adds float32 masters but halves the others),
    plus activations of one micro-batch of the whole global batch: 34 x hidden values per
    token per layer (Korthikanti et al. 2022, without the attention scores flash avoids) and
    two [tokens, vocab] tensors for the logits and their gradient."""
    from bench.metrics.formulas import nonembedding_params

    m, d = config.model, config.data
    size = 2 if config.run.dtype == "bfloat16" else 4
    params = nonembedding_params(m.hidden, m.layers, m.heads, m.kv_heads, m.vocab, m.mlp_hidden) + 2 * m.vocab * m.hidden
    tokens = d.global_batch // d.micro_num * d.seq_len
    return int(16 * params + tokens * (34 * m.hidden * m.layers + 2 * m.vocab) * size)


def fits(config: CellConfig, device: torch.device) -> Optional[str]:
    """None when the reference should fit `device`, else why not."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    need = reference_bytes(config) * HEADROOM
    if need > free:
        return (f"the one-process reference needs ~{need / 2**30:.1f} GiB (estimate) and the device has "
                f"{free / 2**30:.1f} GiB free; set run.check_loss: false to silence this")
    return None


def run_reference(config: CellConfig, device: torch.device) -> tuple[Optional[list[float]], Optional[str]]:
    """(reference losses of the measured steps, None) or (None, why there are none)."""
    why = skip_reason(config) or fits(config, device)
    if why:
        return None, why
    try:
        return reference_losses(config, device), None
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return None, f"the one-process reference ran out of device memory: {str(err).splitlines()[0]}"


def reference_losses(config: CellConfig, device: torch.device) -> list[float]:
    """The single-process losses of the measured steps (which follow the warm-up steps)."""
    from bench.strategies.common import TORCH_DTYPES, data_spec, model_config  # torch: only when a reference runs
    from bench.strategies.peer_trainer import train_reference

    run = config.run
    losses = train_reference(model_config(config), data_spec(config), run.warmup_steps + run.measure_steps,
                             seed=config.data.seed, lr=run.lr, device=device, dtype=TORCH_DTYPES[run.dtype])
    return losses[run.warmup_steps:]


def compare(losses: list[float], reference: list[float], dtype: str = "float32") -> dict[str, Any]:
    diffs = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses, reference, strict=True)]
    worst = max(diffs, default=0.0)
    tol = REL_TOL[dtype]
    return {"loss_matches_reference": worst <= tol, "loss_reference": reference, "loss_max_rel_diff": worst,
            "loss_rel_tol": tol}
