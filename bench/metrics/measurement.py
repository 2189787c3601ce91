"""What the worker hands to the metrics assembly: one typed record of what was measured.

`RankMeasurement` is what one rank saw (it travels to rank 0 through the process group);
`Measurement` is the cell's whole view on rank 0. Every field is plain data (lists, dicts,
numbers), so a Measurement can be built in a test without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RankMeasurement:
    losses: list[float]  # this rank's loss per measured step
    comm: dict[str, Any]  # CommStats snapshot over the measured steps: {group: {kind: {calls, bytes}}}
    memory: dict[str, Any]  # peak_memory() of this rank
    nvml: Optional[dict[str, Any]] = None  # the sampler's summary, or why it is unavailable
    profile: Optional[dict[str, Any]] = None  # {"traces": [...], "active_steps": n, "memory_snapshot"?}


@dataclass
class Measurement:
    samples: list[float]  # seconds per measured step, the max over ranks
    first_measured_step: int  # index of the first timed step (after warm-up)
    ranks: list[RankMeasurement]  # index = global rank
    nvml_off_samples: Optional[list[float]] = None  # the same kind of steps without the NVML sampler
    pool_bytes: int = 0  # what the ISP memory pool holds
    loss_reference: Optional[list[float]] = None  # single-process losses of the same steps
    link_curves: list[Any] = field(default_factory=list)  # roofline.Curve list for metrics.roofline

    @property
    def comm(self) -> dict[str, Any]:
        """Rank 0's counted communication (every rank of a cell sends the same per step)."""
        return self.ranks[0].comm
