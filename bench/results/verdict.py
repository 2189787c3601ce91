"""The rule that turns two measurements of one metric into "faster", "slower" or "no change".

A change must be both large (beyond a per-metric relative threshold) and real (the
per-step samples of the two runs differ under a two-sided Mann-Whitney U test at
`alpha`), the rule asv uses. Either alone misfires on GPUs: a 10% median shift in
noisy samples is often luck, and a significant 0.5% shift is not worth a red build.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass


NO_CHANGE = "no change"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    higher_is_better: bool
    threshold_pct: float
    better: str  # verdict word when it improved
    worse: str  # verdict word when it regressed
    unit: str
    # Changes smaller than this absolute amount never count: a 0.2 ms exposed-comm
    # wobble is 100% of a near-zero base but nothing anyone should chase.
    abs_floor: float = 0.0
    # Without per-step samples a change has no statistical support. Deterministic metrics
    # (peak memory) may still fail the gate on the threshold; noisy single figures from a
    # couple of profiled steps (exposed comm, overlap) or a sampler (energy) are shown, not gated.
    gate_without_samples: bool = True

    def __post_init__(self) -> None:
        if self.threshold_pct < 0:
            raise ValueError(f"threshold for {self.name} must be >= 0, got {self.threshold_pct}")

    def format(self, value: float | None) -> str:
        if value is None:
            return "-"
        if self.unit == "s":
            return f"{value * 1e3:.2f} ms"
        if self.unit == "bytes":
            return f"{value / 2**30:.2f} GiB"
        if self.unit == "tok/s":
            return f"{value:,.0f}"
        if self.unit == "%":
            return f"{value:.1f}%"
        return f"{value:.4g}"


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("step_time_s", False, 5.0, "faster", "slower", "s"),
    MetricSpec("tokens_per_s", True, 5.0, "faster", "slower", "tok/s"),
    MetricSpec("peak_memory_bytes", False, 5.0, "less", "more", "bytes"),
    MetricSpec("mfu", True, 5.0, "better", "worse", ""),
    MetricSpec("exposed_comm_s", False, 10.0, "better", "worse", "s", abs_floor=1e-3, gate_without_samples=False),
    MetricSpec("overlap_pct", True, 10.0, "better", "worse", "%", abs_floor=1.0, gate_without_samples=False),
    # Where the record keeps it: the NVML section (bench/metrics/assemble.py nvml_metrics).
    MetricSpec("nvml.energy_per_token_j", False, 5.0, "better", "worse", "J", gate_without_samples=False),
)
METRICS_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


@dataclass(frozen=True)
class Verdict:
    word: str  # "slower", "no change", "more (no samples)", ...
    regressed: bool
    improved: bool
    ratio: float | None  # new / base
    p_value: float | None  # None when either side has no samples
    note: str = ""


def rank_test(base: list[float], new: list[float]) -> float:
    """Two-sided Mann-Whitney U p-value; 1.0 where the test has nothing to say."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ties and tiny samples warn; the p-value says enough
        from scipy.stats import mannwhitneyu  # here: scipy.stats takes about 0.8 s to import

        p = float(mannwhitneyu(base, new, alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p) else p


def judge(
    spec: MetricSpec,
    base: float,
    new: float,
    base_samples: list[float] | None,
    new_samples: list[float] | None,
    alpha: float,
    threshold_pct: float | None = None,
) -> Verdict:
    threshold = spec.threshold_pct if threshold_pct is None else threshold_pct
    ratio = new / base if base != 0 else None
    delta = new - base
    rel_pct = abs(delta) / abs(base) * 100 if base != 0 else (math.inf if delta else 0.0)
    has_samples = bool(base_samples) and bool(new_samples)
    p = rank_test(base_samples, new_samples) if has_samples else None  # type: ignore[arg-type]

    if abs(delta) <= spec.abs_floor or rel_pct <= threshold:
        return Verdict(NO_CHANGE, False, False, ratio, p, f"within {threshold:g}%")
    worse = (delta > 0) != spec.higher_is_better
    word = spec.worse if worse else spec.better
    if p is not None and p >= alpha:
        return Verdict(NO_CHANGE, False, False, ratio, p, f"not significant (p={p:.3g} >= {alpha:g})")
    if p is None and not spec.gate_without_samples:
        return Verdict(f"{word} (no samples, not gated)", False, False, ratio, None, "threshold only, not gated")
    if p is None:
        return Verdict(f"{word} (no samples)", worse, not worse, ratio, None, "threshold only")
    return Verdict(word, worse, not worse, ratio, p)
