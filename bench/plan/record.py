"""metrics.plan: every measured cell's prediction beside what it measured (the shared record field).

    {"available": true, "hardware": NAME, "framework": "bench",
     "step_time_s": {"predicted": x, "measured": y, "rel_error": x / y - 1}, "peak_memory_bytes": {...},
     "exposed_comm_s": {...}}
    {"available": false, "reason": "..."}

Computed once per cell by the runner after the cell's outcome (bench/sweep/runner.py), never in
the worker's timed path. The hardware is chosen explicitly: `run_bench.py --hardware FILE` (a
shipped file or a `plan --calibrate` output), else the shipped file whose `device.matches` names
the GPU env.json recorded; without one the entry says why. A measured figure that is missing
(exposed communication needs profile.enabled) has measured and rel_error null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HARDWARE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"


@dataclass(frozen=True)
class Choice:
    hardware: Any | None  # bench.plan.hardware.Hardware
    reason: str


def choose(run_dir: Path, explicit: Path | None) -> Choice:
    """The hardware every cell of this run is predicted on (loading errors propagate: exit 2)."""
    from bench.plan.hardware import load_hardware

    if explicit is not None:
        hw = load_hardware(explicit)
        return Choice(hw, f"--hardware {explicit}")
    try:
        gpu = json.loads((run_dir / "env.json").read_text()).get("gpu")
    except (OSError, ValueError):
        gpu = None
    if gpu:
        for path in sorted(HARDWARE_DIR.glob("*.yaml")):
            hw = load_hardware(path)
            if hw.describes(gpu):
                return Choice(hw, f"shipped {path.name} describes {gpu}")
        return Choice(None, f"no shipped hardware file describes the GPU {gpu!r}; pass --hardware FILE")
    return Choice(None, "no hardware file for this machine (CPU: none is shipped); pass --hardware FILE, "
                        "e.g. one `run_bench.py plan --calibrate` wrote")


def _figure(predicted: float | None, measured: Any) -> dict[str, float | None]:
    m = float(measured) if isinstance(measured, (int, float)) and not isinstance(measured, bool) else None
    error = predicted / m - 1.0 if predicted is not None and m not in (None, 0.0) else None
    return {"predicted": predicted, "measured": m, "rel_error": error}


def entry(config: Any, metrics: dict[str, Any], choice: Choice) -> dict[str, Any]:
    """metrics.plan of one cell (`config`: its CellConfig)."""
    if config.run.kind != "training":
        return {"available": False, "reason": "a collectives cell: the planner predicts training steps"}
    if choice.hardware is None:
        return {"available": False, "reason": choice.reason}
    from bench.plan.predict import PlanInputs, predict
    from bench.plan.validate import memory_figure

    try:
        pred = predict("cell", config, PlanInputs(choice.hardware))
    except (ValueError, AssertionError) as exc:  # a layout the planner cannot express: say so
        return {"available": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return {"available": True, "hardware": choice.hardware.name, "chosen_by": choice.reason, "framework": "bench",
            "step_time_s": _figure(pred.step_time_s, (metrics.get("step_time_s") or {}).get("median")),
            "peak_memory_bytes": _figure(memory_figure(pred, config.run.device == "cuda"),
                                         metrics.get("peak_memory_bytes")),
            "exposed_comm_s": _figure(pred.exposed_comm_s, metrics.get("exposed_comm_s"))}
