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
    # {"traces": [...], "active_steps": n, "figures": trace_figures of its own first trace, "memory_snapshot"?}
    profile: Optional[dict[str, Any]] = None
    # its own measured steps (bench/worker/rank_figures.py): {"node", "step_s", "compute_s", "comm_s",
    # "exposed_comm_s"}, one value per step each
    steps: Optional[dict[str, Any]] = None


@dataclass
class Measurement:
    samples: list[float]  # seconds per measured step, the max over ranks
    first_measured_step: int  # index of the first timed step (after warm-up)
    ranks: list[RankMeasurement]  # index = global rank
    # The first measured step indices run again, without then with the sampler (max over ranks):
    nvml_off_samples: Optional[list[float]] = None
    nvml_on_samples: Optional[list[float]] = None
    pool_bytes: int = 0  # what the ISP memory pool holds
    loss_reference: Optional[list[float]] = None  # single-process losses of the same steps
    link_curves: list[Any] = field(default_factory=list)  # roofline.Curve list for metrics.roofline
    attention: Optional[dict[str, Any]] = None  # isp_core.attention.AttentionBackend.as_record()
    loss_check_skipped: Optional[str] = None  # why no reference ran, when none did

    @property
    def comm(self) -> dict[str, Any]:
        """Rank 0's counted communication (every rank of a cell sends the same per step)."""
        return self.ranks[0].comm
