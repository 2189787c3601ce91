"""bench.metrics.formulas: nccl-tests bandwidths, model FLOPs, MFU, peak table, comm accounting."""

from __future__ import annotations

import pytest
import torch

from bench.metrics.formulas import (
    achieved_tflops,
    add_call,
    algbw,
    bus_factor,
    busbw,
    causal_pairs,
    causal_pairs_per_step,
    device_peak_tflops,
    diff_counts,
    lookup_peak_tflops,
    mfu,
    model_flops_per_step,
    nonembedding_params,
)


def test_all_reduce_1gb_8_ranks_10ms():
    # nccl-tests PERFORMANCE.md: algbw = S / t; all_reduce busbw = algbw * 2 (n - 1) / n.
    assert algbw(1e9, 0.010) == pytest.approx(100.0)
    assert busbw("all_reduce", 1e9, 0.010, 8) == pytest.approx(175.0)


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "all_to_all"])
def test_ring_factor_kinds(kind):
    # 4 ranks moving 8e9 bytes (full output / full input / send buffer) in 0.1 s:
    # algbw 80 GB/s, busbw 80 * 3 / 4 = 60 GB/s.
    assert algbw(8e9, 0.1) == pytest.approx(80.0)
    assert busbw(kind, 8e9, 0.1, 4) == pytest.approx(60.0)


def test_bus_factor_edges():
    assert bus_factor("all_gather", 1) == 0.0  # one rank moves nothing over links
    assert bus_factor("all_reduce", 2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bus_factor("broadcastish", 4)
    with pytest.raises(ValueError):
        algbw(1.0, 0.0)


def test_causal_pairs():
    assert causal_pairs([4]) == 10  # 1 + 2 + 3 + 4
    assert causal_pairs([2, 2]) == 6  # packed: each document attends within itself
    assert causal_pairs([]) == 0
    assert causal_pairs_per_step([[4], [2, 2]]) == 16
    with pytest.raises(ValueError):
        causal_pairs([-1])


def test_nonembedding_params_hand_counted():
    # hidden 8, heads 2 (head_dim 4), kv_heads 1, mlp 16, vocab 10, 2 layers:
    # wqkv 8 * (2 + 2) * 4 = 128, wo 64, mlp 3 * 8 * 16 = 384 -> 576 per layer;
    # 2 layers 1152 + head 80 = 1232.
    assert nonembedding_params(8, 2, 2, 1, 10, 16) == 1232
    with pytest.raises(ValueError):
        nonembedding_params(10, 1, 3, 1, 10, 16)


def test_model_flops_per_step_hand_counted():
    # One sequence of 4 tokens: pairs 10; 6 * 1232 * 4 = 29568; 12 * 2 * 8 * 10 = 1920.
    assert model_flops_per_step(8, 2, 2, 1, 10, 16, tokens=4, attn_pairs=10) == 29568 + 1920


def test_attention_term_is_half_of_noncausal():
    # For long s, 12 L h pairs ~ 6 L h s per token: half of PaLM's noncausal 12 L h s.
    hidden, layers, s = 64, 3, 4096
    dense = model_flops_per_step(hidden, layers, 4, 4, 1, 1, tokens=s, attn_pairs=0)
    total = model_flops_per_step(hidden, layers, 4, 4, 1, 1, tokens=s, attn_pairs=causal_pairs([s]))
    per_token_attn = (total - dense) / s
    assert per_token_attn == pytest.approx(6 * layers * s * hidden, rel=1e-3)


def test_llama2_7b_scale():
    # Llama-2-7B-like: 32 layers, hidden 4096, 32 heads, MHA, mlp 11008, vocab 32000:
    # N = 32 * (3*4096^2 + 4096^2 + 3*4096*11008) + 4096*32000 = 6.607e9.
    n = nonembedding_params(4096, 32, 32, 32, 32000, 11008)
    assert n == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    assert n == pytest.approx(6.607e9, rel=1e-3)


def test_achieved_tflops_and_mfu():
    # 8e15 FLOPs in 2 s over 8 ranks = 0.5e15 FLOP/s per rank = 500 TFLOP/s.
    t = achieved_tflops(8e15, 2.0, 8)
    assert t == pytest.approx(500.0)
    assert mfu(t, 1000.0) == pytest.approx(0.5)
    assert mfu(t, None) is None


@pytest.mark.parametrize(
    "name,dtype,peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H100 NVL", "bfloat16", 835.5),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.float16, 312.0),
        ("NVIDIA A800-SXM4-80GB", "fp16", 312.0),
        ("NVIDIA L40S", torch.bfloat16, 362.05),
        ("NVIDIA A10", torch.bfloat16, 125.0),
        ("Tesla V100-SXM2-32GB", torch.float16, 125.0),
        ("Tesla V100-SXM2-32GB", torch.bfloat16, None),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
        ("NVIDIA A10G", torch.bfloat16, None),  # not A10, not in the table
        ("NVIDIA GH200 480GB", torch.bfloat16, 989.4),  # missed by the H200 row's word boundary
        ("NVIDIA B200", torch.bfloat16, 2250.0),
        ("NVIDIA GB200", torch.bfloat16, 2500.0),
        ("NVIDIA H800", torch.bfloat16, 989.4),
        ("NVIDIA H800 PCIe", torch.bfloat16, 756.5),
        ("NVIDIA H20", torch.bfloat16, 148.0),
        ("AMD Instinct MI300X", torch.bfloat16, 1307.4),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5),
        ("NVIDIA RTX PRO 6000 Blackwell", torch.bfloat16, None),
        ("NVIDIA H100 80GB HBM3", torch.float32, None),
        ("cpu", torch.bfloat16, None),
        (None, torch.bfloat16, None),
    ],
)
def test_peak_lookup(name, dtype, peak):
    assert lookup_peak_tflops(name, dtype) == peak


def test_device_peak_on_cpu_is_none():
    assert device_peak_tflops("cpu", torch.bfloat16) is None


def test_peak_source_or_reason():
    from bench.metrics.formulas import peak_tflops_for

    assert peak_tflops_for("cpu", "bfloat16", 123.0) == (123.0, "run.peak_tflops")
    peak, reason = peak_tflops_for("cpu", "bfloat16", None)
    assert peak is None and "no MFU on cpu" in reason


def test_comm_counts_diff():
    counted: dict = {}
    add_call(counted, "wp", "all_gather", 100)
    add_call(counted, "wp", "all_gather", 100)
    add_call(counted, "sp", "all_to_all", 64)
    predicted = {"wp": {"all_gather": {"calls": 2, "bytes": 200}}, "sp": {"all_to_all": {"calls": 1, "bytes": 64}}}
    assert counted == predicted
    assert diff_counts(counted, predicted) == []
    predicted["wp"]["reduce_scatter"] = {"calls": 1, "bytes": 50}
    predicted["sp"]["all_to_all"]["bytes"] = 32
    assert diff_counts(counted, predicted) == [
        "group 'sp' all_to_all bytes: counted 64, predicted 32",
        "group 'wp' reduce_scatter calls: counted 0, predicted 1",
        "group 'wp' reduce_scatter bytes: counted 0, predicted 50",
    ]
    # An explicit zero entry equals an absent one.
    assert diff_counts({"dp": {"all_reduce": {"calls": 0, "bytes": 0}}}, {}) == []
