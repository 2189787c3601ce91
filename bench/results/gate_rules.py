"""The nightly gates that bench/results/gate_accuracy.py scores, each asked of one cell's step
time on each night: "what do you say tonight, knowing only the nights so far?"

A gate answers RED (a code regression: `nightly` would exit 1), STRAGGLER (a change, but the
nights with a straggler rank explain it: exit 3), NOT_JUDGED (the cell was preempted tonight,
or there is too little history: exit 3) or GREEN. `nightly_gate` is `run_bench.py nightly`'s
own rule (bench/results/series_state.py: open regressions, straggler nights left out); the
others are the previous nightly rule and today's `compare` rules, for comparison. A preempted
night has no value: every gate skips it, as the history DB has no point for it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.results.changepoint import DetectorSettings, evaluate_splits, latest_change, noise_sigma
from bench.results.series_state import judge_values
from bench.results.verdict import METRICS_BY_NAME, judge

RED, STRAGGLER, NOT_JUDGED, GREEN = "red", "straggler", "not judged", "green"
STEP = METRICS_BY_NAME["step_time_s"]


@dataclass(frozen=True)
class Night:
    value: float  # the night's median step time, as the worker records it
    samples: tuple[float, ...]
    straggler: bool = False  # the record named a straggler rank (its lag is in the value)
    preempted: bool = False  # interrupted by the scheduler: no record, no value


Gate = Callable[[Sequence[Night]], str]  # nights up to tonight -> tonight's verdict


def measured(nights: Sequence[Night], min_history: int) -> list[Night] | None:
    """The nights with a value, when tonight is one of them and K earlier ones exist; else None."""
    if nights[-1].preempted:
        return None
    kept = [n for n in nights if not n.preempted]
    return kept if len(kept) > min_history else None


def nightly_gate(settings: DetectorSettings, recent: int, min_history: int = 5) -> Gate:
    """`run_bench.py nightly`: red while a code regression is open; straggler-only ones are amber."""
    def verdict(nights: Sequence[Night]) -> str:
        kept = measured(nights, min_history)
        if kept is None:
            return NOT_JUDGED
        state = judge_values([n.value for n in kept], settings, recent, higher_is_better=False,
                             stragglers=[n.straggler for n in kept])
        if any(not o.straggler_only for o in state.open):
            return RED
        return STRAGGLER if state.open else GREEN
    return verdict


def _red(test: Callable[[list[Night]], bool], min_history: int) -> Gate:
    def verdict(nights: Sequence[Night]) -> str:
        kept = measured(nights, min_history)
        return NOT_JUDGED if kept is None else RED if test(kept) else GREEN
    return verdict


def changepoint_gate(settings: DetectorSettings, recent: int, min_history: int = 5) -> Gate:
    """The nightly's previous rule: a change point is news (red) for `recent` nights from its start."""
    def red(nights: list[Night]) -> bool:
        cp = latest_change([n.value for n in nights], settings, recent)
        return cp is not None and cp.rel_change > 0
    return _red(red, min_history)


def pelt_gate(settings: DetectorSettings, recent: int, beta: float, min_history: int = 5) -> Gate:
    """ruptures' PELT places the splits (l2 cost on log values, penalty beta * sigma^2 * log n);
    the same size, p and effect tests as our own detector then keep or drop them."""
    import numpy as np
    import ruptures

    def red(nights: list[Night]) -> bool:
        y = np.log([n.value for n in nights]).reshape(-1, 1)
        sigma = noise_sigma(y[:, 0].tolist())
        ends = ruptures.Pelt(model="l2", min_size=1, jump=1).fit(y).predict(pen=beta * sigma**2 * math.log(len(y)))
        points = evaluate_splits([n.value for n in nights], ends[:-1], settings)
        return bool(points) and points[-1].index >= len(nights) - recent and points[-1].rel_change > 0
    return _red(red, min_history)


def pairwise_gate(alpha: float = 0.05, min_history: int = 5) -> Gate:
    """Today's `compare LAST_NIGHT TONIGHT`: 5% and Mann-Whitney p < alpha on the step samples."""
    def red(nights: list[Night]) -> bool:
        b, n = nights[-2], nights[-1]
        return judge(STEP, b.value, n.value, list(b.samples), list(n.samples), alpha).regressed
    return _red(red, min_history)


def history_gate(n_runs: int = 7, alpha: float = 0.05, min_history: int = 5) -> Gate:
    """Today's `compare --against-history N`: median of the last N nights, their samples pooled."""
    def red(nights: list[Night]) -> bool:
        past, new = nights[-1 - n_runs:-1], nights[-1]
        base = statistics.median(p.value for p in past)
        pooled = [s for p in past for s in p.samples]
        return judge(STEP, base, new.value, pooled, list(new.samples), alpha).regressed
    return _red(red, min_history)
