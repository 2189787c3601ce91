"""A run folder in the formats other teams' tools ingest: `run_bench.py export` (docs/export.md).

pytorch-oss and github-action-benchmark are JSON (bench/results/export_json.py), tensorboard
is event files written by torch.utils.tensorboard (bench/results/export_tensorboard.py).
Bad input (unknown format, missing or torn run folder, --out a file) is an ExportError before
anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.results import export_json, export_tensorboard
from bench.results.export_common import ExportError, load_exportable
from bench.results.records import Run

WRITERS: dict[str, Callable[[Run, Path], list[Path]]] = {
    "pytorch-oss": export_json.write_pytorch_oss,
    "github-action-benchmark": export_json.write_gab,
    "tensorboard": export_tensorboard.write_tensorboard,
}
FORMATS = tuple(WRITERS)


def default_out(run_dir: Path, fmt: str) -> Path:
    return run_dir / "exports" / fmt


def export(run_dir: Path | str, fmt: str, out: Path | None = None) -> list[Path]:
    """Write RUN_DIR in format `fmt` into the folder `out`; returns the files written."""
    if fmt not in WRITERS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    run = load_exportable(run_dir)
    out = out if out is not None else default_out(Path(run_dir), fmt)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder (--out names a folder)")
    if fmt == "tensorboard":
        export_tensorboard.require_writer()  # before anything is written
    return WRITERS[fmt](run, out)
