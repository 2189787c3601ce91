"""profile.nvtx (bench/worker/nvtx.py): the ranges a real training step gets, and inactive on CPU.

CPU torch has no NVTX library, so the ranges go to a recorder here; the model, autograd (with
reentrant recompute), the bfloat16 optimizer and the hooks are the real ones. On CUDA the same
calls go to torch.cuda.nvtx, and record_function labels are mirrored too (not testable here)."""

from __future__ import annotations

from typing import Any

import torch

from bench.strategies.peer_trainer import PeerTrainer, build_reference_model
from bench.worker.nvtx import NvtxRanges, nvtx_status, nvtx_step
from isp_core.data import DataSpec, micro_batches
from isp_core.model import LlamaConfig


class Recorder:
    """Every range call in order; start/end ranges by id."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.threads: set[int] = set()

    def range_push(self, msg: str) -> None:
        self.events.append(("push", msg))

    def range_pop(self) -> None:
        self.events.append(("pop", None))

    def range_start(self, msg: str) -> int:
        self.events.append(("start", msg))
        return len(self.events)

    def range_end(self, range_id: int) -> None:
        self.events.append(("end", self.events[range_id - 1][1]))


def test_ranges_of_real_steps_with_recompute_and_bf16_masters() -> None:
    cfg = LlamaConfig(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, mlp_hidden=64, checkpoint=1.0)
    spec = DataSpec(seq_len=16, global_batch=2, micro_num=2, packed=True, seed=0, vocab=64)
    trainer = PeerTrainer(build_reference_model(cfg, 0, torch.bfloat16, torch.device("cpu")), None, None)
    step_method = trainer.optimizer.step
    sink = Recorder()
    with NvtxRanges(True, torch.device("cpu"), trainer.optimizer, sink=sink):
        for step in range(2):
            with nvtx_step(step):
                trainer.train_step(micro_batches(spec, step, dp=1, dp_rank=0, sp=1, sp_rank=0))
    micro = [("push", "forward"), ("pop", None), ("start", "backward"), ("end", "backward")]
    one_step = micro * 2 + [("push", "optimizer"), ("pop", None)]
    assert sink.events == ([("push", "step#0"), *one_step, ("pop", None)]
                           + [("push", "step#1"), *one_step, ("pop", None)])
    # Left as found: no hook fires after the block, the optimizer's own step is back.
    trainer.train_step(micro_batches(spec, 2, dp=1, dp_rank=0, sp=1, sp_rank=0))
    assert len(sink.events) == 2 * (len(one_step) + 2) and trainer.optimizer.step == step_method
    assert "step" not in vars(trainer.optimizer)


def test_inactive_on_cpu_says_so(capsys: Any) -> None:
    assert nvtx_status(False, torch.device("cpu")) == (False, "profile.nvtx is false")
    active, why = nvtx_status(True, torch.device("cpu"))
    assert not active and why == "inactive: NVTX ranges need CUDA, this cell runs on cpu"
    ranges = NvtxRanges(True, torch.device("cpu"))
    with ranges, nvtx_step(0):
        torch.nn.Linear(2, 2)(torch.ones(1, 2)).sum().backward()  # no hook, no NVTX call (it would raise on CPU)
    assert ranges.active is False and capsys.readouterr().out == f"profile.nvtx: {why}\n"
