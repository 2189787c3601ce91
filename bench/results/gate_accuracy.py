"""How often does a nightly gate catch a real slowdown, and how often does it cry wolf?

    python -m bench.results.gate_accuracy RUN_DIR [RUN_DIR ...] [--series 200] [--seed 0]
    python -m bench.results.gate_accuracy --pool tests/support/data/step_noise_pool.json

Noise comes from real runs: every ok cell of every given run folder contributes its
step-time samples divided by that cell's median level over all the runs, so one "night"
of a synthetic history is one real (run, cell) measurement, rescaled. That keeps both
the spread inside a run and the drift between runs of this machine. Each history draws
its nights from that pool (each night as measured: resampling its steps would add the
within-run noise a second time), multiplies them by a base step time and, from a known night on, by 1 + shift.

A cluster adds two kinds of night (drawn from their own random stream, so with both rates at
0 the histories are the same as without them): a night with a straggler rank (1 in 10 by
default: the step time is up by a lag drawn uniformly from 5% to 25% and the record names
the straggler) and a preempted night (1 in 10: the cell is interrupted, there is no value).

Every gate (bench/results/gate_rules.py) is asked each night, from the K-th on, what it says
tonight, knowing only the nights up to tonight, as a nightly job would. Reported per gate:
detection rate per shift (a red night on or after the shift, within the nights simulated), the
share caught within 2 nights (the first shifted night counts as 1), within 2 clean nights
(nights neither preempted nor with a straggler), the median delay, red nights per 100
noise-only nights (false alarms) and straggler-labelled nights per 100.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.results.changepoint import DetectorSettings
from bench.results.gate_rules import (RED, STRAGGLER, Gate, Night, changepoint_gate, history_gate,  # noqa: F401
                                      nightly_gate, pairwise_gate, pelt_gate)
from bench.results.records import load_run, metric_samples, metric_value

SHIFTS = (0.03, 0.05, 0.10, 0.20)


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


@dataclass(frozen=True)
class Plan:
    series: int = 200  # histories per shift size, and noise-only histories
    nights: int = 40  # length of a noise-only history
    min_history: int = 5  # K: nights needed before the first judgement
    after: int = 5  # nights simulated from the shift on
    first_shift: int = 10
    last_shift: int = 30
    seed: int = 0
    straggler_rate: float = 0.1  # nights with a straggler rank
    preempt_rate: float = 0.1  # nights the cell is interrupted
    lag: tuple[float, float] = (0.05, 0.25)  # a straggler night's step time is up by U(lag)


def make_history(pool: Sequence[list[float]], rng: random.Random, nights: int, shift: float = 0.0,
                 start: int | None = None, base: float = 0.1, events: random.Random | None = None,
                 plan: Plan = Plan()) -> list[Night]:
    out = []
    for i in range(nights):
        atom = rng.choice(pool)
        scale = base * (1.0 + shift if start is not None and i >= start else 1.0)
        preempted = events is not None and events.random() < plan.preempt_rate
        straggler = events is not None and not preempted and events.random() < plan.straggler_rate
        if straggler:
            scale *= 1.0 + events.uniform(*plan.lag)  # type: ignore[union-attr]
        steps = tuple(scale * v for v in atom)  # a real night as measured, not resampled
        out.append(Night(statistics.median(steps), steps, straggler, preempted))
    return out


@dataclass
class Score:
    caught: dict[float, int] = field(default_factory=dict)
    within2: dict[float, int] = field(default_factory=dict)  # by the second night from the shift on
    within2_clean: dict[float, int] = field(default_factory=dict)  # by the second clean night
    delays: dict[float, list[int]] = field(default_factory=dict)
    trials: dict[float, int] = field(default_factory=dict)
    noise_nights: int = 0
    noise_red: int = 0
    noise_straggler: int = 0

    def false_per_100(self) -> float:
        return 100.0 * self.noise_red / self.noise_nights if self.noise_nights else float("nan")

    def add(self, counts: dict[float, int], shift: float, n: int = 1) -> None:
        counts[shift] = counts.get(shift, 0) + n


def _delay(gate: Gate, nights: list[Night], start: int) -> tuple[int, int] | None:
    """(nights, clean nights) from the shift to the first red night, both counting it; None: never."""
    clean = 0
    for t in range(start, len(nights)):
        clean += not (nights[t].preempted or nights[t].straggler)
        if gate(nights[: t + 1]) == RED:
            return t - start + 1, clean
    return None


def score(gate: Gate, pool: Sequence[list[float]], plan: Plan) -> Score:
    """Same seed, same histories for every gate: differences are the gates', not the draws'."""
    rng, events, result = random.Random(plan.seed), random.Random(plan.seed + 1), Score()
    for _ in range(plan.series):
        nights = make_history(pool, rng, plan.nights, events=events, plan=plan)
        for t in range(plan.min_history, plan.nights):
            said = gate(nights[: t + 1])
            result.noise_nights += 1
            result.noise_red += said == RED
            result.noise_straggler += said == STRAGGLER
    for shift in SHIFTS:
        for _ in range(plan.series):
            start = rng.randint(plan.first_shift, plan.last_shift)
            nights = make_history(pool, rng, start + plan.after, shift, start, events=events, plan=plan)
            found = _delay(gate, nights, start)
            result.add(result.trials, shift)
            if found is not None:
                result.add(result.caught, shift)
                result.add(result.within2, shift, found[0] <= 2)
                result.add(result.within2_clean, shift, found[1] <= 2)
                result.delays.setdefault(shift, []).append(found[0])
    return result


def default_gates(recent: int = 3, with_pelt: bool = True) -> dict[str, Gate]:
    gates = {
        "nightly (ours: open regressions, stragglers left out)": nightly_gate(DetectorSettings(), recent),
        "change points, news for 3 nights (previous nightly)": changepoint_gate(DetectorSettings(), recent),
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
    head = ["gate", *(f"{s:.0%} caught / in 2 / in 2 clean / delay" for s in SHIFTS), "false alarms /100 nights",
            "straggler-labelled /100"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        cells = [name]
        for s in SHIFTS:
            n = r.trials.get(s, 0) or 1
            delay = statistics.median(r.delays[s]) if r.delays.get(s) else float("nan")
            cells.append(f"{r.caught.get(s, 0) / n:.0%} / {r.within2.get(s, 0) / n:.0%} / "
                         f"{r.within2_clean.get(s, 0) / n:.0%} / {delay:.0f}")
        cells.append(f"{r.false_per_100():.2f} ({r.noise_red}/{r.noise_nights})")
        cells.append(f"{100.0 * r.noise_straggler / (r.noise_nights or 1):.2f}")
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
    parser.add_argument("--stragglers", type=float, default=Plan.straggler_rate, metavar="RATE",
                        help=f"share of nights with a straggler rank (default {Plan.straggler_rate:g})")
    parser.add_argument("--preempted", type=float, default=Plan.preempt_rate, metavar="RATE",
                        help=f"share of nights the cell is interrupted (default {Plan.preempt_rate:g})")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.pool):
        parser.error("give RUN_DIRs or --pool FILE")
    real = json.loads(args.pool.read_text())["pool"] if args.pool else noise_pool(args.runs)
    if args.save_pool:
        names = [p.name for p in args.runs]
        args.save_pool.write_text(json.dumps({"runs": names, "pool": real}) + "\n")
    plan = Plan(series=args.series, seed=args.seed, straggler_rate=args.stragglers, preempt_rate=args.preempted)
    print(f"{len(real)} real (run, cell) nights, {plan.series} histories per row, K = {plan.min_history}, "
          f"a change is news for {args.recent} nights (previous rule); {plan.straggler_rate:.0%} of nights with a "
          f"straggler (+{plan.lag[0]:.0%} to +{plan.lag[1]:.0%}), {plan.preempt_rate:.0%} preempted")
    for factor in args.noise_scale:
        pool = scaled(real, factor)
        results = {name: score(gate, pool, plan) for name, gate in default_gates(args.recent).items()}
        print(f"\nnoise x{factor:g}: night-to-night spread {night_spread(pool):.1%} (robust sd of nights' medians)\n")
        print(table(results, plan), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
