"""The communication roofline of a training cell, from a collectives cell's measured table.

For each (group, kind) a training step communicates (metrics.comm.counted_per_step), the
per-call message is bytes / calls; the measured curve of that op on a group laid out the same
way gives the time of one such call (log-log interpolation between measured sizes); times the
calls, that is the seconds the step would spend in that (group, kind) at the bandwidth the
link delivered in isolation. Next to it: the traced communication time per kind
(metrics.comm_time_s, when profiling was on) and measured / roofline. docs/collectives.md.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config.cell import CellConfig
from bench.results.records import is_canary, latest, read_records

LINKS_FILE = "links.json"  # the curves a training cell's worker gets, beside its config.json
# Better matches first: the very same rank partition, then groups of the same size in a job of
# the same size, then the same group size only.
MATCHES = ("same groups", "same size and world", "same size")


@dataclass(frozen=True)
class Curve:
    """Mean time per call against message size, for one op on one group layout."""

    op: str
    dtype: str
    device: str
    backend: str
    world_size: int
    groups: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]  # bytes, ascending, nccl-tests' convention
    times_s: tuple[float, ...]
    source: str  # "<run>/<cell>"

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    def time_s(self, nbytes: float) -> float:
        """Piecewise linear in (log size, log time) between measured sizes. Clamped outside:
        below the smallest size its time (the latency floor), above the largest its bandwidth
        (time grows in proportion to the bytes)."""
        xs, ts = self.sizes, self.times_s
        if nbytes <= xs[0]:
            return ts[0]
        if nbytes >= xs[-1]:
            return ts[-1] * nbytes / xs[-1]
        i = bisect.bisect_right(xs, nbytes)
        x0, x1, t0, t1 = xs[i - 1], xs[i], ts[i - 1], ts[i]
        w = (math.log(nbytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))


def curves_from_records(records: list[dict[str, Any]], run: str) -> list[Curve]:
    """One curve per op of every ok collectives record (newest record of each cell)."""
    out = []
    for record in latest(records):
        doc = (record.get("metrics") or {}).get("collectives")
        if record.get("status") != "ok" or not isinstance(doc, dict):
            continue
        for op, table in doc["ops"].items():
            rows = sorted((r["size_bytes"], r["time_us"] / 1e6) for r in table["rows"] if r["time_us"] > 0)
            if rows:
                out.append(Curve(op, doc["dtype"], doc["device"], doc["backend"], doc["world_size"],
                                 tuple(tuple(g) for g in doc["group_ranks"]), tuple(s for s, _ in rows),
                                 tuple(t for _, t in rows), f"{run}/{record['cell']}"))
    return out


def load_curves(run_dir: Path, canaries: bool = True) -> list[Curve]:
    """The run's collectives tables; `canaries=False` leaves out canary cells (a nightly's machine
    probe measures a narrow range, and would win ties over --link-profile's full tables)."""
    records = [r for r in read_records(run_dir) if canaries or not is_canary(r.get("config"))]
    return curves_from_records(records, Path(run_dir).name)


def find_curve(curves: list[Curve], op: str, config: CellConfig,
               groups: list[list[int]]) -> tuple[Curve | None, str]:
    """The best curve for `op` on `groups` (dtype, device and backend must agree) and how it
    matched; earlier curves win ties (the runner lists this run's before --link-profile's)."""
    r = config.run
    fits = [c for c in curves if (c.op, c.dtype, c.device, c.backend) == (op, r.dtype, r.device, r.backend)
            and c.group_size == len(groups[0])]
    wanted = tuple(tuple(g) for g in groups)
    for match, test in zip(MATCHES, (lambda c: c.groups == wanted,
                                     lambda c: c.world_size == config.parallel.world_size,
                                     lambda c: True), strict=True):
        for curve in fits:
            if test(curve):
                return curve, match
    return None, (f"no {op} profile of a {len(groups[0])}-rank group in {r.dtype} on "
                  f"{r.device}/{r.backend}")


def roofline(config: CellConfig, metrics: dict[str, Any], curves: list[Curve]) -> dict[str, Any] | None:
    """metrics.roofline of a training cell, or None when it counted no communication."""
    from isp_core.topology import group_layout  # torch: only once a record needs it

    counted = (metrics.get("comm") or {}).get("counted_per_step") or {}
    if not counted:
        return None
    p = config.parallel
    layout = group_layout(p.world_size, p.sp, p.wp)
    entries, unmatched = [], []
    for group, kinds in sorted(counted.items()):
        for kind, c in sorted(kinds.items()):
            base = {"group": group, "kind": kind, "group_size": len(layout[group][0]) if group in layout else None,
                    "calls": c["calls"], "bytes": c["bytes"]}
            if group not in layout:  # a strategy's own group: its ranks are not known here
                unmatched.append({**base, "reason": f"group {group!r} is not one of {', '.join(layout)}"})
                continue
            curve, match = find_curve(curves, kind, config, layout[group])
            if curve is None or c["calls"] == 0:
                unmatched.append({**base, "reason": match if curve is None else "no calls"})
                continue
            message = c["bytes"] / c["calls"]
            per_call = curve.time_s(message)
            entries.append({**base, "message_bytes": message, "time_per_call_s": per_call,
                            "busbw_gbps": _busbw(kind, message, per_call, curve.group_size),
                            "roofline_s": per_call * c["calls"], "profile": curve.source, "match": match})
    measured = metrics.get("comm_time_s") if isinstance(metrics.get("comm_time_s"), dict) else None
    by_kind = {}
    for kind in dict.fromkeys(e["kind"] for e in entries):
        roof = sum(e["roofline_s"] for e in entries if e["kind"] == kind)
        seconds = float(measured.get(kind, 0.0)) if measured is not None else None
        by_kind[kind] = {"roofline_s": roof, "measured_s": seconds, "ratio": _ratio(seconds, roof)}
    total = sum(e["roofline_s"] for e in entries)
    total_measured = sum(k["measured_s"] for k in by_kind.values()) if measured is not None else None
    return {"per_group": entries, "by_kind": by_kind, "roofline_s": total, "measured_s": total_measured,
            "ratio": _ratio(total_measured, total), "complete": not unmatched, "unmatched": unmatched}


def _ratio(measured: float | None, roof: float) -> float | None:
    return measured / roof if measured is not None and roof > 0 else None


def _busbw(kind: str, nbytes: float, seconds: float, n: int) -> float:
    from bench.metrics.formulas import busbw

    return busbw(kind, nbytes, seconds, n)


def curves_to_json(curves: list[Curve]) -> list[dict[str, Any]]:
    """The curves as plain data: the runner hands them to a cell's worker in a file."""
    return [{f: getattr(c, f) for f in Curve.__dataclass_fields__} for c in curves]


def curves_from_json(data: list[dict[str, Any]]) -> list[Curve]:
    return [Curve(**{**d, "groups": tuple(tuple(g) for g in d["groups"]), "sizes": tuple(d["sizes"]),
                     "times_s": tuple(d["times_s"])}) for d in data]
