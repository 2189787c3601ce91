"""A training step reads one number back from the device, not one per micro-batch: on CUDA
every read (`.item()`, aten::_local_scalar_dense) stalls the host until the GPU catches up.
AdamW's own reads of its step counters are left out: those counters live on the CPU
(torch's default, non-capturable AdamW), so reading them waits for nothing."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.strategies.peer_trainer import PeerTrainer
from isp_core.data import DataSpec, micro_batches
from isp_core.engine import ISPTrainer, build_isp_model, build_reference_model
from isp_core.model import LlamaConfig
from isp_core.topology import ParallelTopology

CFG = LlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, vocab=64, mlp_hidden=64)
SPEC = DataSpec(seq_len=16, global_batch=4, micro_num=4, vocab=64)


class CountScalarReads(TorchDispatchMode):
    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.reads, self.ignore = 0, ignore

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) not in self.ignore:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", ["isp", "reference"])
def test_one_device_read_per_step(which: str) -> None:
    if which == "isp":
        trainer = ISPTrainer(build_isp_model(CFG, ParallelTopology(1, 1, 1)))
    else:
        trainer = PeerTrainer(build_reference_model(CFG), None, None)
    trainer.train_step(micro_batches(SPEC, 0, 1, 0, 1, 0))  # AdamW creates its step counters
    counters = {id(state["step"]) for state in trainer.optimizer.state.values()}
    batches = micro_batches(SPEC, 1, 1, 0, 1, 0)
    assert len(batches) == 4 and counters
    with CountScalarReads(counters) as counter:
        loss = trainer.train_step(batches)
    assert isinstance(loss, float) and counter.reads == 1
