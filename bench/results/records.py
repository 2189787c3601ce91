"""A run folder's records: written here (one fsync'ed line per cell) and read back here.

Reports, comparisons and the history DB read only what this module returns, never
logs, so a run folder is the whole contract between measuring and judging. A last line cut
short by a crash is a torn tail, not corruption: bench/results/torn.py.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.results.torn import torn_tail, warn_once, warn_torn

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "cell", "status")

# Rates are inversely proportional to step time, so each measured step gives one
# rate sample; this lets the rank test back a throughput or MFU verdict too.
RATE_METRICS = ("tokens_per_s", "mfu", "tflops_per_rank")
STEP_TIME = "step_time_s"


class RecordError(Exception):
    """A run folder that cannot be read; str() is "FILE:LINE: reason" for editors and CI logs."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")


@dataclass
class Run:
    path: Path
    name: str
    records: dict[str, dict[str, Any]]  # cell id -> its last record
    env: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""

    @property
    def utc(self) -> str | None:
        """When the run started: env.json's stamp, else the earliest cell start."""
        if self.env.get("utc"):
            return str(self.env["utc"])
        starts = [str(r["started_utc"]) for r in self.records.values() if r.get("started_utc")]
        return min(starts) if starts else None

    @property
    def config_name(self) -> str:
        """The configuration's name, so history compares a nightly only with earlier nightlies."""
        try:
            cfg = yaml.safe_load(self.config_text) if self.config_text else None
        except yaml.YAMLError:
            cfg = None
        if isinstance(cfg, dict):
            section = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
            for candidate in (cfg.get("name"), section.get("name")):
                if isinstance(candidate, str) and candidate:
                    return candidate
        # Folder names are "<UTC timestamp>_<name>"; the stamp differs run to run.
        match = re.match(r"^\d[0-9TZtz:.\-]*_(.+)$", self.name)
        return match.group(1) if match else self.name

    def ok_records(self) -> dict[str, dict[str, Any]]:
        return {c: r for c, r in self.records.items() if r.get("status") == "ok" and r.get("metrics")}


def _parse_line(path: Path, lineno: int, text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(path, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(path, lineno, f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise RecordError(path, lineno, f"record lacks required key(s): {', '.join(missing)}")
    if record["schema_version"] != SCHEMA_VERSION:
        raise RecordError(
            path, lineno, f"unsupported schema_version {record['schema_version']!r} (this reader knows {SCHEMA_VERSION})"
        )
    if not isinstance(record["cell"], str) or not record["cell"]:
        raise RecordError(path, lineno, "'cell' must be a non-empty string")
    if record.get("metrics") is not None and not isinstance(record["metrics"], dict):
        raise RecordError(path, lineno, "'metrics' must be an object or null")
    return record


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records by cell; a resumed run appends a re-run cell, so the last line for a cell wins.

    A torn tail (see torn_tail) is left out with a warning on stderr; any other bad line is
    a RecordError naming the file and line.
    """
    data = path.read_bytes()
    torn = torn_tail(path, data)
    complete = data[: torn.offset] if torn else data
    records: dict[str, dict[str, Any]] = {}
    for lineno, text in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        record = _parse_line(path, lineno, text)
        records.pop(record["cell"], None)  # re-insert so order follows the latest attempt
        records[record["cell"]] = record
    if torn:
        warn_torn(torn)
    return records


def _load_env(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}  # an interrupted run may not have written it; comparisons just show less
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
    if not isinstance(env, dict):
        raise RecordError(path, 1, "expected a JSON object")
    return env


def load_run(run_dir: Path | str) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecordError(run_dir, None, "run folder not found")
    results = run_dir / "results.jsonl"
    if not results.is_file():
        raise RecordError(results, None, "results file not found")
    config = run_dir / "config.yaml"
    return Run(
        path=run_dir,
        name=run_dir.name,
        records=load_records(results),
        env=_load_env(run_dir / "env.json"),
        config_text=config.read_text(encoding="utf-8") if config.is_file() else "",
    )


def lookup(metrics: Any, name: str) -> Any:
    """The node at a dotted path ('step_time_s.median') of a metrics tree, or None when absent."""
    node = metrics
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_canary(config: Any) -> bool:
    """Whether a record's config marks a canary cell (`run.canary: true`, a machine probe)."""
    run = config.get("run") if isinstance(config, dict) else None
    return isinstance(run, dict) and run.get("canary") is True


def number(value: Any) -> float | None:
    # bool is an int in Python, but a flag is never a measurement.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def metric_value(record: dict[str, Any], name: str) -> float | None:
    """A metric by dotted name; a timing summary (a dict with a median) stands for its median."""
    node = lookup(record.get("metrics"), name)
    if isinstance(node, dict):
        node = node.get("median")
    return number(node)


def _samples_of(node: Any) -> list[float] | None:
    if not isinstance(node, dict) or not isinstance(node.get("samples"), list):
        return None
    values = [number(v) for v in node["samples"]]
    clean = [v for v in values if v is not None]
    return clean or None


def metric_samples(record: dict[str, Any], name: str) -> list[float] | None:
    """Per-step samples behind a metric, or None when it is a single value.

    `step_time_s` (and `step_time_s.median` etc.) give the step-time samples. A rate
    metric gets one sample per step, value * median_step / step_i, whose median is
    the recorded value: rank tests are invariant to such monotone maps.
    """
    metrics = record.get("metrics")
    node = lookup(metrics, name)
    own = _samples_of(node)
    if own is not None:
        return own
    parent = name.rsplit(".", 1)[0] if "." in name else None
    if parent is not None:
        parent_samples = _samples_of(lookup(metrics, parent))
        if parent_samples is not None:
            return parent_samples
    if name in RATE_METRICS:
        value = metric_value(record, name)
        steps = _samples_of(lookup(metrics, STEP_TIME))
        if value is not None and steps and all(s > 0 for s in steps):
            mid = statistics.median(steps)
            return [value * mid / s for s in steps]
    return None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}; lists stay whole leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


# The tolerant reader, for a run still in progress or cut short: the runner (resume), the
# summary and the roofline use it; compare and history use load_run, which names FILE:LINE.
def read_records(run_dir: Path | str) -> list[dict[str, Any]]:
    """Every record in file order; a torn tail or a bad line is skipped with a warning, not fatal."""
    path = Path(run_dir) / "results.jsonl"
    if not path.exists():
        return []
    data = path.read_bytes()
    torn = torn_tail(path, data)
    records = []
    lines = (data[: torn.offset] if torn else data).decode("utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and "cell" in record:
            records.append(record)
        elif line.strip():
            warn_once(f"{path}:{lineno}: warning: not a record, skipped")
    if torn:
        warn_torn(torn)
    return records


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record of each cell (a resumed cell's re-run wins), in first-run order."""
    newest: dict[str, dict[str, Any]] = {}
    for record in records:
        newest[record["cell"]] = record  # a dict keeps the first insertion's position
    return list(newest.values())


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One synced write of one line, on a line of its own: the file gains the whole record or,
    when the write fails (ENOSPC, EIO), nothing; the OSError goes to the caller."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # never glue a record onto a line without its newline
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # drop the part that made it: no half-written record
            raise
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write, fsync, then rename over `path`: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
