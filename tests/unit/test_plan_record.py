"""metrics.plan: the hardware a run's cells are predicted on, and one cell's entry."""

from __future__ import annotations

import json

import pytest

from bench.config.cell import CellConfig
from bench.plan.record import Choice, choose, entry

CPU_HW = {"name": "cpu-test", "device": {"memory_gib": 16, "cores": 2},
          "compute": {"achieved": {"matmul_tflops": 0.05, "attention_tflops": 0.02, "elementwise_gbps": 5,
                                   "loss_gbps": 5, "optimizer_gbps": 5}},
          "links": {"gpus_per_node": 4, "intra": {"busbw_gbps": 1.0, "latency_us": 50}}}


def test_the_hardware_is_chosen_explicitly_or_by_the_recorded_gpu(tmp_path):
    assert choose(tmp_path, None).hardware is None and "--hardware" in choose(tmp_path, None).reason
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200"}))
    assert choose(tmp_path, None).hardware.name == "h200-sxm-8x-ib400"
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA L4"}))
    assert "'NVIDIA L4'" in choose(tmp_path, None).reason
    hw = tmp_path / "hw.yaml"
    hw.write_text(json.dumps(CPU_HW))
    assert choose(tmp_path, hw).hardware.name == "cpu-test"


def test_an_entry_sets_each_prediction_beside_its_measurement(tmp_path):
    hw = tmp_path / "hw.yaml"
    hw.write_text(json.dumps(CPU_HW))
    choice = choose(tmp_path, hw)
    config = CellConfig.from_dict({"parallel": {"world_size": 2, "sp": 2, "wp": 2}})
    got = entry(config, {"step_time_s": {"median": 0.5}, "peak_memory_bytes": 4e8}, choice)
    assert got["available"] and got["hardware"] == "cpu-test"
    step = got["step_time_s"]
    assert step["measured"] == 0.5 and step["rel_error"] == pytest.approx(step["predicted"] / 0.5 - 1)
    assert got["exposed_comm_s"]["measured"] is None and got["exposed_comm_s"]["rel_error"] is None
    assert entry(config, {}, Choice(None, "why"))["reason"] == "why"
    collectives = CellConfig.from_dict({"run": {"kind": "collectives"}})
    assert entry(collectives, {}, choice)["available"] is False
