"""bfloat16 training keeps float32 master weights and AdamW state, as InternEvo does."""

from __future__ import annotations

import pytest
import torch

from isp_core.data import DataSpec, micro_batches
from isp_core.engine import ISPTrainer, build_isp_model
from isp_core.mixed_precision import MasterWeightAdamW, build_optimizer
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology

CFG = LlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, vocab=64, mlp_hidden=64)
SPEC = DataSpec(seq_len=16, global_batch=2, micro_num=1, vocab=64)


def _trainer(dtype: torch.dtype, lr: float) -> ISPTrainer:
    isp = build_isp_model(CFG, ParallelTopology(1, 1, 1), dtype=dtype)
    return ISPTrainer(isp, lr=lr, weight_decay=0.0)


def test_bf16_shards_step_through_float32_masters() -> None:
    # lr 1e-5 moves a weight of 1.0 by ~1e-5 per step, far below bfloat16's step there (2^-7):
    # stepped in bfloat16 the norm weights would never move; the float32 masters do.
    trainer = _trainer(torch.bfloat16, lr=1e-5)
    for step in range(3):
        trainer.train_step(micro_batches(SPEC, step, 1, 0, 1, 0))
    opt = trainer.optimizer
    assert isinstance(opt, MasterWeightAdamW)
    norm = trainer.isp.model.norm.weight
    master = next(m for p, m in zip(opt.params, opt.masters) if p is norm)
    assert norm.dtype == torch.bfloat16 and master.dtype == torch.float32
    assert torch.equal(norm, torch.ones_like(norm))  # bfloat16 cannot show the drift yet
    drift = (master - 1).abs()
    assert 2e-5 < drift.max().item() < 4e-5  # three Adam steps of ~lr each, kept in float32
    states = [s for s in opt.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    # The bfloat16 parameters are the masters rounded, nothing else.
    for p, m in zip(opt.params, opt.masters):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_float32_uses_plain_adamw() -> None:
    assert isinstance(_trainer(torch.float32, 1e-3).optimizer, torch.optim.AdamW)


def test_float16_is_refused() -> None:
    with pytest.raises(ValueError, match="float16 training needs dynamic loss scaling"):
        build_isp_model(CFG, ParallelTopology(1, 1, 1), dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))], 1e-3, 0.0)
