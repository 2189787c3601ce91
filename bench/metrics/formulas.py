"""Derived metrics: collective bandwidths, model FLOPs, MFU, communication accounting.

Units: bytes, seconds; GB/s means 1e9 bytes per second and TFLOP/s 1e12 FLOP per
second (decimal, as nccl-tests and GPU datasheets use).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

# ---------------------------------------------------------------------------
# Bandwidth (nccl-tests, doc/PERFORMANCE.md)
# ---------------------------------------------------------------------------

#: busbw / algbw for a group of n ranks, from nccl-tests' PERFORMANCE.md.
BUS_FACTORS = {
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "all_reduce": lambda n: 2 * (n - 1) / n,
}


def algbw(bytes_: float, seconds: float) -> float:
    """Algorithm bandwidth in GB/s: algbw = bytes / seconds / 1e9.

    Source: nccl-tests doc/PERFORMANCE.md. `bytes_` follows its convention:
    all_gather: the full output (n x the per-rank input); reduce_scatter: the full
    input (n x the per-rank output); all_to_all: the whole per-rank send buffer;
    all_reduce: the buffer.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return bytes_ / seconds / 1e9


def bus_factor(kind: str, n: int) -> float:
    """busbw / algbw (nccl-tests doc/PERFORMANCE.md), n = size of the group used.

    all_gather, reduce_scatter, all_to_all: (n - 1) / n; all_reduce: 2 (n - 1) / n.
    The factor turns algbw into the per-link traffic of an optimal ring, so busbw
    can be compared with the hardware's link bandwidth whatever n is.
    """
    if kind not in BUS_FACTORS:
        raise ValueError(f"unknown collective {kind!r}; known: {sorted(BUS_FACTORS)}")
    if n < 1:
        raise ValueError(f"group size must be >= 1, got {n}")
    return BUS_FACTORS[kind](n)


def busbw(kind: str, bytes_: float, seconds: float, n: int) -> float:
    """Bus bandwidth in GB/s: busbw = algbw(bytes_, seconds) * bus_factor(kind, n).

    Source: nccl-tests doc/PERFORMANCE.md. Example: all_reduce of 1e9 bytes on 8
    ranks in 10 ms: algbw = 100 GB/s, busbw = 100 * 2 * 7 / 8 = 175 GB/s.
    """
    return algbw(bytes_, seconds) * bus_factor(kind, n)


# ---------------------------------------------------------------------------
# Model FLOPs
# ---------------------------------------------------------------------------


def causal_pairs(doc_lengths: Iterable[int]) -> int:
    """(query, key) pairs a causal mask lets attend: sum over documents of d (d + 1) / 2.

    Packed documents attend only within themselves, so each document of length d
    contributes d (d + 1) / 2 pairs (token i sees tokens 0..i of its document);
    one unpacked sequence of length s is the single document [s].
    """
    total = 0
    for d in doc_lengths:
        if d < 0:
            raise ValueError(f"document length must be >= 0, got {d}")
        total += d * (d + 1) // 2
    return total


def causal_pairs_per_step(doc_lengths_per_sequence: Iterable[Sequence[int]]) -> int:
    """attn_pairs of a step: sum over sequences of causal_pairs(that sequence's documents)."""
    return sum(causal_pairs(docs) for docs in doc_lengths_per_sequence)


