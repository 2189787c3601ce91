"""Every cell's losses against one process training on the same tokens (docs/peers.md).

The reference is the plain LlamaModel with the same initial weights, plain cross-entropy and
the same AdamW, trained on each step's whole global batch in fp32 for the warm-up steps plus
the measured ones; its losses at the measured steps are compared, per step, with the cell's
(the mean over its data-parallel replicas): |cell - reference| <= REL_TOL * |reference|.
Rank 0 computes it after all measuring, so it never touches the timings.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from bench.config.cell import CellConfig

REL_TOL = 1e-4


def skip_reason(config: CellConfig) -> Optional[str]:
    """Why this cell's losses are not checked, or None when they are."""
    run = config.run
    if run.check_loss is False:
        return "run.check_loss is false"
    if run.dtype != "float32":
        return f"dtype {run.dtype}: losses agree with an fp32 run only to the dtype's precision"
    if run.check_loss == "auto" and run.device != "cpu":
        return "run.check_loss is auto, which checks cpu cells only (a big GPU model may not fit one GPU)"
    return None


def reference_losses(config: CellConfig, device: torch.device) -> list[float]:
    """The single-process losses of the measured steps (which follow the warm-up steps)."""
    from bench.strategies.common import data_spec, model_config  # torch: only when a reference runs
    from bench.strategies.peer_trainer import train_reference

    run = config.run
    losses = train_reference(model_config(config), data_spec(config), run.warmup_steps + run.measure_steps,
                             seed=config.data.seed, lr=run.lr, device=device)
    return losses[run.warmup_steps:]


def compare(losses: list[float], reference: list[float]) -> dict[str, Any]:
    diffs = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses, reference, strict=True)]
    worst = max(diffs, default=0.0)
    return {"loss_matches_reference": worst <= REL_TOL, "loss_reference": reference, "loss_max_rel_diff": worst}
