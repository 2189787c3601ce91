"""The checks gpu_check makes on a cell's record: each a function of the record (and the run
folder it lives in) that returns one row, and that fails for a named reason.

Bounds, and why they are where they are (provisional: not yet seen on a GPU):
  TRAIN_MIN_OF_GEMM  0.2: a training step of the main cell (8 x 2048-wide blocks, 8k tokens per
                     micro-batch) that runs below a fifth of the bf16 GEMM rate gpu_check timed is
                     losing its time outside the kernels (host syncs, a CPU-bound launch loop, a
                     fallback kernel); above the GEMM rate the FLOP count or the clock is wrong
  ENERGY_TOL         0.2: the energy counter's joules over the window against mean sampled power x
                     window length; NVML's power reading on recent GPUs is itself a ~1 s average,
                     so a window of ~2 s of steady load agrees to a few percent, not exactly
  POWER_BAND         mean power under load between 20% and 110% of the enforced power limit
                     (an idle H100 draws ~10% of its 700 W); 100..1000 W when the limit is unknown
  SNAPSHOT_TOL       0.1: the peak of live bytes replayed from the snapshot's allocator events
                     (requested sizes) against max_memory_allocated (rounded block sizes) of the
                     measured steps; same shapes, different steps, rounding below 1 MB per block
"""

from __future__ import annotations

import gzip
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bench.gpu_check.rows import CORRECT, FAIL, KERNELS, MEASUREMENT, NA, RUNS, SETUP, SPEED, Check, passed

TRAIN_MIN_OF_GEMM = 0.2
ENERGY_TOL = 0.2
POWER_BAND = (0.2, 1.1)
FALLBACK_POWER_W = (100.0, 1000.0)
SNAPSHOT_TOL = 0.1
MIN_ALLOC_EVENTS = 100


@dataclass(frozen=True)
class CellRun:
    """One cell as gpu_check ran it: its newest record (None when there is none), the run
    folder, and what the runner printed (the only clue when no record was written)."""

    cell: str
    record: Optional[dict[str, Any]]
    run_dir: Optional[Path]
    output_tail: str = ""
    command: str = ""

    @property
    def metrics(self) -> dict[str, Any]:
        return (self.record or {}).get("metrics") or {}

    @property
    def ran(self) -> bool:
        return bool(self.record) and self.record.get("status") == "ok"


def runs(c: CellRun) -> Check:
    """The cell ran; else its reason whole, the failing rank's log and the run folder."""
    if c.record is None:
        where = f"run folder {c.run_dir}" if c.run_dir else "no run folder was made"
        return Check("runs", FAIL, f"no record ({where}); the runner's output ends: {c.output_tail.strip()}",
                     c.cell, RUNS, f"run it by hand and read its output: {c.command}")
    if c.record.get("status") != "ok":
        error = c.record.get("error") or {}
        log = c.run_dir / error["log_file"] if c.run_dir and error.get("log_file") else None
        detail = f"{c.record.get('status')}: {error.get('reason', '(no reason recorded)')}; rank log {log}; " \
                 f"run folder {c.run_dir}"
        return Check("runs", FAIL, detail, c.cell, RUNS, f"read {log or c.run_dir} (then rerun: {c.command})")
    step = c.metrics["step_time_s"]["median"]
    return Check("runs", "ok", f"{step:.3f} s/step; run folder {c.run_dir}", c.cell, RUNS)


def loss_matches(c: CellRun) -> Check:
    m = c.metrics
    if "loss_matches_reference" not in m:
        return Check("loss = reference", FAIL, f"no reference ran: {m.get('loss_check_skipped')}", c.cell, CORRECT,
                     "the one-process reference must run here (run.check_loss: true, room on the device)")
    detail = f"max relative difference {m['loss_max_rel_diff']:.1e} over {len(m['loss'])} steps (tolerance " \
             f"{m['loss_rel_tol']:g})"
    if not m["loss_matches_reference"]:
        detail += f"; cell {m['loss']} vs reference {m['loss_reference']}"
    return passed("loss = reference", m["loss_matches_reference"], detail, CORRECT,
                  "the cell trains differently from one process on the same tokens: a wrong gradient or "
                  "collective on this GPU's path", c.cell)


