"""Hardware files: what one device holds and computes, and how fast its links move bytes.

A hardware file is YAML (configs/hardware/*.yaml, docs/plan.md) with these sections:

    device:   name, matches (GPU names this file describes: run_bench.py picks the file whose
              entry the recorded GPU name contains), memory_gib (what torch.cuda reports as the
              device's total), reserved_gib (runtime: CUDA context, NCCL, or on CPU the
              interpreter and torch), allocator_reserve (fraction of the allocated peak the
              caching allocator holds on top: fragmentation), margin (fraction kept free),
              cores and thread_scaling (CPU only: see compute.py)
    compute:  a datasheet, peak_tflops {dtype: TFLOP/s} + efficiency {matmul, attention} +
              memory_gbps + memory_efficiency; and/or measured {dtype: {matmul_tflops,
              attention_tflops}} (a GPU run's profiled cell or gpu_check, `plan --calibrate`),
              which replace peak x efficiency for those dtypes; or achieved {matmul_tflops,
              attention_tflops, elementwise_gbps, loss_gbps, optimizer_gbps} (a CPU calibration)
    links:    gpus_per_node, nics_per_node (default: one per GPU), intra {busbw_gbps,
              latency_us} (NVLink per GPU, latency per ring step), inter {busbw_gbps, latency_us}
              (one NIC, one direction; latency per inter-node step), base_latency_us (per call),
              rail_optimized, oversubscription, algorithm (auto | ring | tree): bench/plan/links.py
              derives a collective's bandwidth from them; optionally curves: measured [{op,
              group_size, sizes, times_s, nodes}] (nodes: how many nodes the measured group spanned,
              1 by default; a curve serves only groups that span as many), runs_as {op: op} (an op
              the backend runs as another moves that one's traffic: gloo's reduce_scatter moves an
              all_reduce's, measured across a link in tests/e2e/test_netns_plan.py), call_overhead_us (host time per call) and
              busy_latency_us {ranks per node: us} (calibrated on CPU: gloo waiting for cores)
    assumptions: figures that are guesses rather than measurements or datasheet values, one line
              each (`plan --published` prints them beside the predictions); notes: free-form

Every problem is reported with the file, the key and what is allowed (exit 2 in the CLI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.plan import hardware_fields as f

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
class Fabric:
    """How a node reaches the others (bench/plan/links.py): NICs per node, each `inter`'s rate;
    rail-optimized or not (NCCL_CROSS_NIC's distinction), spine oversubscription, ring or tree."""

    nics_per_node: int
    rail_optimized: bool = True
    oversubscription: float = 1.0
    algorithm: str = "auto"
    base_latency_s: float = 0.0


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
    fabric: Fabric | None = None              # None: one NIC per GPU, the defaults above
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # {dtype: {matmul_tflops, ...}}
    allocator_reserve: float = 0.0
    matches: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()

    def peak(self, dtype: str) -> float | None:
        return self.peak_tflops.get(dtype)

    @property
    def links(self) -> Fabric:
        return self.fabric or Fabric(self.gpus_per_node)

    def describes(self, gpu_name: str) -> bool:
        """Whether a recorded GPU name (torch's, e.g. "NVIDIA H100 80GB HBM3") is this file's device."""
        return any(m.lower() in gpu_name.lower() for m in self.matches)


TOP = ("name", "device", "compute", "links", "assumptions", "notes")
DEVICE = ("name", "matches", "memory_gib", "reserved_gib", "allocator_reserve", "margin", "cores", "thread_scaling")
COMPUTE = ("peak_tflops", "efficiency", "memory_gbps", "memory_efficiency", "measured", "achieved")
LINKS = ("gpus_per_node", "nics_per_node", "intra", "inter", "base_latency_us", "rail_optimized", "oversubscription",
         "algorithm", "curves", "call_overhead_us", "busy_latency_us", "runs_as")


def parse_hardware(doc: Any, path: str) -> Hardware:
    out = f.Problems(path)
    if not isinstance(doc, dict):
        raise HardwareError(f"{path}: not a YAML mapping; allowed top-level keys: {', '.join(TOP)}")
    for key in doc:
        if key not in TOP:
            out.add(key, f"unknown key; allowed keys: {', '.join(TOP)}")
    dev, comp, links = f.section(doc, "device", out, DEVICE), f.section(doc, "compute", out, COMPUTE), \
        f.section(doc, "links", out, LINKS)
    memory = f.number(dev, "memory_gib", "device", out)
    reserved = f.number(dev, "reserved_gib", "device", out, required=False) or 0.0
    reserve = f.number(dev, "allocator_reserve", "device", out, required=False, hi=1.0) or 0.0
    margin = f.number(dev, "margin", "device", out, required=False, hi=0.9) or 0.0
    cores = dev.get("cores")
    if cores is not None and (not isinstance(cores, int) or isinstance(cores, bool) or cores < 1):
        out.add("device.cores", f"got {cores!r}; allowed: an int >= 1 (CPU devices), or leave it out")
        cores = None
    scaling = f.number(dev, "thread_scaling", "device", out, required=False, hi=1.0)
    achieved, measured = f.achieved(comp, out), f.measured(comp, out)
    peak, eff, mem_gbps, mem_eff = f.datasheet(comp, out, required=achieved is None)
    gpn = f.integer(links, "gpus_per_node", "links", out, 1) or 1
    intra, inter = f.link(links, "intra", out), f.link(links, "inter", out)
    curves = tuple(MeasuredCurve(*c) for c in f.curves(links.get("curves"), out))
    overhead = f.number(links, "call_overhead_us", "links", out, required=False) or 0.0
    busy = f.busy(links.get("busy_latency_us"), out)
    fabric = _fabric(links, gpn, out)
    runs_as = f.runs_as(links.get("runs_as"), out)
    if intra is None and not curves and not out.lines:
        out.add("links", "needs intra {busbw_gbps, latency_us} (and inter for multi-node) or measured curves")
    matches = f.strings(dev.get("matches"), "device.matches", out)
    assumptions = f.strings(doc.get("assumptions"), "assumptions", out)
    if out.lines:
        raise HardwareError("\n".join(out.lines))
    gib = 1024 ** 3
    return Hardware(str(doc.get("name", Path(path).stem)), memory * gib, reserved * gib, margin, cores,
                    1.0 if scaling is None else scaling, peak, eff, mem_gbps, mem_eff, achieved, gpn,
                    Link(*intra) if intra else None, Link(*inter) if inter else None, curves, overhead * 1e-6, busy, runs_as,
                    source=path, notes=doc.get("notes") or {}, fabric=fabric, measured=measured,
                    allocator_reserve=reserve, matches=matches, assumptions=assumptions)


def _fabric(links: dict, gpus_per_node: int, out: f.Problems) -> Fabric:
    rail = links.get("rail_optimized", True)
    if not isinstance(rail, bool):
        out.add("links.rail_optimized", f"got {rail!r}; allowed: true or false")
        rail = True
    return Fabric(f.integer(links, "nics_per_node", "links", out, gpus_per_node) or gpus_per_node, rail,
                  f.number(links, "oversubscription", "links", out, required=False, lo=1.0) or 1.0,
                  f.choice(links, "algorithm", "links", f.ALGORITHMS, "auto", out),
                  (f.number(links, "base_latency_us", "links", out, required=False) or 0.0) * 1e-6)


def load_hardware(path: Path | str) -> Hardware:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HardwareError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise HardwareError(f"{path}: not valid YAML: {exc}") from exc
    return parse_hardware(doc, str(path))
