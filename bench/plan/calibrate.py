"""A hardware file for this machine, from a collectives run and a profiled training run.

links     every op of every ok collectives cell becomes a measured curve (bytes -> seconds per
          call) for its group size; gpus_per_node is the cells' world size (one host).
compute   from one profiled world-size-1 training cell (no communication in it): the trace's
          top-level compute ops on the main thread are sorted into matmul (the linears and the
          head), attention (SDPA), loss (cross-entropy), optimizer (inside Optimizer.step) and
          elementwise (the rest). Each class's traced seconds per step, scaled by measured
          median step / traced step (the profiler slows the step down), divide the work the
          planner counts for that class (bench/plan/compute.py): the achieved rates.
device    memory_gib from the host's RAM as env.json does not record it: /proc/meminfo when
          readable; reserved_gib: the world-size-1 cell's peak minus the memory model's figure
          without runtime (CPU peak RSS includes the interpreter, torch and its allocator).
A CPU's rates were measured with all `cores` on one rank; compute.py shares them out, and
thread_scaling (how much a rank's second thread helps) comes from a profiled world-size-2 ISP
cell without overlap, when the runs have one: its traced compute per token (bench/overlap.py's
compute intervals) against the world-size-1 cell's. links.busy_latency_us comes from one ISP
cell per world size (without overlap where there is one): its measured step minus the
predicted one, per collective call.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

from bench.plan.compute import (
    LOSS_BWD,
    LOSS_FWD,
    OPTIMIZER_PASSES,
    Rates,
    Work,
)
from bench.plan.hardware import parse_hardware
from bench.plan.memory import isp_memory
from bench.plan.predict import ELEMENT_SIZE, attention_pairs, data_spec, llama
from isp_core.comm_formula import _linear_shapes

UNIT = Rates(1.0, 1.0, 1.0, 1.0, 1.0, "unit")
CLASSES = ("matmul", "attention", "loss", "optimizer", "elementwise")


def _class_of(name: str) -> str:
    low = name.lower()
    if "wplinearfn" in low or low in ("aten::linear", "aten::mm", "aten::matmul", "aten::addmm") \
            or "mmbackward" in low or "linearbackward" in low:
        return "matmul"
    if "scaled_dot_product" in low or "scaleddotproduct" in low or "flash" in low:
        return "attention"
    if any(k in low for k in ("cross_entropy", "nllloss", "nll_loss", "logsoftmax", "log_softmax",
                              "vocabparallelcrossentropy")):
        return "loss"
    return "elementwise"


def traced_seconds(trace: dict[str, Any]) -> tuple[dict[str, float], float, int]:
    """Seconds per class summed over the profiled steps, the steps' total length, their count."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e["name"].startswith("ProfilerStep")]
    if not steps:
        raise ValueError("the trace has no ProfilerStep events")
    main = steps[0]["tid"]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in steps]
    optim = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith("Optimizer.step")]
    ops = sorted((e for e in events if e.get("cat") == "cpu_op" and e["tid"] == main),
                 key=lambda e: (e["ts"], -e["dur"]))
    out = dict.fromkeys(CLASSES, 0.0)
    end = -1.0
    for e in ops:
        if e["ts"] < end:
            continue  # inside an op already counted: only top-level ops
        end = e["ts"] + e["dur"]
        if not any(s <= e["ts"] < t for s, t in windows):
            continue
        inside_optim = any(s <= e["ts"] < t for s, t in optim)
        out["optimizer" if inside_optim else _class_of(e["name"])] += e["dur"] * 1e-6
    return out, sum(t - s for s, t in windows) * 1e-6, len(steps)


def work_per_step(config: Any) -> dict[str, float]:
    """What the planner counts per step for each class (FLOPs or bytes), one rank, world size 1."""
    cfg, spec, E = llama(config.model), data_spec(config), ELEMENT_SIZE[config.run.dtype]
    tokens = spec.global_batch * spec.seq_len
    ckpt, L = cfg.ckpt_blocks, cfg.layers
    linear = L * sum(_linear_shapes(cfg)) + cfg.vocab * cfg.hidden
    pairs = attention_pairs(spec, config.run.warmup_steps, config.run.measure_steps)
    w = Work(tokens, E, cfg.hidden, cfg.mlp_hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.vocab, 0.0)
    elementwise = (L + ckpt) * w.elementwise_s("forward", UNIT) + L * w.elementwise_s("backward", UNIT)
    params = L * (sum(_linear_shapes(cfg)) + 2 * cfg.hidden) + 2 * cfg.vocab * cfg.hidden + cfg.hidden
    return {"matmul": 6.0 * linear * tokens + 2.0 * ckpt * sum(_linear_shapes(cfg)) * tokens,
            "attention": (12.0 * L + 4.0 * ckpt) * cfg.hidden * pairs,
            "loss": (LOSS_FWD + LOSS_BWD) * tokens * cfg.vocab * 4,
            "optimizer": OPTIMIZER_PASSES * params * E,
            "elementwise": elementwise}


