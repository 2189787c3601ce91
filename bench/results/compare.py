"""Judge a run against another run, or against its recorded history (`run_bench.py compare`,
whose exit codes are in bench/cli/compare.py)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.results.history import history_points, list_runs, pooled_samples
from bench.results.records import Run, flatten, metric_samples, metric_value
from bench.results.verdict import METRICS, MetricSpec, Verdict, judge

ENV_KEYS = ("python", "torch", "cuda", "nccl", "driver", "gpu", "hostname", "git_commit", "git_dirty")
HISTORY_ENV_KEYS = ("torch", "gpu", "driver", "hostname", "git_commit")  # what the runs table keeps


@dataclass
class CellData:
    status: str
    values: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float] | None] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # flattened resolved config
    error: Any = None


@dataclass
class Side:
    label: str
    cells: dict[str, CellData]
    env: dict[str, str]  # display strings; several history runs join their distinct values
    identity: tuple[str, ...] = ()  # strings that name the run itself, ignored in config diffs


@dataclass
class Row:
    cell: str
    spec: MetricSpec
    base: float | None
    new: float | None
    verdict: Verdict


@dataclass
class Comparison:
    base_label: str
    new_label: str
    env_diff: list[tuple[str, str, str]]
    config_diff: list[tuple[str, str, str, list[str]]]  # key, base, new, cells
    only_base: list[str]
    only_new: list[str]
    failed: list[tuple[str, str, str, bool, str]]  # cell, base status, new status, regressed, error
    rows: list[Row]
    n_matched: int
    notes: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return any(r.verdict.regressed for r in self.rows) or any(f[3] for f in self.failed)


def side_from_run(run: Run) -> Side:
    cells = {}
    for cell, rec in run.records.items():
        data = CellData(status=str(rec.get("status")), config=flatten(rec.get("config")), error=rec.get("error"))
        if data.status == "ok":
            for spec in METRICS:
                value = metric_value(rec, spec.name)
                if value is not None:
                    data.values[spec.name] = value
                    data.samples[spec.name] = metric_samples(rec, spec.name)
        cells[cell] = data
    env = {k: str(run.env[k]) for k in ENV_KEYS if k in run.env}
    return Side(run.name, cells, env, identity=(run.name,))


def side_from_history(db: Path, new: Run, n: int) -> Side:
    """Per cell and metric, the median of the last n recorded runs of the same config, samples pooled."""


    cells: dict[str, CellData] = {}
    used: set[int] = set()
    for cell in new.records:
        data = CellData(status="ok")
        for spec in METRICS:
            points = history_points(
                db, cell, spec.name, n, before_utc=new.utc, config_name=new.config_name, exclude_path=new.path
            )
            if points:
                data.values[spec.name] = statistics.median(p.value for p in points)
                data.samples[spec.name] = pooled_samples(points)
                used.update(p.run_id for p in points)
        if data.values:
            cells[cell] = data
    runs = [r for r in list_runs(db) if r["id"] in used]
    env = {}
    for key in HISTORY_ENV_KEYS:
        distinct = sorted({str(r[key]) for r in runs if r[key] is not None})
        if distinct:
            env[key] = " | ".join(distinct)
    names = ", ".join(r["name"] for r in runs) or "none"
    return Side(f"median of last {n} recorded runs of '{new.config_name}' ({names})", cells, env)


def _env_diff(base: Side, new: Side) -> list[tuple[str, str, str]]:
    keys = [k for k in ENV_KEYS if k in base.env or k in new.env]
    return [(k, base.env.get(k, "-"), new.env.get(k, "-")) for k in keys if base.env.get(k) != new.env.get(k)]


def _mentions(value: Any, names: tuple[str, ...]) -> bool:
    return isinstance(value, str) and any(name in value for name in names)


def _config_diff(base: Side, new: Side, matched: list[str]) -> list[tuple[str, str, str, list[str]]]:
    """Differing resolved config keys over matched cells, grouped so a global change prints once."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for cell in matched:
        b, n = base.cells[cell].config, new.cells[cell].config
        if not b or not n:
            continue  # history keeps no configs
        for key in sorted(b.keys() | n.keys()):
            bv, nv = b.get(key, "-"), n.get(key, "-")
            # Output folders and run names always differ; they are identity, not configuration.
            if bv != nv and not (_mentions(bv, base.identity) or _mentions(nv, new.identity)):
                grouped.setdefault((key, repr(bv), repr(nv)), []).append(cell)
    return [(k, bv, nv, cells) for (k, bv, nv), cells in grouped.items()]


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        kind, message = error.get("type", ""), str(error.get("message", "")).strip().splitlines()
        text = f"{kind}: {message[0]}" if kind and message else kind or (message[0] if message else "")
    else:
        text = "" if error is None else str(error)
    return text if len(text) <= 100 else text[:97] + "..."


def _missing(where: str) -> Verdict:
    # A metric that vanished may hide a regression, so it is shown, but it cannot be judged.
    return Verdict(f"missing in {where}", False, False, None, None)


def compare(base: Side, new: Side, alpha: float, thresholds: dict[str, float]) -> Comparison:
    matched = [c for c in new.cells if c in base.cells]
    result = Comparison(
        base_label=base.label,
        new_label=new.label,
        env_diff=_env_diff(base, new),
        config_diff=_config_diff(base, new, matched),
        only_base=[c for c in base.cells if c not in new.cells],
        only_new=[c for c in new.cells if c not in base.cells],
        failed=[],
        rows=[],
        n_matched=len(matched),
    )
    for cell in matched:
        b, n = base.cells[cell], new.cells[cell]
        if b.status != "ok" or n.status != "ok":
            result.failed.append((cell, b.status, n.status, b.status == "ok", _error_text(n.error or b.error)))
            continue
        for spec in METRICS:
            bv, nv = b.values.get(spec.name), n.values.get(spec.name)
            if bv is None and nv is None:
                continue
            if bv is None or nv is None:
                verdict = _missing("base" if bv is None else "new")
            else:
                verdict = judge(spec, bv, nv, b.samples.get(spec.name), n.samples.get(spec.name), alpha,
                                thresholds.get(spec.name))
            result.rows.append(Row(cell, spec, bv, nv, verdict))
    return result
