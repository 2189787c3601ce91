"""Published measurements planned: each row of configs/published/*.yaml becomes a cell, is
predicted on its cluster's hardware file with InternEvo's optimizer (framework "internevo"), and
is set beside the published figure.

Metrics: `tgs` (tokens per GPU per second: the prediction's tokens/s over the GPUs) and
`mfu_internevo` (the prediction's TFLOP/s per GPU under InternEvo's own FLOP count,
bench.plan.predict.internevo_flops, over the dtype's peak). Error = predicted / published - 1.
The goals (docs/plan.md): median |error| <= 5%, no row beyond 15%, every row (each one ran)
predicted to fit, Kendall tau >= 0.8 between predicted and published values within each model.
By default nothing is fitted to the rows: the hardware files hold datasheet figures and marked
assumptions.

With `one_node` (plan --published --one-node) each cluster's compute rate is instead taken from
its one-node rows, as one would from a measured node before planning the cluster: the file's
matmul and attention efficiencies are scaled by the one factor that makes the median error of
its rows on at most one node zero, and the goals are judged on the other rows only.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from scipy.stats import kendalltau

from bench.plan.hardware import Hardware, load_hardware
from bench.plan.predict import PlanInputs, Prediction, predict

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TABLE = ROOT / "configs" / "published" / "internevo.yaml"
HARDWARE_DIR = ROOT / "configs" / "hardware"
GOALS = {"median_abs_error": 0.05, "max_abs_error": 0.15, "kendall_tau": 0.8}


@dataclass
class Row:
    id: str
    table: dict[str, Any]
    gpus: int
    micro_bsz: int
    micro_num: int
    published: float
    predicted: float | None = None
    prediction: Prediction | None = None
    why_not: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: bool = False  # --one-node: its file's compute rate was taken from this row

    @property
    def error(self) -> float | None:
        return None if self.predicted is None else self.predicted / self.published - 1.0


def cell_config(table: dict[str, Any], model: dict[str, Any], gpus: int, micro_bsz: int, micro_num: int) -> Any:
    from bench.config.cell import CellConfig

    s = table["settings"]
    dp = gpus // s["sp"]
    return CellConfig.from_dict({
        "model": {**model, "checkpoint": s["checkpoint"]},
        "data": {"seq_len": s["seq_len"], "global_batch": micro_bsz * micro_num * dp, "micro_num": micro_num,
                 "packed": s["packed"]},
        "parallel": {"world_size": gpus, "sp": s["sp"], "wp": s["wp"], "overlap": True,
                     "memory_pool": s.get("memory_pool", False), "zero1": s["zero1"]},
        "run": {"device": "cuda", "backend": "nccl", "dtype": "bfloat16", "warmup_steps": 0, "measure_steps": 1}})


def _value(metric: str, pred: Prediction, hw: Hardware) -> float:
    if metric == "tgs":
        return pred.tokens_per_s / pred.world_size
    if metric == "mfu_internevo":
        return pred.tflops_internevo / hw.peak("bfloat16")
    raise ValueError(f"metric {metric!r}; allowed: tgs, mfu_internevo")


def _read(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the table of published measurements: {exc}") from exc


def row_id(table: dict[str, Any], spec: list) -> str:
    """TABLE@GPUS/MICRO_BSZxMICRO_NUM, from a table and one of its rows."""
    gpus, micro_bsz, micro_num, _ = spec
    return f"{table['id']}@{gpus}/{micro_bsz}x{micro_num}"


def _plan_row(table: dict[str, Any], model: dict[str, Any], spec: list, hw: Hardware) -> Row:
    gpus, micro_bsz, micro_num, value = spec
    row = Row(row_id(table, spec), table, gpus, micro_bsz, micro_num, value)
    try:
        config = cell_config(table, model, gpus, micro_bsz, micro_num)
        pred = predict(row.id, config, PlanInputs(hw, framework="internevo"))
    except ValueError as exc:
        row.why_not = str(exc).splitlines()[0]
    else:
        row.prediction, row.predicted = pred, _value(table["metric"], pred, hw)
    return row


def scaled_compute(hw: Hardware, factor: float) -> Hardware:
    """`hw` with its matmul and attention efficiencies times `factor`."""
    if hw.measured or hw.achieved is not None:
        raise ValueError(f"{hw.source}: carries measured compute rates; a one-node calibration scales the "
                         "datasheet efficiencies (compute.efficiency) of a file without them")
    return dataclasses.replace(hw, efficiency={k: v * factor for k, v in hw.efficiency.items()})


def one_node_factor(specs: list[tuple[dict, dict, list]], hw: Hardware, lo: float = 0.25, hi: float = 4.0,
                    tol: float = 1e-4) -> float:
    """The factor on `hw`'s efficiencies at which the median error of the rows `specs` (table, model,
    row) is zero. The error grows with the factor (a faster GPU, more tokens per second), so bisect."""
    def median_error(factor: float) -> float:
        rows = [_plan_row(t, m, spec, scaled_compute(hw, factor)) for t, m, spec in specs]
        if any(r.error is None for r in rows):
            raise ValueError(f"{hw.source}: a one-node row cannot be planned: "
                             + next(r.why_not for r in rows if r.error is None))
        return statistics.median(r.error for r in rows)

    hi = min(hi, 1.0 / max(hw.efficiency.values()))  # no efficiency above 1
    if not median_error(lo) < 0 < median_error(hi):
        raise ValueError(f"{hw.source}: no factor in [{lo}, {hi:.3g}] (every efficiency at most 1) gives "
                         "the one-node rows a median error of zero")
    while hi / lo > 1 + tol:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if median_error(mid) < 0 else (lo, mid)
    return (lo * hi) ** 0.5


def plan_table(path: Path = DEFAULT_TABLE, one_node: bool = False) -> dict[str, Any]:
    doc = _read(path)
    hardware = {name: load_hardware(HARDWARE_DIR / name) for name in dict.fromkeys(t["hardware"] for t in doc["tables"])}
    calibration: dict[str, dict[str, Any]] = {}
    if one_node:
        for name, hw in hardware.items():
            specs = [(t, doc["models"][t["model"]], spec) for t in doc["tables"] if t["hardware"] == name
                     for spec in t["rows"] if spec[0] <= hw.gpus_per_node]
            if not specs:
                raise ValueError(f"{path}: {name} has no row on one node ({hw.gpus_per_node} GPUs) to calibrate on")
            factor = one_node_factor(specs, hw)
            hardware[name] = dataclasses.replace(scaled_compute(hw, factor), assumptions=(
                f"compute.efficiency x{factor:.3f} from the one-node rows (--one-node): replaces the "
                "efficiency guesses below",) + hw.assumptions)
            calibration[name] = {"factor": factor, "efficiency": hardware[name].efficiency,
                                 "rows": [row_id(t, spec) for t, _, spec in specs]}
    used = {r for c in calibration.values() for r in c["rows"]}
    rows = [_plan_row(t, doc["models"][t["model"]], spec, hardware[t["hardware"]])
            for t in doc["tables"] for spec in t["rows"]]
    for row in rows:
        row.calibration = row.id in used
    result = {"rows": rows, "summary": summary([r for r in rows if not r.calibration]), "sources": doc["sources"],
              "not_planned": doc.get("not_planned", []),
              "assumptions": {name: list(hw.assumptions) for name, hw in hardware.items()}}
    if one_node:
        result["calibration"] = calibration
        result["summary_all_rows"] = summary(rows)
    return result


def summary(rows: list[Row]) -> dict[str, Any]:
    planned = [r for r in rows if r.predicted is not None]
    errors = [abs(r.error) for r in planned]
    taus = {}
    for model in sorted({r.table["model"] for r in planned}):
        mine = [r for r in planned if r.table["model"] == model]
        if len(mine) >= 2:
            taus[model] = float(kendalltau([r.predicted for r in mine], [r.published for r in mine]).statistic)
    out = {"rows": len(rows), "planned": len(planned),
           "median_abs_error": statistics.median(errors) if errors else None,
           "max_abs_error": max(errors) if errors else None,
           "beyond_15pct": [r.id for r in planned if abs(r.error) > GOALS["max_abs_error"]],
           "predicted_not_to_fit": [r.id for r in planned if not r.prediction.fits],
           "kendall_tau": taus}
    out["goals"] = {
        "median_abs_error <= 5%": out["median_abs_error"] is not None and out["median_abs_error"] <= 0.05,
        "no row beyond 15%": not out["beyond_15pct"],
        "every run that ran fits": not out["predicted_not_to_fit"],
        "Kendall tau >= 0.8 within each model": bool(taus) and all(t >= GOALS["kendall_tau"] for t in taus.values())}
    return out


def render(result: dict[str, Any], fmt: str = "table") -> str:
    import json

    from tabulate import tabulate

    if fmt == "json":
        doc = {**result, "rows": [_row_dict(r) for r in result["rows"]]}
        return json.dumps(doc, indent=1) + "\n"
    lines = []
    table = []
    for r in result["rows"]:
        p = r.prediction
        shown = (lambda v: f"{100 * v:.1f}%") if r.table["metric"] == "mfu_internevo" else (lambda v: f"{v:,.0f}")
        table.append([r.id, r.table["source"], r.table["metric"], shown(r.published),
                      "-" if r.predicted is None else shown(r.predicted),
                      "-" if r.error is None else f"{100 * r.error:+.1f}%",
                      "-" if p is None else f"{p.memory.peak_bytes / 2 ** 30:.1f} / {p.capacity_bytes / 2 ** 30:.1f}"
                      + ("" if p.fits else " NO"),
                      r.why_not or ("" if p is None else f"exposed comm {p.exposed_comm_s:.2f} s of {p.step_time_s:.2f}")
                      + (" (calibration row)" if r.calibration else "")])
    lines.append(tabulate(table, ["row (table@gpus/micro_bsz x micro_num)", "source", "metric", "published",
                                  "predicted", "error", "peak / capacity GiB", "note"],
                          tablefmt="github" if fmt == "md" else "simple"))
    calibration = result.get("calibration")
    if calibration:
        lines.append("\none-node calibration (--one-node): each file's efficiencies scaled so that the median "
                     "error of its rows on one node is zero:")
        lines.extend(f"  {name}: x{c['factor']:.3f} (" + ", ".join(f"{k} {v:.3f}" for k, v in c["efficiency"].items())
                     + f") from {len(c['rows'])} row(s): " + ", ".join(c["rows"]) for name, c in calibration.items())
        lines.append(_summary_line(result["summary"], "the other rows (the goals are judged on these)"))
        lines.append(_summary_line(result["summary_all_rows"], "all rows, the calibration rows included"))
    else:
        lines.append(_summary_line(result["summary"], ""))
    lines.append("goals: " + "; ".join(f"{g}: {'met' if ok else 'MISSED'}" for g, ok in result["summary"]["goals"].items()))
    lines.append("\nsources:\n" + "\n".join(f"  {k}: {v}" for k, v in result["sources"].items()))
    lines.append("not planned:\n" + "\n".join(f"  {n}" for n in result["not_planned"]))
    notes = {t["id"]: t for t in (r.table for r in result["rows"])}
    lines.append("assumptions of the tables:\n" + "\n".join(f"  {i}: {a}" for i, t in notes.items()
                                                           for a in t.get("assumptions", [])))
    lines.append("assumptions of the hardware files:\n" + "\n".join(f"  {f}: {a}" for f, items in
                                                                 result["assumptions"].items() for a in items))
    return "\n".join(lines) + "\n"


def _summary_line(s: dict[str, Any], label: str) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    return (f"{'' if label else chr(10)}{label + ': ' if label else ''}{s['planned']} of {s['rows']} rows planned; "
            f"median |error| {pct(s['median_abs_error'])}, max {pct(s['max_abs_error'])}; beyond 15%: "
            f"{len(s['beyond_15pct'])}; predicted not to fit: {len(s['predicted_not_to_fit'])}; Kendall tau within "
            "each model: " + ", ".join(f"{m} {t:.2f}" for m, t in s["kendall_tau"].items()))


def _row_dict(r: Row) -> dict[str, Any]:
    p = r.prediction
    return {"id": r.id, "source": r.table["source"], "where": r.table["where"], "metric": r.table["metric"],
            "gpus": r.gpus, "micro_bsz": r.micro_bsz, "micro_num": r.micro_num, "published": r.published,
            "predicted": r.predicted, "error": r.error, "why_not": r.why_not,
            "step_time_s": None if p is None else p.step_time_s,
            "exposed_comm_s": None if p is None else p.exposed_comm_s,
            "peak_memory_bytes": None if p is None else p.memory.peak_bytes,
            "fits": None if p is None else p.fits}