def bytes_match(c: CellRun) -> Check:
    comm = c.metrics["comm"]
    detail = f"{comm['bytes_per_step']:,} B per step counted, as the formula predicts" if comm["matches_prediction"] \
        else f"counted differs from the formula: {comm['mismatches']}"
    return passed("counted bytes = formula", comm["matches_prediction"], detail, CORRECT,
                  "a collective ran that the formula does not expect, or one it expects did not", c.cell)


def attention_is_flash(c: CellRun) -> Check:
    """With flash-attn importable in the cell, the cell must have run it."""
    a = c.metrics["attention"]
    version, why = a.get("flash_attn_version"), str(a.get("reason"))
    if version is None and "failed to import" in why:
        return Check("attention is flash", FAIL, why, c.cell, SETUP,
                     "reinstall flash-attn against this torch and CUDA (pip install -e '.[flash]')")
    if version is None:
        return Check("attention is flash", NA, f"{a['backend']}: {why} (pip install -e '.[flash]')", c.cell, KERNELS)
    return passed("attention is flash", a["backend"] == "flash", f"{a['backend']} ({why}); flash-attn {version}",
                  KERNELS, "flash-attn is installed but the cell ran SDPA: see metrics.attention.reason", c.cell)


def tflops_in_bounds(c: CellRun, gemm_tflops: Optional[float], fraction: float = TRAIN_MIN_OF_GEMM) -> Check:
    name = "TFLOP/s per rank within GEMM bounds"
    got = c.metrics["tflops_per_rank"]
    if gemm_tflops is None:
        return Check(name, FAIL, f"{got:.1f} TFLOP/s per rank, but no GEMM rate to judge it by (see the GEMM row)",
                     c.cell, SPEED, "fix the GEMM timing first")
    low = fraction * gemm_tflops
    detail = f"{got:.1f} TFLOP/s per rank; allowed {low:.1f} ({fraction:g} x GEMM) to {gemm_tflops:.1f} (the bf16 " \
             f"GEMM rate); MFU {c.metrics.get('mfu')}"
    fix = "faster than a plain GEMM: the FLOP count or the step time is wrong" if got > gemm_tflops else \
        "the step spends its time outside the kernels: look at the main cell's trace for gaps and host syncs"
    return passed(name, low <= got <= gemm_tflops, detail, SPEED, fix, c.cell)


def _sampled_ranks(c: CellRun) -> Optional[list[dict[str, Any]]]:
    """Every rank's NVML summary, or None when NVML did not sample (its own row says why)."""
    nvml = c.metrics.get("nvml") or {}
    return [r for r in nvml["per_rank"] if r] if nvml.get("available") else None


def _no_nvml(name: str, c: CellRun) -> Check:
    return Check(name, NA, "NVML did not sample the steps (see 'NVML sampled the steps')", c.cell, MEASUREMENT)


def _refused(ranks: list[dict[str, Any]], *fields: str) -> Optional[str]:
    """Which rank's NVML refused which of `fields` (stored as "unsupported", never 0), or None."""
    bad = [f"rank {i}: {f} {r.get(f)!r} (NVML errors: {r.get('unsupported') or 'none recorded'})"
           for i, r in enumerate(ranks) for f in fields if not isinstance(r.get(f), (int, float))]
    return "; ".join(bad) or None


def nvml_sampled(c: CellRun) -> Check:
    nvml = c.metrics.get("nvml") or {"available": False, "reason": "no nvml block in the record"}
    ok = bool(nvml.get("available"))
    detail = f"{len(nvml.get('per_rank') or [])} rank(s) sampled" if ok else str(nvml.get("reason"))
    return passed("NVML sampled the steps", ok, detail, MEASUREMENT,
                  "pip install nvidia-ml-py and check that nvidia-smi works in this container", c.cell)


