"""Runs one benchmark cell on every rank of a torchrun job and writes its result.

    python -m torch.distributed.run --nproc-per-node=N -m bench.worker \
        --cell-config RUN/cells/ID/config.json --out RUN/cells/ID/result.json --log-dir RUN/logs/ID

Training cells go through bench/worker/cell.py, collectives cells through
bench/worker/collectives.py. Rank 0 writes result.json atomically; a file links.json beside
the cell's config (written by the runner) carries the link curves for metrics.roofline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

from bench.config.cell import CellConfig
from bench.metrics.loss_check import REFERENCE_FILE
from bench.metrics.phases import PhaseClock
from bench.metrics.roofline import LINKS_FILE, curves_from_json
from bench.worker.cell import run_cell, setup
from bench.worker.finish import leave, teardown, write_agreed_result
from bench.worker.hang_watch import install as install_hang_watch


def redirect_output(log_dir: Path, rank: int) -> None:
    """Send this rank's stdout and stderr (C-level writes too) to logs/<cell>/rank<r>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def main(argv: Optional[list[str]] = None, clock: Optional[PhaseClock] = None, store: Optional[Any] = None) -> int:
    """One cell on this rank. bench/worker/pool.py calls it once per cell of a reused job, with
    that cell's clock and a torch.distributed Store of the cell's own."""
    clock = clock or PhaseClock.from_env()  # the worker's first line: its imports are done
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell-config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--log-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    redirect_output(args.log_dir, rank)
    install_hang_watch(args.log_dir, rank)  # before any collective: ring, stack signal, Flight Recorder
    try:
        config = CellConfig.from_dict(json.loads(args.cell_config.read_text()))
        device = setup(config, store)
        clock.lap("process_group")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
        cell_id = args.cell_config.parent.name
        if config.run.kind == "collectives":  # nccl-tests-style sweep: docs/collectives.md
            from bench.worker.collectives import run_collectives

            return run_collectives(config, cell_id, args.out, device, clock)
        links = args.cell_config.parent / LINKS_FILE
        curves = curves_from_json(json.loads(links.read_text())) if links.is_file() else []
        shared = args.cell_config.parent / REFERENCE_FILE
        metrics = run_cell(config, cell_id, args.out.parents[2], device, curves, clock,
                           json.loads(shared.read_text()) if shared.is_file() else None)
        write_agreed_result(args.out, {"metrics": metrics})
        return 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        teardown()  # every exit path, the failing ones included


if __name__ == "__main__":
    leave(main())  # a failure raises out of main() instead: the usual traceback and exit code 1