def nonembedding_params(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, mlp_hidden: int) -> int:
    """Matmul parameters N of a llama-class model (embedding and norms excluded).

    head_dim = hidden / heads; per layer:
        attention wqkv: hidden * (heads + 2 * kv_heads) * head_dim
        attention wo:   hidden * hidden
        MLP w1, w3, w2: 3 * hidden * mlp_hidden
    plus the output head hidden * vocab: it is a matmul, so it is counted (the
    embedding is a lookup, not a matmul, so it is not). RMSNorm weights are ignored.
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    head_dim = hidden // heads
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + hidden * hidden + 3 * hidden * mlp_hidden
    return layers * per_layer + hidden * vocab


def model_flops_per_step(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    mlp_hidden: int,
    tokens: int,
    attn_pairs: int,
) -> float:
    """Model FLOPs of one training step (forward + backward), all ranks together.

        FLOPs = 6 * N * tokens + 12 * layers * hidden * attn_pairs

    Dense term: N = nonembedding_params(...) (output head included); each weight
    does one multiply-add (2 FLOPs) per token forward and two backward (input
    gradient, weight gradient), hence 6 * N per token.

    Attention term: per layer and per attended (query, key) pair the forward runs
    the score matmul Q K^T (2 * heads * head_dim = 2 * hidden FLOPs) and the value
    matmul P V (another 2 * hidden), 4 * hidden; backward costs twice the forward,
    so 4 * hidden * 3 = 12 * hidden per pair per layer. `attn_pairs` counts the
    causally attended pairs of every sequence/document in the step
    (`causal_pairs`): one full causal sequence of length s has s (s + 1) / 2 ~ s^2 / 2.
    Causal: half of the score and value matmuls are skipped, so the attention term
    is 6 * layers * seq * hidden per token (12 * layers * seq * hidden * tokens / 2 in
    all), against 12 * layers * seq * hidden per token without a mask. For packed
    documents the sum over documents of d^2 / 2 replaces seq^2 / 2.

    Not counted: recomputation under activation checkpointing (these are model
    FLOPs, not hardware FLOPs), softmax, norms, activations, the embedding lookup.
    """
    n = nonembedding_params(hidden, layers, heads, kv_heads, vocab, mlp_hidden)
    return 6.0 * n * tokens + 12.0 * layers * hidden * attn_pairs


def achieved_tflops(flops: float, seconds: float, world_size: int) -> float:
    """Achieved TFLOP/s per rank: flops / seconds / world_size / 1e12.

    `flops` is the whole step's model FLOPs over all ranks (`model_flops_per_step`
    with the step's global tokens), `seconds` the step time.
    """
    if seconds <= 0 or world_size < 1:
        raise ValueError(f"need seconds > 0 and world_size >= 1, got {seconds}, {world_size}")
    return flops / seconds / world_size / 1e12


def mfu(achieved_tflops_per_rank: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction: achieved_tflops_per_rank / peak_tflops.

    None when the peak is unknown (CPU, or a GPU not in PEAK_TFLOPS).
    """
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return achieved_tflops_per_rank / peak_tflops


#: Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s, from the vendors' datasheets
#: (NVIDIA's "with sparsity" figures halved). Rows are (pattern matched against
#: torch.cuda.get_device_name(), {dtype: peak}); the first match wins, so the more
#: specific variants come first. Word boundaries keep "A10" from matching "A100" or
#: "A10G" and "H200" from matching "GH200", which has its own row.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    # NVIDIA GB200 NVL72 datasheet: FP16/BF16 360 PFLOPS sparse over 72 GPUs -> 2500 dense per GPU.
    (r"\bGB200\b", {"bfloat16": 2500.0, "float16": 2500.0}),
    # NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS sparse per GPU -> 2250 dense.
    (r"\bB200\b", {"bfloat16": 2250.0, "float16": 2250.0}),
    # NVIDIA GH200 Grace Hopper datasheet: FP16/BF16 1979 TFLOPS sparse -> 989.4 dense (H100 SXM's).
    (r"\bGH200\b", {"bfloat16": 989.4, "float16": 989.4}),
    # NVIDIA H800 SXM5 (China H100: same tensor cores and clocks, NVLink cut): 1979 sparse -> 989.4.
    (r"\bH800\b.*\bPCIe\b", {"bfloat16": 756.5, "float16": 756.5}),
    (r"\bH800\b", {"bfloat16": 989.4, "float16": 989.4}),
    # NVIDIA HGX H20 product brief: FP16/BF16 148 TFLOPS dense (296 sparse).
    (r"\bH20\b", {"bfloat16": 148.0, "float16": 148.0}),
    # AMD Instinct MI300X datasheet: FP16/BF16 1307.4 TFLOPS dense (2614.9 with sparsity).
    (r"\bMI300X\b", {"bfloat16": 1307.4, "float16": 1307.4}),
    (r"\bH100\b.*\bNVL\b", {"bfloat16": 835.5, "float16": 835.5}),
    (r"\bH100\b.*\bPCIe\b", {"bfloat16": 756.5, "float16": 756.5}),
    (r"\bH100\b", {"bfloat16": 989.4, "float16": 989.4}),  # SXM5
    (r"\bH200\b.*\bNVL\b", {"bfloat16": 835.5, "float16": 835.5}),
    (r"\bH200\b", {"bfloat16": 989.4, "float16": 989.4}),  # SXM, same die and clocks as H100 SXM
    (r"\bA100\b", {"bfloat16": 312.0, "float16": 312.0}),
    (r"\bA800\b", {"bfloat16": 312.0, "float16": 312.0}),
    (r"\bL40S\b", {"bfloat16": 362.05, "float16": 362.05}),
    (r"\bL40\b", {"bfloat16": 181.05, "float16": 181.05}),
    (r"\bA10\b", {"bfloat16": 125.0, "float16": 125.0}),
    (r"\bV100\b.*\bPCIE\b", {"float16": 112.0}),  # Volta has no bf16
    (r"\bV100\b", {"float16": 125.0}),  # SXM2
    (r"\b4090\b(?!\s*D\b)", {"bfloat16": 165.2, "float16": 165.2}),  # fp32 accumulation; not 4090 D
]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.").lower()
    return _DTYPE_ALIASES.get(name, name)


