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
device's free memory (`fits`); otherwise, or when it runs out of memory or fails, the record says why.

One reference per sweep and key. The reference depends only on `reference_key`: the model
(checkpointing recomputes the same values, so not its fraction), the data, dtype, device,
attention kernel, steps, seed and learning rate; layout, strategy, overlap and pool never
change it. The runner (bench/sweep/references.py) lets one cell per key compute it, keeps it in
RUN_DIR/references/<name>.json and hands it, or why there is none, to every other cell of the key
through the cell input REFERENCE_FILE.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Optional

from bench.config.cell import CellConfig

if TYPE_CHECKING:  # torch only where a reference runs: the runner imports this module too
    import torch

REL_TOL = {"float32": 1e-4, "bfloat16": 5e-3}
HEADROOM = 1.25  # the estimate below is rough: keep a quarter of it spare
REFERENCE_FILE = "loss_reference.json"  # the cell input: compute the shared reference, or here it is
REFERENCES_DIR = "references"  # RUN_DIR/references/<name>.json, one per key


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
    plus activations of one micro-batch of the whole global batch: 34 x hidden *bytes* per
    token per layer in 16-bit activations (Korthikanti et al. 2022, eq. 1 without the attention
    scores flash avoids; the figure is bytes already, so float32 doubles it and bfloat16 does
    not) and two [tokens, vocab] tensors, in elements of the dtype, for the logits and their
    gradient."""
    from bench.metrics.formulas import nonembedding_params

    m, d = config.model, config.data
    size = 2 if config.run.dtype == "bfloat16" else 4
    params = nonembedding_params(m.hidden, m.layers, m.heads, m.kv_heads, m.vocab, m.mlp_hidden) + 2 * m.vocab * m.hidden
    tokens = d.global_batch // d.micro_num * d.seq_len
    activations = 34 * m.hidden * m.layers * size // 2  # bytes per token
    return int(16 * params + tokens * (activations + 2 * m.vocab * size))


def fits(config: CellConfig, device: torch.device) -> Optional[str]:
    """None when the reference should fit `device`, else why not."""
    import torch

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
    import torch

    why = skip_reason(config) or fits(config, device)
    if why:
        return None, why
    try:
        return reference_losses(config, device), None
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return None, f"the one-process reference ran out of device memory: {_first_line(err)}"
    except Exception as err:  # noqa: BLE001 - the cell's own figures stand; the record says why
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, f"the one-process reference failed: {type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0]


def reference_key(config: CellConfig) -> Optional[dict[str, Any]]:
    """What the reference's losses depend on, or None when this cell checks no losses."""
    if config.run.kind != "training" or skip_reason(config):
        return None
    model = {k: v for k, v in asdict(config.model).items() if k != "checkpoint"}
    r = config.run
    return {"model": model, "data": asdict(config.data), "dtype": r.dtype, "device": r.device,
            "attention": r.attention, "warmup_steps": r.warmup_steps, "measure_steps": r.measure_steps,
            "lr": r.lr}


def key_name(key: dict[str, Any]) -> str:
    """A short stable name of a key: the file RUN_DIR/references/<name>.json."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def reference_config(config: CellConfig) -> CellConfig:
    """The config the shared reference trains: the cell's, without recompute (same values, less work)."""
    return replace(config, model=replace(config.model, checkpoint=0.0))


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
