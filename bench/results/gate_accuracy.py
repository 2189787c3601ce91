"""How often does a nightly gate catch a real slowdown, and how often does it cry wolf?

    python -m bench.results.gate_accuracy RUN_DIR [RUN_DIR ...] [--series 200] [--seed 0]
    python -m bench.results.gate_accuracy --pool tests/support/data/step_noise_pool.json

Noise comes from real runs: every ok cell of every given run folder contributes its
step-time samples divided by that cell's median level over all the runs, so one "night"
of a synthetic history is one real (run, cell) measurement, rescaled. That keeps both
the spread inside a run and the drift between runs of this machine. Each history draws
its nights from that pool (each night as measured: resampling its steps would add the
within-run noise a second time), multiplies them by a base step time and, from a known night on, by 1 + shift.

Every gate is asked each night, from the K-th on, "is tonight a regression?", knowing
only the nights up to tonight, as a nightly job would. Reported per gate: detection rate
per shift (a red night on or after the shift, within the nights simulated), the share
caught within 2 nights (the first shifted night counts as 1), the median delay, and
red nights per 100 noise-only nights.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.results.records import load_run, metric_samples, metric_value
from bench.results.changepoint import DetectorSettings, evaluate_splits, latest_change
from bench.results.verdict import METRICS_BY_NAME, judge

SHIFTS = (0.03, 0.05, 0.10, 0.20)
STEP = METRICS_BY_NAME["step_time_s"]


@dataclass(frozen=True)
class Night:
    value: float  # the night's median step time, as the worker records it
    samples: tuple[float, ...]


Gate = Callable[[Sequence[Night]], bool]  # nights up to tonight -> red tonight


def noise_pool(run_dirs: Sequence[Path | str]) -> list[list[float]]:
    """Per (run, cell): step-time samples relative to the cell's median level across runs."""
    per_cell: dict[str, list[list[float]]] = {}
    for run_dir in run_dirs:
        for cell, rec in load_run(run_dir).ok_records().items():
            samples = metric_samples(rec, "step_time_s")
            if samples and metric_value(rec, "step_time_s"):
                per_cell.setdefault(cell, []).append(samples)
    pool = []
    for runs in per_cell.values():
        level = statistics.median(statistics.median(s) for s in runs)
        pool.extend([v / level for v in s] for s in runs)
    if len(pool) < 2:
        raise ValueError("need at least two ok (run, cell) measurements with step-time samples")
    return pool


def scaled(pool: Sequence[list[float]], factor: float) -> list[list[float]]:
    """The same nights with every deviation from the cell's level times `factor` (a quieter machine)."""
    return [[1.0 + factor * (v - 1.0) for v in atom] for atom in pool]


def make_history(pool: Sequence[list[float]], rng: random.Random, nights: int, shift: float = 0.0,
                 start: int | None = None, base: float = 0.1) -> list[Night]:
    out = []
    for i in range(nights):
        atom = rng.choice(pool)
        scale = base * (1.0 + shift if start is not None and i >= start else 1.0)
        steps = tuple(scale * v for v in atom)  # a real night as measured, not resampled
        out.append(Night(statistics.median(steps), steps))
    return out


def changepoint_gate(settings: DetectorSettings, recent: int) -> Gate:
    def red(nights: Sequence[Night]) -> bool:
        cp = latest_change([n.value for n in nights], settings, recent)
        return cp is not None and cp.rel_change > 0
    return red


def pelt_gate(settings: DetectorSettings, recent: int, beta: float) -> Gate:
    """ruptures' PELT places the splits (l2 cost on log values, penalty beta * sigma^2 * log n);
    the same size, p and effect tests as our own detector then keep or drop them."""
    import math

    import numpy as np
    import ruptures

    from bench.results.changepoint import noise_sigma

    def red(nights: Sequence[Night]) -> bool:
        y = np.log([n.value for n in nights]).reshape(-1, 1)
        sigma = noise_sigma(y[:, 0].tolist())
        ends = ruptures.Pelt(model="l2", min_size=1, jump=1).fit(y).predict(pen=beta * sigma**2 * math.log(len(y)))
        points = evaluate_splits([n.value for n in nights], ends[:-1], settings)
        return bool(points) and points[-1].index >= len(nights) - recent and points[-1].rel_change > 0
    return red


def pairwise_gate(alpha: float = 0.05) -> Gate:
    """Today's `compare LAST_NIGHT TONIGHT`: 5% and Mann-Whitney p < alpha on the step samples."""
    def red(nights: Sequence[Night]) -> bool:
        b, n = nights[-2], nights[-1]
        return judge(STEP, b.value, n.value, list(b.samples), list(n.samples), alpha).regressed
    return red


def history_gate(n_runs: int = 7, alpha: float = 0.05) -> Gate:
    """Today's `compare --against-history N`: median of the last N nights, their samples pooled."""
    def red(nights: Sequence[Night]) -> bool:
        past, new = nights[-1 - n_runs:-1], nights[-1]
        base = statistics.median(p.value for p in past)
        pooled = [s for p in past for s in p.samples]
        return judge(STEP, base, new.value, pooled, list(new.samples), alpha).regressed
    return red


