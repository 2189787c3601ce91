"""Predict every ok training cell of finished runs and set the prediction against the measurement.

Per cell: step time (median), exposed communication, communication time per kind (traced) and
peak memory, each {"predicted", "measured", "error"} with error = predicted / measured - 1
(None where the measurement is 0 or missing). Then the median absolute error per figure and
Kendall's tau between predicted and measured step-time order (tau-b, scipy). Each cell also
carries `started_utc` and `recorded`, the metrics.plan the runner wrote when it ran (its own
hardware file's prediction), so the error can be followed over a history of runs.
"""

from __future__ import annotations

import statistics
from typing import Any

from scipy.stats import kendalltau

from bench.plan.predict import PlanInputs, Prediction, predict


def _figure(predicted: float | None, measured: Any) -> dict[str, float | None]:
    m = float(measured) if isinstance(measured, (int, float)) else None
    error = predicted / m - 1.0 if predicted is not None and m not in (None, 0.0) else None
    return {"predicted": predicted, "measured": m, "error": error}


def memory_figure(pred: Prediction, gpu: bool) -> float:
    """What the record's peak_memory_bytes measures: CUDA's max allocated (the model's tensors),
    or on a CPU the process' peak RSS (the runtime included)."""
    return pred.memory.allocated_bytes if gpu else pred.memory.peak_bytes - pred.memory.components.get(
        "allocator_reserve", 0.0)


def compare(cell: str, pred: Prediction, metrics: dict[str, Any], gpu: bool = False) -> dict[str, Any]:
    measured_comm = metrics.get("comm_time_s") if isinstance(metrics.get("comm_time_s"), dict) else {}
    kinds = sorted(set(pred.comm_time_s) | {k for k, v in measured_comm.items() if v})
    return {"cell": cell, "strategy": pred.strategy, "world_size": pred.world_size, "sp": pred.sp, "wp": pred.wp,
            "step_time_s": _figure(pred.step_time_s, (metrics.get("step_time_s") or {}).get("median")),
            "exposed_comm_s": _figure(pred.exposed_comm_s, metrics.get("exposed_comm_s")),
            "comm_time_s": {k: _figure(pred.comm_time_s.get(k, 0.0), measured_comm.get(k)) for k in kinds},
            "peak_memory_bytes": _figure(memory_figure(pred, gpu), metrics.get("peak_memory_bytes"))}


def summary(all_cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and tau over the cells not used for calibration (those would only fit themselves)."""
    cells = [c for c in all_cells if not c.get("calibration")]

    def median_abs(key: str) -> float | None:
        errors = [abs(c[key]["error"]) for c in cells if c[key]["error"] is not None]
        return statistics.median(errors) if errors else None

    comm_errors = [abs(f["error"]) for c in cells for f in c["comm_time_s"].values() if f["error"] is not None]
    timed = [c for c in cells if c["step_time_s"]["measured"] is not None]
    tau = None
    if len(timed) >= 2:
        tau = float(kendalltau([c["step_time_s"]["predicted"] for c in timed],
                               [c["step_time_s"]["measured"] for c in timed]).statistic)
    return {"cells": all_cells,
            "median_abs_error": {"step_time_s": median_abs("step_time_s"),
                                 "peak_memory_bytes": median_abs("peak_memory_bytes"),
                                 "exposed_comm_s": median_abs("exposed_comm_s"),
                                 "comm_time_s": statistics.median(comm_errors) if comm_errors else None},
            "kendall_tau": tau}


def validate(records: list[dict[str, Any]], configs: dict[str, Any], inputs: PlanInputs,
             calibration: list[str] | None = None) -> dict[str, Any]:
    """`configs`: cell id -> CellConfig of each record to predict (ok training cells);
    `calibration`: the "<run>/<cell>" the calibration used, flagged and left out of the medians."""
    cells = []
    for record in records:
        config = configs.get(record["cell"])
        if config is None or record.get("status") != "ok":
            continue
        entry = compare(record["cell"], predict(record["cell"], config, inputs), record["metrics"],
                        config.run.device == "cuda")
        entry["run"] = record.get("run")
        # what the runner predicted when the cell ran (metrics.plan), for error over time
        entry["started_utc"] = record.get("started_utc")
        entry["recorded"] = (record.get("metrics") or {}).get("plan")
        entry["calibration"] = f"{record.get('run')}/{record['cell']}" in (calibration or [])
        cells.append(entry)
    return summary(cells)
