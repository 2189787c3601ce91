"""What one run folder puts into the history DB: its cells' numbers, statuses and loss curves.

Every ok cell gives the compared metrics with their per-step samples, every other number of
its metrics under a dotted name (for trend plots), the counted-bytes check as 1/0, its loss
curve (the `loss` row: the last step's loss, the curve as its samples) and how many straggler
ranks it had. Every cell, ok or not, gives a status row with its device, the part of its
config that fixes the loss curve, and whether it is a canary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from bench.results.records import Run, flatten, is_canary, metric_samples, metric_value, number
from bench.results.verdict import METRICS

MATCHES_FORMULA = "comm.matches_prediction"  # 1.0 when the counted bytes equal the formula, else 0.0
LOSS = "loss"  # the last measured step's loss; the whole curve is the row's samples
STRAGGLERS = "straggler.count"  # how many straggler ranks metrics.straggler named
# What fixes a cell's loss curve: the same values give the same curve, up to the dtype's tolerance.
# A new config key elsewhere (profiling, timeouts) leaves it alone, so nights stay comparable.
LOSS_KEYS = {"model": None, "data": None, "parallel": ("world_size", "sp", "wp", "strategy"),
             "run": ("device", "dtype", "lr", "warmup_steps")}
Row = tuple[str, str, float, "str | None"]  # cell, metric, value, samples as JSON


def text(value: Any) -> str | None:
    # env.json may describe the GPU as a string or as a dict of details.
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def cell_rows(run: Run) -> Iterator[Row]:
    for cell, record in run.ok_records().items():
        seen: set[str] = set()
        for spec in METRICS:  # the compared metrics, with the samples the rank test needs
            value = metric_value(record, spec.name)
            if value is not None:
                samples = metric_samples(record, spec.name)
                seen.add(spec.name)
                yield cell, spec.name, value, json.dumps(samples) if samples else None
        for name, leaf in flatten(record.get("metrics")).items():  # every other number, for trends
            if name not in seen and isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
                yield cell, name, float(leaf), None
        metrics = record.get("metrics") or {}
        matches = (metrics.get("comm") or {}).get("matches_prediction")
        if isinstance(matches, bool):  # bytes = formula, an exact check for the nightly: 1 or 0
            yield cell, MATCHES_FORMULA, float(matches), None
        yield from _extra_rows(cell, metrics)


def _extra_rows(cell: str, metrics: dict[str, Any]) -> Iterator[Row]:
    """The lists the nightly needs from earlier nights: the loss curve and the straggler count."""
    curve = metrics.get(LOSS)
    if isinstance(curve, list) and curve and all(number(v) is not None for v in curve):
        yield cell, LOSS, float(curve[-1]), json.dumps(curve)
    straggler = metrics.get("straggler")
    if isinstance(straggler, dict) and isinstance(straggler.get("stragglers"), list):
        yield cell, STRAGGLERS, float(len(straggler["stragglers"])), None


def _run_section(record: dict[str, Any]) -> dict[str, Any]:
    run_cfg = (record.get("config") or {}).get("run") or {}
    return run_cfg if isinstance(run_cfg, dict) else {}


def loss_key(record: dict[str, Any]) -> str | None:
    """The part of a cell's config that fixes its loss curve (LOSS_KEYS), as canonical JSON."""
    config = record.get("config")
    if not isinstance(config, dict):
        return None
    picked: dict[str, Any] = {}
    for section, keys in LOSS_KEYS.items():
        values = config.get(section) if isinstance(config.get(section), dict) else {}
        picked[section] = values if keys is None else {k: values.get(k) for k in keys}
    return json.dumps(picked, sort_keys=True)


def status_row(run_id: int, cell: str, record: dict[str, Any]) -> tuple[Any, ...]:
    run_cfg = _run_section(record)
    return (run_id, cell, str(record.get("status")), text(run_cfg.get("device")), loss_key(record),
            "1" if is_canary(record.get("config")) else "0")


def hostnames(env: dict[str, Any]) -> str | None:
    """Every node's hostname, sorted and comma-separated: a several-node env.json lists `nodes`."""
    nodes = env.get("nodes")
    names = [n.get("hostname") for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []
    names = [str(n) for n in names if n] or ([str(env["hostname"])] if env.get("hostname") else [])
    return ",".join(sorted(names)) or None