def lookup_peak_tflops(gpu_name: str | None, dtype: torch.dtype | str) -> float | None:
    """Dense peak TFLOP/s of `gpu_name` (torch.cuda.get_device_name()) for `dtype`.

    None for CPU (gpu_name None or "cpu"), an unknown GPU, or a dtype the table
    does not list (float32 included): then report TFLOP/s only, no MFU.
    """
    if not gpu_name or gpu_name.lower() == "cpu":
        return None
    dtype_name = _dtype_name(dtype)
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return peaks.get(dtype_name)
    return None


def peak_tflops_for(device: torch.device | str, dtype: torch.dtype | str,
                    configured: float | None) -> tuple[float | None, str]:
    """(peak, where it came from) for MFU; (None, why there is none) when unknown.

    `configured` (run.peak_tflops) wins; a GPU missing from PEAK_TFLOPS gets None and never
    another GPU's peak, so its MFU is null with the reason in the record."""
    if configured is not None:
        return float(configured), "run.peak_tflops"
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"no MFU on {device.type}: peak FLOP/s are tabled for GPUs only"
    name = torch.cuda.get_device_name(device)
    peak = lookup_peak_tflops(name, dtype)
    if peak is None:
        return None, (f"{name!r} in {_dtype_name(dtype)} is not in the peak table "
                      f"(bench/metrics/formulas.py PEAK_TFLOPS); set run.peak_tflops")
    return peak, f"table: {name}"


def device_peak_tflops(device: torch.device | str, dtype: torch.dtype | str) -> float | None:
    """`lookup_peak_tflops` for a torch device; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return lookup_peak_tflops(torch.cuda.get_device_name(device), dtype)


# ---------------------------------------------------------------------------
# Communication accounting
# ---------------------------------------------------------------------------

#: group name -> collective kind -> {"calls": int, "bytes": int}
CommCounts = dict[str, dict[str, dict[str, int]]]


def add_call(counts: CommCounts, group: str, kind: str, bytes_: int) -> None:
    """Count one call of `kind` on `group` moving `bytes_` (nccl-tests' byte convention)."""
    entry = counts.setdefault(group, {}).setdefault(kind, {"calls": 0, "bytes": 0})
    entry["calls"] += 1
    entry["bytes"] += int(bytes_)


def diff_counts(counted: CommCounts, predicted: CommCounts) -> list[str]:
    """Mismatches between counted and predicted communication, one line each.

    A (group, kind) missing on one side counts as 0 calls and 0 bytes there, so
    an empty list means every group and kind agrees on both calls and bytes.
    """
    problems: list[str] = []
    for group in sorted(set(counted) | set(predicted)):
        c_kinds, p_kinds = counted.get(group, {}), predicted.get(group, {})
        for kind in sorted(set(c_kinds) | set(p_kinds)):
            for field in ("calls", "bytes"):
                c = c_kinds.get(kind, {}).get(field, 0)
                p = p_kinds.get(kind, {}).get(field, 0)
                if c != p:
                    problems.append(f"group {group!r} {kind} {field}: counted {c}, predicted {p}")
    return problems
