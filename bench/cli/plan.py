"""`run_bench.py plan`: argument parsing only; the work is in bench/plan/commands.py (docs/plan.md).

    plan CONFIG [--world N] [--hardware FILE] [--link-profile RUN_DIR] [--format table|md|json]
    plan --calibrate RUN_DIR [RUN_DIR ...] [--hardware BASE] [--out FILE]
    plan --validate RUN_DIR [RUN_DIR ...] [--calibration RUN_DIR ...] [--hardware FILE] [--format json]
    plan --published [TABLE] [--one-node] [--format table|md|json]

Nothing is launched and no local device is probed. Exit 2 on bad input (config, hardware file,
run folder), naming the file and the key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.plan import commands


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_bench.py plan",
                                description="Predict memory, communication and step time of every cell and its "
                                            "peers on the cluster a hardware file describes (docs/plan.md).")
    p.add_argument("config", nargs="?", type=Path, help="YAML sweep to plan (default: the embedded default)")
    p.add_argument("--world", type=int, metavar="N", help="plan every cell at world size N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--hardware", type=Path, metavar="FILE",
                   help="hardware file (default: configs/hardware/h100-sxm-8.yaml); with --calibrate on a GPU: "
                        "the file to start from (default: the shipped one matching the recorded GPU)")
    p.add_argument("--link-profile", type=Path, metavar="RUN_DIR", help="collectives run whose curves time the links")
    p.add_argument("--format", choices=("table", "md", "json"), default="table")
    p.add_argument("--no-peers", action="store_true", help="plan the config's cells only")
    p.add_argument("--master-fp32", action="store_true",
                   help="count fp32 master weights and AdamW moments (the trainers' default for bfloat16)")
    p.add_argument("--framework", choices=("bench", "internevo"), default="bench",
                   help="isp cells: this suite's trainer (bench) or InternEvo's HybridZeroOptimizer and fused "
                        "kernels (internevo: bucketed all-reduce overlapped with backward, zero1, docs/plan.md)")
    p.add_argument("--published", type=Path, nargs="?", const=True, metavar="TABLE",
                   help="plan a table of published measurements (default: configs/published/internevo.yaml) "
                        "and print each prediction beside its source and the error")
    p.add_argument("--one-node", action="store_true",
                   help="with --published: take each cluster's compute rate from its rows on one node (one factor on "
                        "its efficiencies) and judge the goals on the other rows")
    p.add_argument("--calibrate", type=Path, nargs="+", metavar="RUN_DIR",
                   help="write a hardware file for this machine from a collectives run and a profiled run")
    p.add_argument("--out", type=Path, metavar="FILE", help="where --calibrate writes (default: stdout)")
    p.add_argument("--validate", type=Path, nargs="+", metavar="RUN_DIR", help="predict finished runs and compare")
    p.add_argument("--calibration", type=Path, action="append", default=[], metavar="RUN_DIR",
                   help="runs to calibrate on for --validate (default: the validated runs themselves)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.world is not None and args.world < 1:
        print(f"error: --world {args.world}: allowed: an int >= 1", file=sys.stderr)
        return 2
    if args.one_node and not args.published:
        print("error: --one-node calibrates the rows of --published; give --published too", file=sys.stderr)
        return 2
    try:
        if args.published:
            from bench.plan import published

            table = published.DEFAULT_TABLE if args.published is True else args.published
            sys.stdout.write(published.render(published.plan_table(table, one_node=args.one_node), args.format))
        elif args.calibrate:
            text = commands.calibration_yaml(args.calibrate, args.hardware)
            if args.out:
                args.out.write_text(text)
                print(f"wrote {args.out}", file=sys.stderr)
            else:
                sys.stdout.write(text)
        elif args.validate:
            result = commands.validate(args.validate, args.calibration, args.hardware)
            sys.stdout.write(commands.validation_text(result, args.format))
        else:
            overrides = list(args.set) + ([f"parallel.world_size={args.world}"] if args.world else [])
            sys.stdout.write(commands.plan(args.config, overrides, args.hardware, args.link_profile, args.format,
                                           not args.no_peers, args.master_fp32, args.framework))
    except ValueError as exc:  # ConfigError, HardwareError, RunFolderError: one line per problem
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
