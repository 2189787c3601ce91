"""Hardware files: what one device holds and computes, and how fast its links move bytes.

A hardware file is YAML (configs/hardware/*.yaml, docs/plan.md) with three sections:

    device:   name, memory_gib, reserved_gib (runtime: CUDA context, NCCL, allocator slack,
              or on CPU the interpreter and torch), margin (fraction kept free), cores and
              thread_scaling (CPU only: see compute.py)
    compute:  either peak_tflops {dtype: TFLOP/s} + efficiency {matmul, attention} +
              memory_gbps + memory_efficiency (a datasheet), or achieved {matmul_tflops,
              attention_tflops, elementwise_gbps, loss_gbps, optimizer_gbps} (calibrated)
    links:    gpus_per_node, intra {busbw_gbps, latency_us}, inter {busbw_gbps, latency_us},
              optionally curves: measured [{op, group_size, sizes, times_s, nodes}] per op
              (nodes: how many nodes the measured group spanned, 1 by default: a curve is
              used only for groups that span as many), runs_as {op: op}: an op the backend
              runs as another moves what that one moves over a link (gloo's reduce_scatter
              costs an all_reduce's traffic, measured across nodes here: tests/e2e/
              test_netns_plan.py), call_overhead_us: host time before every collective call (0 by default), and
              busy_latency_us {ranks per node: us}: what a call takes beyond its isolated link
              time when that many ranks compute on the host (calibrated on CPU: gloo's threads
              wait for cores and for the slower rank)

Every problem is reported with the file, the key and what is allowed (exit 2 in the CLI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce")
ACHIEVED_KEYS = ("matmul_tflops", "attention_tflops", "elementwise_gbps", "loss_gbps", "optimizer_gbps")


class HardwareError(ValueError):
    """A hardware file that cannot be used; each line names file, key and what is allowed."""


@dataclass(frozen=True)
class Link:
    busbw_gbps: float
    latency_us: float


@dataclass(frozen=True)
class MeasuredCurve:
    """Mean seconds per call against nccl-tests bytes, one op on groups of `group_size` ranks."""

    op: str
    group_size: int
    sizes: tuple[float, ...]
    times_s: tuple[float, ...]
    nodes: int = 1  # nodes the measured group spanned (a one-host collectives run: 1)

    def time_s(self, nbytes: float) -> float:
        """log-log interpolation; the latency floor below, the last bandwidth above (as roofline)."""
        xs, ts = self.sizes, self.times_s
        if nbytes <= xs[0]:
            return ts[0]
        if nbytes >= xs[-1]:
            return ts[-1] * nbytes / xs[-1]
        i = next(k for k in range(1, len(xs)) if xs[k] >= nbytes)
        w = (math.log(nbytes) - math.log(xs[i - 1])) / (math.log(xs[i]) - math.log(xs[i - 1]))
        return math.exp(math.log(ts[i - 1]) + w * (math.log(ts[i]) - math.log(ts[i - 1])))


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    reserved_bytes: float
    margin: float
    cores: int | None
    thread_scaling: float
    peak_tflops: dict[str, float]
    efficiency: dict[str, float]
    memory_gbps: float | None
    memory_efficiency: float
    achieved: dict[str, float] | None
    gpus_per_node: int
    intra: Link | None
    inter: Link | None
    curves: tuple[MeasuredCurve, ...] = ()
    call_overhead_s: float = 0.0
    busy_latency_s: dict[int, float] = field(default_factory=dict)
    runs_as: dict[str, str] = field(default_factory=dict)  # op -> the op whose traffic it moves
    source: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def peak(self, dtype: str) -> float | None:
        return self.peak_tflops.get(dtype)


_MAY_BE_ZERO = ("reserved_gib", "margin", "latency_us", "thread_scaling", "call_overhead_us")


class _Problems:
    def __init__(self, path: str) -> None:
        self.path, self.lines = path, []

    def add(self, key: str, text: str) -> None:
        self.lines.append(f"{self.path}: {key}: {text}")


def _number(doc: dict, key: str, where: str, out: _Problems, required: bool = True, lo: float = 0.0,
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


def _section(doc: dict, name: str, out: _Problems, allowed: tuple[str, ...]) -> dict:
    value = doc.get(name)
    if not isinstance(value, dict):
        out.add(name, f"missing or not a mapping; allowed keys: {', '.join(allowed)}")
        return {}
    for key in value:
        if key not in allowed:
            out.add(f"{name}.{key}", f"unknown key; allowed keys: {', '.join(allowed)}")
    return value


def _link(doc: dict, name: str, out: _Problems) -> Link | None:
    raw = doc.get(name)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        out.add(f"links.{name}", "not a mapping; allowed keys: busbw_gbps, latency_us")
        return None
    bw = _number(raw, "busbw_gbps", f"links.{name}", out)
    lat = _number(raw, "latency_us", f"links.{name}", out)
    return Link(bw, lat) if bw is not None and lat is not None else None


def _curves(raw: Any, out: _Problems) -> tuple[MeasuredCurve, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        out.add("links.curves", "not a list; allowed: [{op, group_size, sizes, times_s}, ...]")
        return ()
    curves = []
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
        curves.append(MeasuredCurve(c["op"], c["group_size"], tuple(float(s) for s, _ in pairs),
                                    tuple(float(t) for _, t in pairs), c.get("nodes", 1)))
    return tuple(curves)


def parse_hardware(doc: Any, path: str) -> Hardware:
    out = _Problems(path)
    if not isinstance(doc, dict):
        raise HardwareError(f"{path}: not a YAML mapping; allowed top-level keys: name, device, compute, links")
    for key in doc:
        if key not in ("name", "device", "compute", "links", "notes"):
            out.add(key, "unknown key; allowed keys: name, device, compute, links, notes")
    dev = _section(doc, "device", out, ("name", "memory_gib", "reserved_gib", "margin", "cores",
                                                  "thread_scaling"))
    comp = _section(doc, "compute", out, ("peak_tflops", "efficiency", "memory_gbps", "memory_efficiency",
                                          "achieved"))
    links = _section(doc, "links", out, ("gpus_per_node", "intra", "inter", "curves", "call_overhead_us",
                                                "busy_latency_us", "runs_as"))
    memory = _number(dev, "memory_gib", "device", out)
    reserved = _number(dev, "reserved_gib", "device", out, required=False) or 0.0
    margin = _number(dev, "margin", "device", out, required=False, hi=0.9) or 0.0
    cores = dev.get("cores")
    if cores is not None and (not isinstance(cores, int) or isinstance(cores, bool) or cores < 1):
        out.add("device.cores", f"got {cores!r}; allowed: an int >= 1 (CPU devices), or leave it out")
        cores = None
    scaling = _number(dev, "thread_scaling", "device", out, required=False, hi=1.0)
    achieved = _achieved(comp, out)
    peak, eff, mem_gbps, mem_eff = _datasheet(comp, out, required=achieved is None)
    gpn = links.get("gpus_per_node", 1)
    if not isinstance(gpn, int) or isinstance(gpn, bool) or gpn < 1:
        out.add("links.gpus_per_node", f"got {gpn!r}; allowed: an int >= 1")
        gpn = 1
    intra, inter = _link(links, "intra", out), _link(links, "inter", out)
    curves = _curves(links.get("curves"), out)
    overhead = _number(links, "call_overhead_us", "links", out, required=False) or 0.0
    busy = _busy(links.get("busy_latency_us"), out)
    runs_as = links.get("runs_as") or {}
    if not isinstance(runs_as, dict) or any(k not in KINDS or v not in KINDS for k, v in runs_as.items()):
        out.add("links.runs_as", f"allowed: a mapping op -> op, each one of {', '.join(KINDS)}")
        runs_as = {}
    if intra is None and not curves and not out.lines:
        out.add("links", "needs intra {busbw_gbps, latency_us} (and inter for multi-node) or measured curves")
    if out.lines:
        raise HardwareError("\n".join(out.lines))
    gib = 1024 ** 3
    return Hardware(str(doc.get("name", Path(path).stem)), memory * gib, reserved * gib, margin, cores,
                    1.0 if scaling is None else scaling, peak, eff,
                    mem_gbps, mem_eff, achieved, gpn, intra, inter, curves, overhead * 1e-6, busy, runs_as,
                    source=path, notes=doc.get("notes") or {})


def _busy(raw: Any, out: _Problems) -> dict[int, float]:
    if raw is None:
        return {}
    ok = isinstance(raw, dict) and all(isinstance(k, int) and k >= 1 and isinstance(v, (int, float))
                                       and not isinstance(v, bool) and v >= 0 for k, v in raw.items())
    if not ok:
        out.add("links.busy_latency_us", "allowed: a mapping {ranks per node (int >= 1): microseconds >= 0}")
        return {}
    return {k: float(v) * 1e-6 for k, v in raw.items()}


def _achieved(comp: dict, out: _Problems) -> dict[str, float] | None:
    raw = comp.get("achieved")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        out.add("compute.achieved", f"not a mapping; allowed keys: {', '.join(ACHIEVED_KEYS)}")
        return None
    for key in raw:
        if key not in ACHIEVED_KEYS:
            out.add(f"compute.achieved.{key}", f"unknown key; allowed keys: {', '.join(ACHIEVED_KEYS)}")
    values = {k: _number(raw, k, "compute.achieved", out) for k in ACHIEVED_KEYS}
    return {k: v for k, v in values.items() if v is not None}


def _datasheet(comp: dict, out: _Problems, required: bool) -> tuple[dict, dict, float | None, float]:
    peak_raw, eff_raw = comp.get("peak_tflops"), comp.get("efficiency")
    if not required and peak_raw is None:
        return {}, {}, None, 1.0
    peak: dict[str, float] = {}
    if not isinstance(peak_raw, dict) or not peak_raw:
        out.add("compute.peak_tflops", "missing; allowed: a mapping dtype -> TFLOP/s, e.g. {bfloat16: 989.4}")
    else:
        for dtype in peak_raw:
            if dtype not in ("float32", "bfloat16", "float16"):
                out.add(f"compute.peak_tflops.{dtype}", "unknown dtype; allowed: float32, bfloat16, float16")
            elif (v := _number(peak_raw, dtype, "compute.peak_tflops", out)) is not None:
                peak[dtype] = v
    eff: dict[str, float] = {}
    if not isinstance(eff_raw, dict):
        out.add("compute.efficiency", "missing; allowed: {matmul: fraction, attention: fraction}")
    else:
        for key in ("matmul", "attention"):
            if (v := _number(eff_raw, key, "compute.efficiency", out, hi=1.0)) is not None:
                eff[key] = v
    mem = _number(comp, "memory_gbps", "compute", out)
    mem_eff = _number(comp, "memory_efficiency", "compute", out, required=False, hi=1.0) or 1.0
    return peak, eff, mem, mem_eff


def load_hardware(path: Path | str) -> Hardware:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HardwareError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise HardwareError(f"{path}: not valid YAML: {exc}") from exc
    return parse_hardware(doc, str(path))
