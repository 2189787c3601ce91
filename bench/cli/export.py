"""`run_bench.py export RUN_DIR --format FORMAT [--out DIR]`: a run in another tool's format.

Formats (docs/export.md): pytorch-oss (PyTorch OSS benchmark database records),
github-action-benchmark (customSmallerIsBetter / customBiggerIsBetter JSON), tensorboard
(event files, one TensorBoard run per cell). Exit codes: 0 written, 2 bad input (unknown
format, missing or torn run folder, --out not a folder; nothing is written then).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.results.export import FORMATS, default_out, export
from bench.results.export_common import ExportError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_bench.py export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (results/<UTC>_<name>)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", type=Path, metavar="DIR", help=f"folder to write into (default {default_out(Path('RUN_DIR'), 'FORMAT')})")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage (an unknown format too), 0 on --help
        return int(exc.code or 0)
    try:
        written = export(args.run_dir, args.format, args.out)
    except ExportError as exc:
        print(f"export: {exc}; nothing written", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