@dataclass
class Score:
    caught: dict[float, int] = field(default_factory=dict)
    within2: dict[float, int] = field(default_factory=dict)
    delays: dict[float, list[int]] = field(default_factory=dict)
    trials: dict[float, int] = field(default_factory=dict)
    noise_nights: int = 0
    noise_red: int = 0

    def false_per_100(self) -> float:
        return 100.0 * self.noise_red / self.noise_nights if self.noise_nights else float("nan")


@dataclass(frozen=True)
class Plan:
    series: int = 200  # histories per shift size, and noise-only histories
    nights: int = 40  # length of a noise-only history
    min_history: int = 5  # K: nights needed before the first judgement
    after: int = 5  # nights simulated from the shift on
    first_shift: int = 10
    last_shift: int = 30
    seed: int = 0


def score(gate: Gate, pool: Sequence[list[float]], plan: Plan) -> Score:
    """Same seed, same histories for every gate: differences are the gates', not the draws'."""
    rng, result = random.Random(plan.seed), Score()
    for _ in range(plan.series):
        nights = make_history(pool, rng, plan.nights)
        for t in range(plan.min_history, plan.nights):
            result.noise_nights += 1
            result.noise_red += gate(nights[: t + 1])
    for shift in SHIFTS:
        for _ in range(plan.series):
            start = rng.randint(plan.first_shift, plan.last_shift)
            nights = make_history(pool, rng, start + plan.after, shift, start)
            delay = next((t - start + 1 for t in range(start, len(nights)) if gate(nights[: t + 1])), None)
            result.trials[shift] = result.trials.get(shift, 0) + 1
            if delay is not None:
                result.caught[shift] = result.caught.get(shift, 0) + 1
                result.within2[shift] = result.within2.get(shift, 0) + (delay <= 2)
                result.delays.setdefault(shift, []).append(delay)
    return result


def default_gates(recent: int = 3, with_pelt: bool = True) -> dict[str, Gate]:
    gates = {
        "change points (ours)": changepoint_gate(DetectorSettings(), recent),
        "compare (pairwise, last night)": pairwise_gate(),
        "compare --against-history 7": history_gate(7),
    }
    if with_pelt:
        try:
            import ruptures  # noqa: F401
        except ImportError:
            return gates
        gates["PELT (ruptures) + our tests"] = pelt_gate(DetectorSettings(), recent, beta=2.0)
    return gates


def night_spread(pool: Sequence[list[float]]) -> float:
    """Robust sd (MAD * 1.4826) of the nights' medians, relative to their level."""
    medians = [statistics.median(a) for a in pool]
    centre = statistics.median(medians)
    return 1.4826 * statistics.median(abs(m - centre) for m in medians) / centre


def table(results: dict[str, Score], plan: Plan) -> str:
    head = ["gate", *(f"{s:.0%} caught / in 2 / delay" for s in SHIFTS), "false alarms /100 nights"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        cells = [name]
        for s in SHIFTS:
            n = r.trials.get(s, 0) or 1
            delay = statistics.median(r.delays[s]) if r.delays.get(s) else float("nan")
            cells.append(f"{r.caught.get(s, 0) / n:.0%} / {r.within2.get(s, 0) / n:.0%} / {delay:.0f}")
        cells.append(f"{r.false_per_100():.2f} ({r.noise_red}/{r.noise_nights})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.results.gate_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR")
    parser.add_argument("--pool", type=Path, help="noise pool saved by --save-pool, instead of run folders")
    parser.add_argument("--save-pool", type=Path, help="write the runs' noise pool as JSON and go on")
    parser.add_argument("--series", type=int, default=Plan.series)
    parser.add_argument("--seed", type=int, default=Plan.seed)
    parser.add_argument("--noise-scale", type=float, nargs="+", default=[1.0],
                        help="one table per factor on each night's deviation from its level (below 1: a quieter machine)")
    parser.add_argument("--recent", type=int, default=3, help="a change point is news for this many nights")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.pool):
        parser.error("give RUN_DIRs or --pool FILE")
    real = json.loads(args.pool.read_text())["pool"] if args.pool else noise_pool(args.runs)
    if args.save_pool:
        names = [p.name for p in args.runs]
        args.save_pool.write_text(json.dumps({"runs": names, "pool": real}) + "\n")
    plan = Plan(series=args.series, seed=args.seed)
    print(f"{len(real)} real (run, cell) nights, {plan.series} histories per row, K = {plan.min_history}, "
          f"a change is news for {args.recent} nights")
    for factor in args.noise_scale:
        pool = scaled(real, factor)
        results = {name: score(gate, pool, plan) for name, gate in default_gates(args.recent).items()}
        print(f"\nnoise x{factor:g}: night-to-night spread {night_spread(pool):.1%} (robust sd of nights' medians)\n")
        print(table(results, plan), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
