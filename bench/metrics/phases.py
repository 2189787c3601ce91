"""Where a cell's wall time goes: `metrics.phases_s`, the record's `runner_overhead_s`, and the
lines summary.md prints from them. No torch here: the worker, the runner and the reports share it.

    launch_to_first_line  the runner starts the job -> the worker's main() begins on rank 0:
                          torchrun's start-up, the interpreter, the worker's imports
    process_group         init_process_group and every group the strategy uses
    build                 model, communicators, optimizer (and the attention kernel check)
    warmup                the untimed steps before the measured ones
    measure               the measured (timed) steps
    nvml_overhead         the first measured step indices again, without then with the sampler
    profile               the profiled steps, their trace export and the trace's own figures
    loss_reference        the one-process reference, in the cell that computes it (0 elsewhere)
    reduce_and_teardown   the rest of the job: every rank's figures to rank 0, the metrics, the
                          result and its agreement, process-group teardown, the processes' exit

The worker times all but the last on rank 0's clock (each rank waits for the others inside
the same phases); the runner, which sees the job start and end, gives reduce_and_teardown as
the job's wall time less the others, so the phases add up to the job. `runner_overhead_s` is
what the runner spends on the cell around the job: its inputs, log marks, judging the result,
the record itself.
"""

from __future__ import annotations

import os
import time
from typing import Any

PHASES: tuple[str, ...] = ("launch_to_first_line", "process_group", "build", "warmup", "measure",
                           "nvml_overhead", "profile", "loss_reference", "reduce_and_teardown")
WORKER_PHASES = PHASES[:-1]
LAUNCHED_ENV = "ISP_BENCH_LAUNCHED_AT"  # the runner's time.time() when it started the job
SHORT = {"launch_to_first_line": "launch", "process_group": "groups", "build": "build", "warmup": "warm-up",
         "measure": "measure", "nvml_overhead": "nvml", "profile": "profile", "loss_reference": "loss ref",
         "reduce_and_teardown": "teardown"}


class PhaseClock:
    """Seconds per phase of one rank, as laps: `clock.lap("build")` after the build gives it the
    time since the previous lap (a phase lapped twice adds up); `skip()` gives that time to no
    phase. The first lap starts at the clock's creation, the worker's first line."""

    def __init__(self, launched_at: float | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()
        if launched_at is not None:  # wall clocks: the runner's and this process' (one host)
            self.seconds["launch_to_first_line"] = max(0.0, time.time() - launched_at)

    @classmethod
    def from_env(cls) -> PhaseClock:
        """Started at the worker's first line; knows the launch when the runner said when it was."""
        try:
            return cls(float(os.environ[LAUNCHED_ENV]))
        except (KeyError, ValueError):
            return cls()

    def lap(self, name: str, ran: bool = True) -> None:
        """`ran` False: the phase had nothing to do in this cell (no profiling, a reference handed
        over), so it stays 0 and the moment of deciding so goes to no phase."""
        assert name in WORKER_PHASES, name
        if not ran:
            self.skip()
            return
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def skip(self) -> None:
        self._last = time.perf_counter()

    def as_record(self) -> dict[str, float]:
        """Every worker phase, 0.0 for those this cell did not run, in PHASES order."""
        return {name: round(self.seconds.get(name, 0.0), 4) for name in WORKER_PHASES}


def complete(metrics: dict[str, Any] | None, job_s: float) -> None:
    """Add reduce_and_teardown (the job's wall time not in any worker phase) to metrics.phases_s."""
    phases = (metrics or {}).get("phases_s")
    if isinstance(phases, dict):
        spent = sum(v for k, v in phases.items() if k in WORKER_PHASES and isinstance(v, (int, float)))
        phases["reduce_and_teardown"] = round(max(0.0, job_s - spent), 4)


def cell_seconds(record: dict[str, Any]) -> float:
    """The cell's whole time in the sweep: its job and the runner's work around it."""
    return float(record.get("wall_s") or 0.0) + float(record.get("runner_overhead_s") or 0.0)


def breakdown(record: dict[str, Any]) -> str:
    """'12.3 s: launch 2.1, groups 0.1, build 1.0, warm-up 0.4, measure 1.3 (11%), ..., runner 0.1'."""
    total = cell_seconds(record)
    phases = ((record.get("metrics") or {}).get("phases_s")) or {}
    parts = []
    for name in PHASES:
        value = phases.get(name)
        if isinstance(value, (int, float)):
            share = f" ({100 * value / total:.0f}%)" if name == "measure" and total else ""
            parts.append(f"{SHORT[name]} {value:.2f}{share}")
    parts.append(f"runner {float(record.get('runner_overhead_s') or 0.0):.2f}")
    return f"{total:.1f} s: " + ", ".join(parts)


def timed_share(records: list[dict[str, Any]]) -> str:
    """One line for the sweep: the measured steps' share of the time its cells took."""
    total = sum(cell_seconds(r) for r in records)
    measured = sum(float(((r.get("metrics") or {}).get("phases_s") or {}).get("measure") or 0.0) for r in records)
    share = f"{100 * measured / total:.0f}%" if total else "n/a"
    return (f"timed share: measured steps {measured:.1f} s of {total:.1f} s in {len(records)} cell(s) = {share} "
            f"(the rest: start-up, set-up, warm-up, profiling, reference, teardown)")
