"""TensorBoard event files of a run, one TensorBoard run (a folder) per cell.

Written by torch.utils.tensorboard's SummaryWriter, so the files are TensorBoard's own format.
tensorboard is an optional dependency (`pip install -e ".[tensorboard]"`: it brings grpcio and
protobuf, which nothing else here needs); without it the export stops before writing anything.
Per measured step: step time, tokens/s and loss; per cell: MFU, peak memory, exposed comm,
energy per token and the others of export_common.METRICS, at step 0; the swept keys, layout
and env as a text summary. Wall times are the cell's start plus its measured steps, so
TensorBoard's wall-time axis shows when the run happened.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.results.export_common import ExportError, facts, values
from bench.results.records import Run, metric_samples

INSTALL = 'pip install -e ".[tensorboard]"'
PER_STEP = ("step_time_s", "tokens_per_s")  # the rest are one figure per cell


def require_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard imports the tensorboard package
        raise ExportError(f"--format tensorboard needs the tensorboard package ({exc}); install it: {INSTALL}") from None
    return SummaryWriter


def _start(record: dict[str, Any]) -> float:
    text = record.get("started_utc")
    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _write_cell(writer: Any, run: Run, record: dict[str, Any]) -> None:
    t0 = _start(record)
    steps = metric_samples(record, "step_time_s") or []
    walls = [t0 + sum(steps[: i + 1]) for i in range(len(steps))]
    for v in values(record):
        if v.metric.name in PER_STEP and v.samples:
            for i, x in enumerate(v.samples):
                writer.add_scalar(f"step/{v.metric.name}", x, i + 1, walltime=walls[i] if i < len(walls) else t0)
        else:
            writer.add_scalar(f"cell/{v.metric.name}", v.value, 0, walltime=t0)
    losses = (record.get("metrics") or {}).get("loss")
    if isinstance(losses, list):
        for i, x in enumerate(losses):
            if isinstance(x, (int, float)):
                writer.add_scalar("step/loss", x, i + 1, walltime=walls[i] if i < len(walls) else t0)
    table = "\n".join(f"| {k} | {v} |" for k, v in facts(run, record).items())
    writer.add_text("cell", f"| key | value |\n| --- | --- |\n{table}", 0, walltime=t0)


def write_tensorboard(run: Run, out: Path) -> list[Path]:
    """OUT/<cell>/events.out.tfevents.*; a cell folder from an earlier export is replaced whole."""
    SummaryWriter = require_writer()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tensorboard-", dir=out))
    try:
        for cell, record in run.ok_records().items():
            writer = SummaryWriter(log_dir=str(staging / cell))
            try:
                _write_cell(writer, run, record)
            finally:
                writer.close()
        written = []
        for folder in sorted(staging.iterdir()):
            target = out / folder.name
            if target.exists():
                shutil.rmtree(target)
            os.replace(folder, target)
            written += sorted(target.iterdir())
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