def energy_from_counter(c: CellRun) -> Check:
    if (ranks := _sampled_ranks(c)) is None:
        return _no_nvml("energy from the NVML counter", c)
    bad = [(i, r.get("energy_source"), (r.get("unsupported") or {}).get("energy_mj")) for i, r in enumerate(ranks)
           if r.get("energy_source") != "counter"]
    detail = f"rank(s) without the energy counter: {bad}" if bad else \
        f"{sum(r['energy_j'] for r in ranks):.1f} J over {ranks[0]['window_s']:.2f} s from the counter"
    return passed("energy from the NVML counter", not bad and bool(ranks), detail, MEASUREMENT,
                  "nvmlDeviceGetTotalEnergyConsumption is refused here (the reason is in detail)", c.cell)


def energy_agrees_with_power(c: CellRun, tol: float = ENERGY_TOL) -> Check:
    if (ranks := _sampled_ranks(c)) is None:
        return _no_nvml("energy = mean power x time", c)
    if (why := _refused(ranks, "energy_j", "power_mean_w")) is not None:
        return Check("energy = mean power x time", FAIL, why, c.cell, MEASUREMENT, "NVML refuses a reading here")
    parts, ok = [], True
    for i, r in enumerate(ranks):
        integral = r["power_mean_w"] * r["window_s"]
        rel = abs(r["energy_j"] - integral) / integral
        ok = ok and rel <= tol
        parts.append(f"rank {i}: {r['energy_j']:.1f} J vs {r['power_mean_w']:.0f} W x {r['window_s']:.2f} s = "
                     f"{integral:.1f} J ({rel:.0%})")
    return passed("energy = mean power x time", ok, "; ".join(parts) + f" (tolerance {tol:.0%})", MEASUREMENT,
                  "the energy counter and the power readings disagree: one of them is not this GPU's", c.cell)


def power_plausible(c: CellRun, limit_w: Optional[float]) -> Check:
    low, high = (POWER_BAND[0] * limit_w, POWER_BAND[1] * limit_w) if limit_w else FALLBACK_POWER_W
    source = f"{POWER_BAND[0]:g}..{POWER_BAND[1]:g} x the {limit_w:.0f} W power limit" if limit_w else \
        "fixed band, the power limit was not readable"
    if (ranks := _sampled_ranks(c)) is None:
        return _no_nvml("power plausible under load", c)
    if (why := _refused(ranks, "power_mean_w")) is not None:
        return Check("power plausible under load", FAIL, why, c.cell, MEASUREMENT, "NVML refuses power readings here")
    means = [r["power_mean_w"] for r in ranks]
    detail = f"mean power {', '.join(f'{p:.0f} W' for p in means)}; allowed {low:.0f}..{high:.0f} W ({source})"
    return passed("power plausible under load", all(low <= p <= high for p in means), detail, MEASUREMENT,
                  "the GPU was not loaded during the measured steps, or the reading is not this GPU's", c.cell)


def kernel_names(trace_path: Path) -> list[str]:
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    return [e["name"] for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]


def is_flash_attn_kernel(name: str) -> bool:
    """flash-attn's own kernels (flash_fwd_kernel, flash_bwd_..., flash_fwd_splitkv_...), not
    PyTorch's copy of them inside SDPA, which lives in namespace pytorch_flash."""
    low = name.lower()
    return ("flash_fwd" in low or "flash_bwd" in low) and "pytorch_flash" not in low


def _traced_kernels(c: CellRun) -> tuple[list[str], int]:
    traces = c.metrics.get("traces") or []
    if not traces:
        raise LookupError("the record names no trace (profile.enabled must be true for this cell)")
    return [n for t in traces for n in kernel_names(c.run_dir / t)], len(traces)


