"""What `run_bench.py plan` does, apart from parsing its arguments (bench/cli/plan.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bench.plan.hardware import Hardware, MeasuredCurve, load_hardware, parse_hardware

DEFAULT_HARDWARE = Path(__file__).resolve().parents[2] / "configs" / "hardware" / "h100-sxm-8.yaml"
_ANY_RATES = dict.fromkeys(("matmul_tflops", "attention_tflops", "elementwise_gbps", "loss_gbps", "optimizer_gbps"),
                           1.0)


class RunFolderError(ValueError):
    """A run folder that cannot be read; names the folder and what is expected."""


def plan(config: Path | None, overrides: list[str], hardware: Path | None, link_profile: Path | None, fmt: str,
         peers: bool, master_fp32: bool, framework: str = "bench") -> str:
    from bench.config.matrix import load_config

    bench = load_config(config, overrides, host=None)  # host None: no device or NVML probe
    # The planner imports torch (about 2 s): only once the config is known to be good, so a bad
    # one is answered at once.
    from bench.plan.planner import plan_cells
    from bench.plan.predict import PlanInputs
    from bench.plan.render import render

    hw = load_hardware(hardware or DEFAULT_HARDWARE)
    curves = run_curves(link_profile) if link_profile else ()
    result = plan_cells([(c.id, c.config) for c in bench.cells], PlanInputs(hw, curves, master_fp32=master_fp32,
                                                                            framework=framework),
                        peers=peers)
    return render(result, fmt, hw.name)


def records(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from bench.results.records import latest, read_records

    if not (run_dir / "results.jsonl").is_file():
        raise RunFolderError(f"{run_dir}: no results.jsonl; allowed: a finished run folder under results/")
    env_path = run_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    recs = latest(read_records(run_dir))
    for r in recs:  # trace paths in records are relative to their run folder
        r["run_dir"] = str(run_dir)
    return recs, env


def training_configs(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """cell id -> CellConfig of every ok training record."""
    from bench.config.cell import CellConfig

    out = {}
    for r in recs:
        cfg = r.get("config") or {}
        if r.get("status") == "ok" and (cfg.get("run") or {}).get("kind", "training") == "training":
            out[r["cell"]] = CellConfig.from_dict(cfg)
    return out


def run_curves(run_dir: Path) -> tuple[MeasuredCurve, ...]:
    from bench.plan.calibrate import curves_from

    recs, env = records(run_dir)
    doc = {"device": {"memory_gib": 1}, "compute": {"achieved": _ANY_RATES},
           "links": {"curves": [{k: v for k, v in c.items() if k != "world_size"}
                                for c in curves_from(recs, int(env.get("nnodes") or 1))]}}
    return parse_hardware(doc, str(run_dir)).curves


def _run_folders(path: Path) -> tuple[list[Path], list[Path]]:
    """(run folders, gpu_check.json files) in PATH: a run folder itself, or a folder holding them
    (the scratch folder of `python -m bench.gpu_check`: gpu_check.json beside its run folders)."""
    checks = [path / "gpu_check.json"] if (path / "gpu_check.json").is_file() else []
    if (path / "results.jsonl").is_file():
        return [path], checks
    runs = sorted(d for d in path.iterdir() if (d / "results.jsonl").is_file()) if path.is_dir() else []
    if not runs and not checks:
        raise RunFolderError(f"{path}: no results.jsonl and no gpu_check.json; allowed: a finished run folder "
                             "under results/, or the scratch folder of python -m bench.gpu_check")
    return runs, checks


def calibrated(run_dirs: list[Path], hardware: Path | None = None) -> dict[str, Any]:
    """A hardware document: on a GPU (CUDA cells or a gpu_check.json) the base file with measured
    compute rates (bench/plan/calibrate_gpu.py), else this CPU host's (bench/plan/calibrate.py)."""
    from bench.plan import calibrate_gpu
    from bench.plan.calibrate import calibrate

    recs, env, configs, checks = [], {}, {}, []
    for path in run_dirs:
        runs, found = _run_folders(path)
        checks += [(c, calibrate_gpu.read_gpu_check(c)) for c in found]
        for run_dir in runs:
            r, e = records(run_dir)
            recs += r
            env = env or e
            configs.update(training_configs(r))
    if checks or any(c.run.device == "cuda" for c in configs.values()):
        return calibrate_gpu.calibrate(recs, configs, env, checks, hardware)
    return calibrate(recs, configs, env)


def calibration_yaml(run_dirs: list[Path], hardware: Path | None = None) -> str:
    return ("# Made by `run_bench.py plan --calibrate` (docs/plan.md): measured rates and links.\n"
            + yaml.safe_dump(calibrated(run_dirs, hardware), sort_keys=False, default_flow_style=None, width=120))


def validate(run_dirs: list[Path], calibration: list[Path], hardware: Path | None) -> dict[str, Any]:
    from bench.plan.predict import PlanInputs
    from bench.plan.validate import validate as compare_runs

    hw: Hardware = load_hardware(hardware) if hardware else \
        parse_hardware(calibrated(calibration or run_dirs), "<calibration>")
    recs, configs = [], {}
    for run_dir in run_dirs:
        r, _ = records(run_dir)
        recs += r
        configs.update(training_configs(r))
    return compare_runs(recs, configs, PlanInputs(hw), calibration=(hw.notes or {}).get("calibrated_on"))


def validation_text(result: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=1) + "\n"
    from tabulate import tabulate

    def cell(f: dict[str, Any], scale: float = 1.0) -> str:
        if f["measured"] is None:
            return f"{f['predicted'] * scale:.3g} / -"
        err = "" if f["error"] is None else f" ({100 * f['error']:+.0f}%)"
        return f"{f['predicted'] * scale:.3g} / {f['measured'] * scale:.3g}{err}"

    rows = [[c["cell"] + (" (calibration)" if c.get("calibration") else ""), c.get("run", ""), cell(c["step_time_s"]),
             cell(c["exposed_comm_s"]), cell(c["peak_memory_bytes"], 2 ** -20)] for c in result["cells"]]
    table = tabulate(rows, ["cell", "run", "step s pred / meas", "exposed comm s", "peak MiB"],
                     tablefmt="github" if fmt == "md" else "simple")
    pct = {k: "-" if v is None else f"{100 * v:.1f}%" for k, v in result["median_abs_error"].items()}
    tau = result["kendall_tau"]
    return (f"{table}\n\nmedian |error|: step time {pct['step_time_s']}, peak memory {pct['peak_memory_bytes']}, "
            f"exposed comm {pct['exposed_comm_s']}, comm time per kind {pct['comm_time_s']}; "
            f"Kendall tau (step time) {'-' if tau is None else f'{tau:.2f}'}\n")