def compute_rates(record: dict[str, Any], config: Any) -> dict[str, float]:
    traces = (record.get("metrics") or {}).get("traces") or []
    if not traces:
        raise ValueError(f"cell {record.get('cell')}: no trace; run it with profile.enabled: true")
    path = Path(traces[0])
    if not path.is_absolute():  # relative to the run folder since i11's records
        path = Path(record.get("run_dir", ".")) / path
    with gzip.open(path, "rt") as f:
        seconds, _, steps = traced_seconds(json.load(f))
    median = record["metrics"]["step_time_s"]["median"]
    # The profiler slows ops down, and the host's gaps between ops (Python) belong to no class:
    # scaling the classes' sum to the measured median spreads both over the classes.
    scale = median / (sum(seconds.values()) / steps)
    work = work_per_step(config)
    rate = {k: work[k] / max(seconds[k] / steps * scale, 1e-12) for k in CLASSES}
    return {"matmul_tflops": rate["matmul"] / 1e12, "attention_tflops": rate["attention"] / 1e12,
            "loss_gbps": rate["loss"] / 1e9, "optimizer_gbps": rate["optimizer"] / 1e9,
            "elementwise_gbps": rate["elementwise"] / 1e9}


def _compute_per_token(record: dict[str, Any], config: Any) -> float:
    """Traced compute per step (bench/overlap.py's: top-level aten ops, collectives and copies
    left out), averaged over ranks, per token a rank holds."""
    per_rank = record["metrics"]["overlap"]["per_rank"]
    compute = sum(r["compute_s"] for r in per_rank) / len(per_rank)
    spec, p = data_spec(config), config.parallel
    tokens = spec.micro_bsz(p.world_size // p.sp) * spec.seq_len // p.sp * spec.micro_num
    return compute / tokens


def thread_scaling(base: tuple[dict, Any], other: tuple[dict, Any], cores: int) -> float:
    """The exponent a of compute.py's t^a: from the speed of a rank of `other` (t threads, r ranks)
    relative to `base` (all cores, one rank), speed = t^a min(1, C/(r t)) / C^a."""
    ranks = other[1].parallel.world_size
    threads = max(1, cores // ranks)
    if threads == cores:
        return 1.0
    speed = _compute_per_token(*base) / _compute_per_token(*other)
    share = min(1.0, cores / (ranks * threads))
    return min(1.0, max(0.0, math.log(speed / share) / math.log(threads / cores)))


def _smooth(times: list[float]) -> list[float]:
    """Median of each size's mean and its neighbours': one disturbed size on a shared host does
    not make a bump in the curve, and the level stays the mean's (what a step pays)."""
    if len(times) < 3:
        return list(times)
    inner = [sorted(times[i - 1:i + 2])[1] for i in range(1, len(times) - 1)]
    return [min(times[:2]), *inner, min(times[-2:])]


def curves_from(records: list[dict[str, Any]], nnodes: int = 1) -> list[dict[str, Any]]:
    """One curve per (op, group size, nodes the group spans, from the run's `nnodes`): the measured
    mean per call, smoothed, less one barrier.
    The collectives timer puts a world barrier in every CPU sample (bench/timing.py); a barrier
    costs about a smallest all-reduce, so half the cell's smallest all-reduce time (a barrier plus
    an all-reduce) comes off every point, never below a tenth of it. Training calls have no barrier."""
    best: dict[tuple[str, int, int], dict[str, Any]] = {}
    for record in records:
        doc = (record.get("metrics") or {}).get("collectives")
        if record.get("status") != "ok" or not isinstance(doc, dict):
            continue
        size = len(doc["group_ranks"][0])
        per_node = max(1, doc["world_size"] // nnodes)
        nodes = len({r // per_node for r in doc["group_ranks"][0]})
        tables = {op: sorted((r["size_bytes"], r["time_us"] / 1e6) for r in t["rows"] if r["time_us"] > 0)
                  for op, t in doc["ops"].items()}
        ar = _smooth([t for _, t in tables.get("all_reduce", [])])
        barrier = ar[0] / 2 if ar and doc["device"] == "cpu" else 0.0
        for op, rows in tables.items():
            if rows and (op, size, nodes) not in best:
                times = [max(t - barrier, 0.1 * t) for t in _smooth([t for _, t in rows])]
                best[(op, size, nodes)] = {"op": op, "group_size": size, "nodes": nodes,
                                           "world_size": doc["world_size"], "sizes": [x for x, _ in rows],
                                           "times_s": times, "barrier_s": barrier}
    return list(best.values())


def busy_latency_s(doc: dict[str, Any], record: dict[str, Any], config: Any) -> float:
    """What each collective call of a training step costs beyond its isolated link time, with
    this cell's ranks busy on the host: its measured median step minus the step predicted
    without it, per call. On a shared CPU: gloo's threads waiting for a core, and for the
    slower rank, which the collectives run (every rank idle but the call) does not see."""
    from bench.plan.predict import PlanInputs, predict

    pred = predict(record["cell"], config, PlanInputs(parse_hardware(doc, "<calibration>")))
    calls = sum(c["calls"] for kinds in pred.comm.values() for c in kinds.values())
    gap = record["metrics"]["step_time_s"]["median"] - pred.step_time_s
    return max(0.0, gap / calls) if calls else 0.0


def _busy_cells(records: list[dict[str, Any]], configs: dict[str, Any], base: Any) -> dict[int, dict[str, Any]]:
    """Per world size > 1, the ISP cell to measure busy latency on: the base's model and tokens,
    no overlap preferred (every call blocks), then no recompute, then the first id."""
    out: dict[int, dict[str, Any]] = {}
    cands = [r for r in records if r.get("status") == "ok" and r["cell"] in configs
             and configs[r["cell"]].parallel.strategy == "isp" and configs[r["cell"]].parallel.world_size > 1
             and configs[r["cell"]].model.hidden == base.model.hidden]
    for r in sorted(cands, key=lambda r: (configs[r["cell"]].parallel.overlap, configs[r["cell"]].model.checkpoint,
                                          r["cell"])):
        out.setdefault(configs[r["cell"]].parallel.world_size, r)
    return out


def _scaling_cell(config: Any, base: Any) -> bool:
    """An ISP cell at world size 2, no overlap, the base's model and tokens: compute apart, it only
    adds synchronous communication, which the trace's compute classes leave out."""
    p = config.parallel
    return (p.strategy == "isp" and p.world_size == 2 and not p.overlap and config.model == base.model
            and config.data == base.data)


def _host_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return 16.0


def runtime_bytes(record: dict[str, Any], config: Any) -> float:
    """Measured peak minus the model's peak without runtime, for a world-size-1 cell."""
    cfg, spec, E = llama(config.model), data_spec(config), ELEMENT_SIZE[config.run.dtype]
    p = config.parallel
    tokens = spec.micro_bsz(1) * spec.seq_len
    modelled = isp_memory(cfg, tokens, 1, 1, p.overlap, p.memory_pool, E, spec.micro_num, 0.0).allocated_bytes
    return max(0.0, record["metrics"]["peak_memory_bytes"] - modelled)


def calibrate(records: list[dict[str, Any]], configs: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The hardware document (a dict to dump as YAML). `configs`: cell id -> CellConfig."""
    curves = curves_from(records, int(env.get("nnodes") or 1))
    profiled = [r for r in records if r.get("status") == "ok" and r["cell"] in configs
                and configs[r["cell"]].parallel.world_size == 1 and (r.get("metrics") or {}).get("traces")]
    if not profiled:
        raise ValueError("no ok, profiled world-size-1 training cell in the run(s); the default config's "
                         "ws1 cells are profiled")
    if not curves:
        raise ValueError("no ok collectives cell in the run(s); run configs/collectives-cpu.yaml")
    # The cell without recompute is the cleanest to calibrate on.
    record = min(profiled, key=lambda r: (configs[r["cell"]].model.checkpoint, r["cell"]))
    config = configs[record["cell"]]
    cores = int(env.get("cpu_count") or 1)
    used = [f"{record['run']}/{record['cell']}"]
    second = [r for r in records if r.get("status") == "ok" and r["cell"] in configs
              and (r.get("metrics") or {}).get("overlap") and _scaling_cell(configs[r["cell"]], config)]
    doc = {"name": f"calibrated-{env.get('hostname', 'host')}",
           "device": {"name": env.get("gpu") or f"cpu ({cores} cores)", "memory_gib": round(_host_memory_gib(), 2),
                      "reserved_gib": runtime_bytes(record, config) / 1024 ** 3, "margin": 0.1},
           "compute": {"achieved": compute_rates(record, config)},
           # One host: every rank of every cell shares its node.
           "links": {"gpus_per_node": max([c["world_size"] for c in curves]
                                          + [c.parallel.world_size for c in configs.values()]),
                     "curves": [{k: v for k, v in c.items() if k not in ("world_size", "barrier_s")} for c in curves]},
           }
    if config.run.device == "cpu":
        doc["device"]["cores"] = cores
        doc["device"]["thread_scaling"] = 1.0
        if second and cores > 1:
            pick = min(second, key=lambda r: r["cell"])
            doc["device"]["thread_scaling"] = thread_scaling((record, config), (pick, configs[pick["cell"]]), cores)
            used.append(f"{pick['run']}/{pick['cell']}")
    busy = {}
    for world, cell in sorted(_busy_cells(records, configs, config).items()):
        busy[world] = busy_latency_s(doc, cell, configs[cell["cell"]]) * 1e6
        used.append(f"{cell['run']}/{cell['cell']}")
    if busy:
        doc["links"]["busy_latency_us"] = busy
    doc["notes"] = {"calibrated_on": list(dict.fromkeys(used)), "barrier_s": {f"{c['op']} x{c['group_size']}": c["barrier_s"]
                                                         for c in curves}}
    parse_hardware(doc, "<calibration>")  # the document must load as any hardware file does
    return doc