def flash_kernels_traced(c: CellRun) -> Check:
    name = "trace holds flash-attn kernels"
    if c.metrics["attention"]["backend"] != "flash":
        return Check(name, NA, f"the cell ran {c.metrics['attention']['backend']}", c.cell, KERNELS)
    names, files = _traced_kernels(c)
    ours = [n for n in names if is_flash_attn_kernel(n)]
    theirs = [n for n in names if "pytorch_flash" in n.lower()]
    detail = f"{len(ours)} flash-attn, {len(theirs)} PyTorch SDPA-flash of {len(names)} kernels in {files} trace(s)"
    return passed(name, bool(ours), detail, KERNELS,
                  "the record says flash but no flash-attn kernel ran: the backend choice and the kernels disagree",
                  c.cell)


def nccl_kernels_traced(c: CellRun) -> Check:
    names, files = _traced_kernels(c)
    nccl = [n for n in names if "nccl" in n.lower()]
    return passed("trace holds NCCL kernels", bool(nccl), f"{len(nccl)} NCCL of {len(names)} kernels in {files} "
                  "trace(s)", KERNELS, "no NCCL kernel ran: the collectives did not go through NCCL", c.cell)


def collectives_correct(c: CellRun) -> Check:
    ops = c.metrics["collectives"]["ops"]
    wrong = {op: sum(r["wrong"] for r in o["rows"]) for op, o in ops.items()}
    sizes = sum(len(o["rows"]) for o in ops.values())
    best = max((r["busbw_gbps"] for o in ops.values() for r in o["rows"]), default=0.0)
    return passed("collectives correct", sizes > 0 and not any(wrong.values()),
                  f"#wrong per op {wrong} over {sizes} sizes; best busbw {best:.1f} GB/s", CORRECT,
                  "a collective delivered wrong elements on this GPU pair", c.cell)


def replayed_peak(snapshot: dict[str, Any]) -> tuple[int, int]:
    """(peak live bytes over the recorded events, alloc events): the allocator's trace holds
    requested sizes; the live bytes at its end are the snapshot's allocated blocks, so walking
    back from there gives every earlier state even when the oldest events were dropped."""
    traces = snapshot["device_traces"]
    device = max(range(len(traces)), key=lambda d: len(traces[d]))
    events = [e for e in traces[device] if e["action"] in ("alloc", "free_requested")]
    now = sum(b["requested_size"] for s in snapshot["segments"] if s.get("device", device) == device
              for b in s["blocks"] if b["state"] == "active_allocated")
    for e in events:  # back to the state before the first event
        now += -e["size"] if e["action"] == "alloc" else e["size"]
    peak, allocs = now, 0
    for e in events:
        now += e["size"] if e["action"] == "alloc" else -e["size"]
        allocs += e["action"] == "alloc"
        peak = max(peak, now)
    return peak, allocs


def snapshot_matches_peak(c: CellRun, tol: float = SNAPSHOT_TOL) -> Check:
    name = "snapshot events = max_memory_allocated"
    paths = c.metrics.get("memory_snapshots") or []
    if not any(paths):
        return Check(name, FAIL, "the record names no memory snapshot (metrics.memory_snapshots)", c.cell,
                     MEASUREMENT, "profile.memory_snapshot: true on a CUDA cell writes one per rank")
    parts, ok = [], True
    for rank, rel in enumerate(paths):
        if rel is None:
            continue
        with open(c.run_dir / rel, "rb") as f:  # recorded relative to the run folder
            peak, allocs = replayed_peak(pickle.load(f))
        want = c.metrics["memory_per_rank"][rank]["peak_allocated_bytes"]
        off = abs(peak - want) / want
        ok = ok and allocs >= MIN_ALLOC_EVENTS and off <= tol
        parts.append(f"rank {rank}: {allocs} alloc events, replayed peak {peak / 2**30:.2f} GiB vs "
                     f"max_memory_allocated {want / 2**30:.2f} GiB ({off:.1%})")
    return passed(name, ok, "; ".join(parts) + f" (need >= {MIN_ALLOC_EVENTS} events, within {tol:.0%})",
                  MEASUREMENT, "the snapshot does not describe the measured memory: see detail", c.cell)
