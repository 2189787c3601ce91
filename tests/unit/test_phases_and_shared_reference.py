"""Phase times (bench/metrics/phases.py) and the one loss reference per key (bench/sweep/references.py).

The key's promise is tested where it matters: the reference trained from the key's config is
bitwise the one every cell sharing the key would have trained for itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.config import CellConfig
from bench.config.matrix import Cell
from bench.config.schema import DataConfig, ModelConfig, ParallelConfig, RunConfig
from bench.metrics import loss_check, phases
from bench.metrics.assemble import peak_memory_bytes
from bench.metrics.formulas import nonembedding_params
from bench.sweep import references
from bench.worker import memory

TINY = CellConfig(model=ModelConfig(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, mlp_hidden=64),
                  data=DataConfig(seq_len=32, global_batch=4, micro_num=2, seed=3),
                  parallel=ParallelConfig(world_size=1, sp=1, wp=1),
                  run=RunConfig(warmup_steps=1, measure_steps=2))


def variant(config: CellConfig = TINY, **sections: dict) -> CellConfig:
    return replace(config, **{name: replace(getattr(config, name), **values) for name, values in sections.items()})


def test_phase_clock_adds_up_and_the_runner_completes_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(phases.LAUNCHED_ENV, repr(time.time() - 2.0))
    clock = phases.PhaseClock.from_env()
    for _ in range(2):
        time.sleep(0.01)
        clock.lap("warmup")
        time.sleep(0.05)
        clock.skip()  # not a worker phase: left to reduce_and_teardown
    record = clock.as_record()
    assert list(record) == list(phases.WORKER_PHASES)
    assert 2.0 <= record["launch_to_first_line"] < 3.0 and 0.02 <= record["warmup"] < 0.1 and record["build"] == 0.0
    with pytest.raises(AssertionError):
        clock.lap("lunch")
    metrics = {"phases_s": dict(record)}
    phases.complete(metrics, job_s=sum(record.values()) + 1.5)
    assert metrics["phases_s"]["reduce_and_teardown"] == pytest.approx(1.5, abs=1e-3)
    phases.complete(metrics, job_s=0.0)  # a clock that disagrees never gives a negative phase
    assert metrics["phases_s"]["reduce_and_teardown"] == 0.0
    monkeypatch.delenv(phases.LAUNCHED_ENV)
    assert phases.PhaseClock.from_env().as_record()["launch_to_first_line"] == 0.0  # run by hand: unknown


def test_breakdown_and_timed_share() -> None:
    timed = {"launch_to_first_line": 2.0, "process_group": 0.1, "build": 1.0, "warmup": 0.4, "measure": 2.0,
             "nvml_overhead": 0.0, "profile": 2.0, "loss_reference": 0.5, "reduce_and_teardown": 1.5}
    records = [{"cell": "a", "wall_s": 9.5, "runner_overhead_s": 0.5, "metrics": {"phases_s": timed}},
               {"cell": "b", "wall_s": 9.0, "runner_overhead_s": 1.0, "metrics": None}]  # a failed cell
    line = phases.breakdown(records[0])
    assert line.startswith("10.0 s: launch 2.00, groups 0.10,") and "measure 2.00 (20%)" in line
    assert line.endswith("teardown 1.50, runner 0.50")
    assert phases.breakdown(records[1]) == "10.0 s: runner 1.00"
    assert phases.timed_share(records).startswith("timed share: measured steps 2.0 s of 20.0 s in 2 cell(s) = 10%")


def test_the_key_ignores_what_does_not_change_the_reference() -> None:
    same = [variant(model={"checkpoint": 1.0}), variant(parallel={"world_size": 2, "sp": 2, "wp": 2, "overlap": False}),
            variant(parallel={"world_size": 4, "sp": 2, "wp": 4, "memory_pool": True}),
            variant(parallel={"world_size": 2, "sp": 1, "wp": 1, "strategy": "ddp"}),
            variant(run={"timeout_s": 9.0, "reuse_workers": True})]
    differ = [variant(data={"seed": 4}), variant(run={"lr": 2e-3}), variant(run={"dtype": "bfloat16"}),
              variant(run={"measure_steps": 3}), variant(run={"attention": "sdpa"}), variant(model={"vocab": 256})]
    key = loss_check.reference_key(TINY)
    assert all(loss_check.reference_key(c) == key for c in same)
    assert all(loss_check.reference_key(c) != key for c in differ)
    assert len({loss_check.key_name(loss_check.reference_key(c)) for c in differ}) == len(differ)
    assert loss_check.reference_key(variant(run={"check_loss": False})) is None
    ring = variant(parallel={"world_size": 2, "sp": 2, "wp": 2})
    assert loss_check.reference_key(variant(ring, run={"kind": "collectives"})) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_reference_equals_every_cells_own(dtype: str) -> None:
    base = variant(run={"dtype": dtype})
    cells = [variant(base, model={"checkpoint": 1.0}), variant(base, model={"checkpoint": 0.5}),
             variant(base, parallel={"world_size": 2, "sp": 2, "wp": 2, "overlap": False}),
             variant(base, parallel={"world_size": 2, "sp": 1, "wp": 1, "strategy": "fsdp2"})]
    shared = loss_check.reference_losses(loss_check.reference_config(cells[0]), torch.device("cpu"))
    assert len(shared) == 2 and len(set(shared)) == 2
    for config in cells:  # what each cell computed for itself before references were shared
        assert loss_check.reference_losses(config, torch.device("cpu")) == shared


def test_hosts_first_moves_the_smallest_cell_of_each_key_ahead() -> None:
    cells = [Cell("a-ws2", {}, variant(parallel={"world_size": 2, "sp": 2, "wp": 2})),
             Cell("other-ws2", {}, variant(data={"seed": 9}, parallel={"world_size": 2, "sp": 2, "wp": 2})),
             Cell("a-ws1", {}, TINY),
             Cell("other-ws1", {}, variant(data={"seed": 9})),
             Cell("a-ws1-again", {}, variant(model={"checkpoint": 1.0}))]
    assert [c.id for c in references.hosts_first(cells)] == ["a-ws1", "a-ws2", "other-ws1", "other-ws2",
                                                             "a-ws1-again"]
    assert references.hosts_first(cells[2:]) == cells[2:]  # hosts already first: the order stays


def test_one_reference_per_key_kept_with_its_reason(tmp_path: Path) -> None:
    first, second = Cell("c1", {}, TINY), Cell("c2", {}, variant(model={"checkpoint": 1.0}))
    told = references.instruction(tmp_path, first)
    assert told["compute"] and told["cell"] == "c1" and told["file"].startswith("references/")
    references.keep(tmp_path, told, {"loss": [1.0]})  # the cell stopped before its reference: nothing kept
    assert references.instruction(tmp_path, second)["compute"]
    references.keep(tmp_path, told, {"loss_reference": [7.5, 7.4]})
    reuse = references.instruction(tmp_path, second)
    assert not reuse["compute"] and reuse["losses"] == [7.5, 7.4] and reuse["cell"] == "c1"
    kept = json.loads((tmp_path / told["file"]).read_text())
    assert kept["key"] == loss_check.reference_key(TINY) and kept["name"] == told["name"]
    references.keep(tmp_path, reuse, {"loss_reference": [0.0, 0.0]})  # a reuser never overwrites it
    assert json.loads((tmp_path / told["file"]).read_text())["losses"] == [7.5, 7.4]
    why = "the one-process reference needs ~90.0 GiB (estimate) and the device has 70.0 GiB free"
    big = variant(data={"seed": 5})
    references.keep(tmp_path, references.instruction(tmp_path, Cell("b1", {}, big)), {"loss_check_skipped": why})
    shared_why = references.instruction(tmp_path, Cell("b2", {}, big))
    assert not shared_why["compute"] and shared_why["losses"] is None and shared_why["reason"] == why
    references.write_input(tmp_path, shared_why)
    assert json.loads((tmp_path / loss_check.REFERENCE_FILE).read_text())["reason"] == why
    references.write_input(tmp_path, None)
    assert not (tmp_path / loss_check.REFERENCE_FILE).exists()


def test_reference_bytes_count_the_activation_bytes_once() -> None:
    """Korthikanti et al.'s 34 x hidden per token and layer is bytes of 16-bit activations."""
    m, d = TINY.model, TINY.data
    params = nonembedding_params(m.hidden, m.layers, m.heads, m.kv_heads, m.vocab, m.mlp_hidden) + 2 * m.vocab * m.hidden
    tokens = d.global_batch // d.micro_num * d.seq_len
    bf16 = loss_check.reference_bytes(variant(run={"dtype": "bfloat16"}))
    fp32 = loss_check.reference_bytes(TINY)
    assert bf16 - 16 * params == tokens * (34 * m.hidden * m.layers + 2 * m.vocab * 2)
    assert fp32 - 16 * params == tokens * (2 * 34 * m.hidden * m.layers + 2 * m.vocab * 4)


def test_a_reused_worker_reports_no_cpu_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(memory.peak_memory("cpu")["peak_rss_bytes"], int)
    monkeypatch.setattr(memory, "_ran_a_cell", [False])
    memory.note_cell_done()
    reused = memory.peak_memory("cpu")
    assert reused["peak_rss_bytes"] is None and "earlier cell" in reused["peak_rss_unavailable"]
    assert peak_memory_bytes([{"peak_rss_bytes": 5}, reused], "peak_rss_bytes") is None
    assert peak_memory_bytes([{"peak_rss_bytes": 5}, {"peak_rss_bytes": 7}], "peak_rss_bytes") == 7
