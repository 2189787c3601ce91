"""GPU calibration: measured matmul and attention rates per dtype into a hardware file, from
gpu_check.json and from a real CUDA trace's kernels."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from bench.plan.calibrate_gpu import kernel_class, kernel_seconds
from bench.plan.commands import calibrated
from bench.plan.compute import rates_for
from bench.plan.hardware import parse_hardware

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hta" / "nccl_allreduce_2ranks.json.gz"


def test_kernel_classes_on_a_real_a100_trace():
    assert kernel_class("ncclDevKernel_AllReduce_Sum_f32_RING_LL") is None  # communication
    assert kernel_class("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    with gzip.open(FIXTURE, "rt") as f:
        seconds, steps = kernel_seconds(json.load(f))
    assert steps == 1 and seconds["matmul"] > 0 and seconds["other"] > 0  # cutlass GEMMs, elementwise


def test_gpu_check_rates_fill_compute_measured_of_the_matching_shipped_file(tmp_path):
    check = {"schema": "isp-bench-gpu-check/1", "device": "NVIDIA H100 80GB HBM3", "elapsed_s": 80.0, "checks": [],
             "rates": {"matmul_tflops": {"bfloat16": 650.0}, "attention_tflops": {"bfloat16": 420.0}}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(check))
    doc = calibrated([tmp_path])
    assert doc["compute"]["measured"] == {"bfloat16": {"matmul_tflops": 650.0, "attention_tflops": 420.0}}
    assert doc["notes"]["calibrated_from"].endswith("h100-sxm-8.yaml")
    hw = parse_hardware(yaml.safe_load(yaml.safe_dump(doc)), "<calibrated>")
    rates = rates_for(hw, "bfloat16", 8)
    assert (rates.matmul_flops, rates.attention_flops) == (650e12, 420e12)
    assert "measured" in rates.source and rates_for(hw, "float32", 8).matmul_flops == pytest.approx(66.9e12 * 0.7)


def test_an_unknown_gpu_needs_a_base_file(tmp_path):
    check = {"schema": "isp-bench-gpu-check/1", "device": "NVIDIA L4", "checks": [],
             "rates": {"matmul_tflops": {"bfloat16": 90.0}, "attention_tflops": {}}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(check))
    with pytest.raises(ValueError, match="no shipped hardware file describes the recorded GPU 'NVIDIA L4'"):
        calibrated([tmp_path])
    base = Path(__file__).resolve().parents[2] / "configs" / "hardware" / "a100-sxm4-80gb-roce4x100.yaml"
    assert calibrated([tmp_path], base)["compute"]["measured"]["bfloat16"] == {"matmul_tflops": 90.0}
