"""`python -m bench.gpu_check` without CUDA, and its way of running cells on a real sweep.

The GPU checks themselves cannot run here (no GPU is lent to this suite): their record checks
are tested on CPU in tests/unit/test_gpu_check_records.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bench.gpu_check.rows import NA, OK
from bench.gpu_check.sweeps import Sweep, checks_for, rows_for, run_sweep

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.version.cuda is not None, reason="with a CUDA build the command runs the real checks")
def test_gpu_check_without_cuda_says_why_and_exits_0() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bench.gpu_check: nothing was checked: ")
    assert "CPU build (no CUDA)" in done.stdout


def test_a_real_sweep_read_back_into_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run_bench.py on one small CPU cell, as gpu_check runs its configs: the record is found in
    the run folder, its loss matches the reference and its bytes the formula (and profile.nvtx
    says it is inactive on CPU rather than failing)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "base": {
        "model": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 64, "mlp_hidden": 64},
        "data": {"seq_len": 32, "global_batch": 2, "micro_num": 2},
        "parallel": {"world_size": 1, "sp": 1, "wp": 1},
        "run": {"warmup_steps": 1, "measure_steps": 2, "check_loss": True},
        "profile": {"nvtx": True}}}))
    (run,) = run_sweep(Sweep("tiny", str(config), 180), tmp_path / "scratch")
    assert "  | [1/1] base ... ok" in capsys.readouterr().out
    assert run.ran and run.run_dir is not None and run.run_dir.parent == tmp_path / "scratch" / "tiny"
    got = {r.name: r for r in rows_for(run, checks_for(run, []))}
    assert [got[n].status for n in ("runs", "loss = reference", "counted bytes = formula")] == [OK] * 3, got
    assert got["attention is flash"].status == NA and "flash-attn is not installed" in got["attention is flash"].detail
    # profile.nvtx on CPU: the cell runs, and its record and rank log say the ranges were not there
    why = "inactive: NVTX ranges need CUDA, this cell runs on cpu"
    assert run.metrics["nvtx"] == {"active": False, "status": why}
    assert f"profile.nvtx: {why}" in (run.run_dir / "logs" / "base" / "rank0.log").read_text()
