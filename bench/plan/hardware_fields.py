"""The checks behind hardware files (bench/plan/hardware.py): each field's reader collects its
problems, every one naming the file, the key and what is allowed, so a file with several mistakes
is reported in one go (exit 2 in the CLI)."""

from __future__ import annotations

import math
from typing import Any

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce")
DTYPES = ("float32", "bfloat16", "float16")
ACHIEVED_KEYS = ("matmul_tflops", "attention_tflops", "elementwise_gbps", "loss_gbps", "optimizer_gbps")
MEASURED_KEYS = ("matmul_tflops", "attention_tflops")
ALGORITHMS = ("auto", "ring", "tree")
_MAY_BE_ZERO = ("reserved_gib", "margin", "latency_us", "thread_scaling", "call_overhead_us", "allocator_reserve",
                "base_latency_us")


class Problems:
    def __init__(self, path: str) -> None:
        self.path, self.lines = path, []

    def add(self, key: str, text: str) -> None:
        self.lines.append(f"{self.path}: {key}: {text}")


def number(doc: dict, key: str, where: str, out: Problems, required: bool = True, lo: float = 0.0,
           hi: float | None = None) -> float | None:
    value = doc.get(key) if isinstance(doc, dict) else None
    if value is None:
        if required:
            out.add(f"{where}.{key}", "missing; allowed: a number" + (f" > {lo:g}" if lo == 0 else f" >= {lo:g}"))
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < lo or (lo == 0 and value == 0 and key not in _MAY_BE_ZERO) \
            or (hi is not None and value > hi):
        bound = f">= {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        out.add(f"{where}.{key}", f"got {value!r}; allowed: a number {bound}")
        return None
    return float(value)


def integer(doc: dict, key: str, where: str, out: Problems, default: int | None) -> int | None:
    value = doc.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        out.add(f"{where}.{key}", f"got {value!r}; allowed: an int >= 1")
        return default
    return value


def section(doc: dict, name: str, out: Problems, allowed: tuple[str, ...]) -> dict:
    value = doc.get(name)
    if not isinstance(value, dict):
        out.add(name, f"missing or not a mapping; allowed keys: {', '.join(allowed)}")
        return {}
    for key in value:
        if key not in allowed:
            out.add(f"{name}.{key}", f"unknown key; allowed keys: {', '.join(allowed)}")
    return value


def strings(raw: Any, key: str, out: Problems) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(s, str) and s for s in raw):
        out.add(key, "allowed: a list of non-empty strings")
        return ()
    return tuple(raw)


