"""`run_bench.py plan`: plan a sweep for any cluster, calibrate this machine, validate on runs.

    plan CONFIG [--world N] [--hardware FILE] [--link-profile RUN_DIR] [--format table|md|json]
    plan --calibrate RUN_DIR [RUN_DIR ...] [--out FILE]
    plan --validate RUN_DIR [RUN_DIR ...] [--calibration RUN_DIR ...] [--hardware FILE] [--format json]

Nothing is launched and no local device is probed. Exit 2 on bad input (config, hardware file,
run folder), naming the file and key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.plan.hardware import Hardware, HardwareError, MeasuredCurve, load_hardware, parse_hardware

DEFAULT_HARDWARE = Path(__file__).resolve().parents[2] / "configs" / "hardware" / "h100-sxm-8.yaml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_bench.py plan", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", type=Path, help="YAML sweep to plan (default: the embedded default)")
    p.add_argument("--world", type=int, metavar="N", help="plan every cell at world size N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--hardware", type=Path, metavar="FILE",
                   help=f"hardware file (default: {DEFAULT_HARDWARE.relative_to(DEFAULT_HARDWARE.parents[2])})")
    p.add_argument("--link-profile", type=Path, metavar="RUN_DIR", help="collectives run whose curves time the links")
    p.add_argument("--format", choices=("table", "md", "json"), default="table")
    p.add_argument("--no-peers", action="store_true", help="plan the config's cells only")
    p.add_argument("--master-fp32", action="store_true",
                   help="count fp32 master weights and moments (InternEvo's mixed precision)")
    p.add_argument("--calibrate", type=Path, nargs="+", metavar="RUN_DIR",
                   help="write a hardware file for this machine from a collectives run and a profiled run")
    p.add_argument("--out", type=Path, metavar="FILE", help="where --calibrate writes (default: stdout)")
    p.add_argument("--validate", type=Path, nargs="+", metavar="RUN_DIR", help="predict finished runs and compare")
    p.add_argument("--calibration", type=Path, action="append", default=[], metavar="RUN_DIR",
                   help="runs to calibrate on for --validate (default: the validated runs themselves)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.calibrate:
            return _calibrate(args)
        if args.validate:
            return _validate(args)
        return _plan(args)
    except (HardwareError, _InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # ConfigError and friends: already one line per problem
        print(f"error: {exc}", file=sys.stderr)
        return 2


class _InputError(ValueError):
    pass


def _load_bench(path: Path | None, overrides: list[str]) -> Any:
    from bench.matrix import load_config

    return load_config(path, overrides, host=None)  # host None: no device or NVML probe


def _plan(args: argparse.Namespace) -> int:
    from bench.plan.planner import plan_cells
    from bench.plan.predict import PlanInputs
    from bench.plan.render import render

    overrides = list(args.set) + ([f"parallel.world_size={args.world}"] if args.world else [])
    bench = _load_bench(args.config, overrides)
    hw = load_hardware(args.hardware or DEFAULT_HARDWARE)
    curves = _run_curves(args.link_profile) if args.link_profile else ()
    inputs = PlanInputs(hw, curves, master_fp32=args.master_fp32)
    plan = plan_cells([(c.id, c.config) for c in bench.cells], inputs, peers=not args.no_peers)
    sys.stdout.write(render(plan, args.format, hw.name))
    return 0


def _records(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from bench.records import latest, read_records

    if not (run_dir / "results.jsonl").is_file():
        raise _InputError(f"{run_dir}: no results.jsonl; allowed: a finished run folder under results/")
    env_path = run_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    return latest(read_records(run_dir)), env


def _configs(records: list[dict[str, Any]]) -> dict[str, Any]:
    from bench.config import CellConfig

    out = {}
    for r in records:
        cfg = r.get("config") or {}
        if r.get("status") == "ok" and (cfg.get("run") or {}).get("kind", "training") == "training":
            out[r["cell"]] = CellConfig.from_dict(cfg)
    return out


def _run_curves(run_dir: Path) -> tuple[MeasuredCurve, ...]:
    from bench.plan.calibrate import curves_from

    records, _ = _records(run_dir)
    doc = {"device": {"memory_gib": 1}, "compute": {"achieved": dict.fromkeys(
        ("matmul_tflops", "attention_tflops", "elementwise_gbps", "loss_gbps", "optimizer_gbps"), 1.0)},
        "links": {"curves": [{k: v for k, v in c.items() if k != "world_size"} for c in curves_from(records)]}}
    return parse_hardware(doc, str(run_dir)).curves


def _calibrated(run_dirs: list[Path]) -> dict[str, Any]:
    from bench.plan.calibrate import calibrate

    records, env, configs = [], {}, {}
    for run_dir in run_dirs:
        recs, e = _records(run_dir)
        records += recs
        env = env or e
        configs.update(_configs(recs))
    return calibrate(records, configs, env)


def _calibrate(args: argparse.Namespace) -> int:
    doc = _calibrated(args.calibrate)
    text = "# Made by `run_bench.py plan --calibrate` (docs/plan.md); rates are this machine's, measured.\n" \
        + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from bench.plan.predict import PlanInputs
    from bench.plan.validate import validate

    hw: Hardware = load_hardware(args.hardware) if args.hardware else \
        parse_hardware(_calibrated(args.calibration or args.validate), "<calibration>")
    records, configs = [], {}
    for run_dir in args.validate:
        recs, _ = _records(run_dir)
        records += recs
        configs.update(_configs(recs))
    result = validate(records, configs, PlanInputs(hw), calibration=(hw.notes or {}).get("calibrated_on"))
    if args.format == "json":
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        sys.stdout.write(_validation_table(result, args.format))
    return 0


def _validation_table(result: dict[str, Any], fmt: str) -> str:
    from tabulate import tabulate

    def cell(f: dict[str, Any], scale: float = 1.0) -> str:
        if f["measured"] is None:
            return f"{f['predicted'] * scale:.3g} / -"
        err = "" if f["error"] is None else f" ({100 * f['error']:+.0f}%)"
        return f"{f['predicted'] * scale:.3g} / {f['measured'] * scale:.3g}{err}"

    rows = [[c["cell"] + (" (calibration)" if c.get("calibration") else ""), cell(c["step_time_s"]), cell(c["exposed_comm_s"]), cell(c["peak_memory_bytes"], 2 ** -20)]
            for c in result["cells"]]
    med = result["median_abs_error"]
    table = tabulate(rows, ["cell", "step s pred / meas", "exposed comm s", "peak MiB"],
                     tablefmt="github" if fmt == "md" else "simple")
    pct = {k: "-" if v is None else f"{100 * v:.1f}%" for k, v in med.items()}
    tau = result["kendall_tau"]
    return (f"{table}\n\nmedian |error|: step time {pct['step_time_s']}, peak memory {pct['peak_memory_bytes']}, "
            f"exposed comm {pct['exposed_comm_s']}, comm time per kind {pct['comm_time_s']}; "
            f"Kendall tau (step time) {'-' if tau is None else f'{tau:.2f}'}\n")


if __name__ == "__main__":
    raise SystemExit(main())