def choice(doc: dict, key: str, where: str, allowed: tuple, default: Any, out: Problems) -> Any:
    value = doc.get(key, default)
    if value not in allowed:
        out.add(f"{where}.{key}", f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")
        return default
    return value


def link(doc: dict, name: str, out: Problems) -> tuple[float, float] | None:
    raw = doc.get(name)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        out.add(f"links.{name}", "not a mapping; allowed keys: busbw_gbps, latency_us")
        return None
    bw = number(raw, "busbw_gbps", f"links.{name}", out)
    lat = number(raw, "latency_us", f"links.{name}", out)
    return (bw, lat) if bw is not None and lat is not None else None


def curves(raw: Any, out: Problems) -> list[tuple[str, int, tuple[float, ...], tuple[float, ...], int]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        out.add("links.curves", "not a list; allowed: [{op, group_size, sizes, times_s}, ...]")
        return []
    found = []
    for i, c in enumerate(raw):
        where = f"links.curves[{i}]"
        ok = (isinstance(c, dict) and c.get("op") in KINDS and isinstance(c.get("group_size"), int)
              and isinstance(c.get("sizes"), list) and isinstance(c.get("times_s"), list)
              and len(c["sizes"]) == len(c["times_s"]) > 0
              and isinstance(c.get("nodes", 1), int) and c.get("nodes", 1) >= 1)
        if not ok:
            out.add(where, f"needs op (one of {', '.join(KINDS)}), group_size (int), and equally long "
                           "non-empty lists sizes and times_s; nodes, if given, an int >= 1")
            continue
        pairs = sorted(zip(c["sizes"], c["times_s"]))
        if any(not (s > 0 and t > 0) for s, t in pairs):
            out.add(where, "sizes and times_s must be positive numbers")
            continue
        found.append((c["op"], c["group_size"], tuple(float(s) for s, _ in pairs), tuple(float(t) for _, t in pairs),
                      c.get("nodes", 1)))
    return found


def runs_as(raw: Any, out: Problems) -> dict[str, str]:
    """links.runs_as {op: op}: an op the backend runs as another moves that one's traffic."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or any(k not in KINDS or v not in KINDS for k, v in raw.items()):
        out.add("links.runs_as", f"allowed: a mapping op -> op, each one of {', '.join(KINDS)}")
        return {}
    return dict(raw)


def busy(raw: Any, out: Problems) -> dict[int, float]:
    if raw is None:
        return {}
    ok = isinstance(raw, dict) and all(isinstance(k, int) and k >= 1 and isinstance(v, (int, float))
                                       and not isinstance(v, bool) and v >= 0 for k, v in raw.items())
    if not ok:
        out.add("links.busy_latency_us", "allowed: a mapping {ranks per node (int >= 1): microseconds >= 0}")
        return {}
    return {k: float(v) * 1e-6 for k, v in raw.items()}


def achieved(comp: dict, out: Problems) -> dict[str, float] | None:
    raw = comp.get("achieved")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        out.add("compute.achieved", f"not a mapping; allowed keys: {', '.join(ACHIEVED_KEYS)}")
        return None
    for key in raw:
        if key not in ACHIEVED_KEYS:
            out.add(f"compute.achieved.{key}", f"unknown key; allowed keys: {', '.join(ACHIEVED_KEYS)}")
    values = {k: number(raw, k, "compute.achieved", out) for k in ACHIEVED_KEYS}
    return {k: v for k, v in values.items() if v is not None}


def measured(comp: dict, out: Problems) -> dict[str, dict[str, float]]:
    """compute.measured {dtype: {matmul_tflops, attention_tflops}}: rates a GPU run or gpu_check
    measured (plan --calibrate writes them); either key may be missing for a dtype."""
    raw = comp.get("measured")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        out.add("compute.measured", f"not a mapping; allowed: {{dtype: {{{', '.join(MEASURED_KEYS)}}}}}")
        return {}
    found: dict[str, dict[str, float]] = {}
    for dtype, rates in raw.items():
        where = f"compute.measured.{dtype}"
        if dtype not in DTYPES:
            out.add(where, f"unknown dtype; allowed: {', '.join(DTYPES)}")
            continue
        if not isinstance(rates, dict) or not rates or any(k not in MEASURED_KEYS for k in rates):
            out.add(where, f"allowed: a mapping with {' and/or '.join(MEASURED_KEYS)}")
            continue
        found[dtype] = {k: v for k in rates if (v := number(rates, k, where, out)) is not None}
    return found


def datasheet(comp: dict, out: Problems, required: bool) -> tuple[dict, dict, float | None, float]:
    peak_raw, eff_raw = comp.get("peak_tflops"), comp.get("efficiency")
    if not required and peak_raw is None:
        return {}, {}, None, 1.0
    peak: dict[str, float] = {}
    if not isinstance(peak_raw, dict) or not peak_raw:
        out.add("compute.peak_tflops", "missing; allowed: a mapping dtype -> TFLOP/s, e.g. {bfloat16: 989.4}")
    else:
        for dtype in peak_raw:
            if dtype not in DTYPES:
                out.add(f"compute.peak_tflops.{dtype}", f"unknown dtype; allowed: {', '.join(DTYPES)}")
            elif (v := number(peak_raw, dtype, "compute.peak_tflops", out)) is not None:
                peak[dtype] = v
    eff: dict[str, float] = {}
    if not isinstance(eff_raw, dict):
        out.add("compute.efficiency", "missing; allowed: {matmul: fraction, attention: fraction}")
    else:
        for key in ("matmul", "attention"):
            if (v := number(eff_raw, key, "compute.efficiency", out, hi=1.0)) is not None:
                eff[key] = v
    mem = number(comp, "memory_gbps", "compute", out)
    mem_eff = number(comp, "memory_efficiency", "compute", out, required=False, hi=1.0) or 1.0
    return peak, eff, mem, mem_eff
