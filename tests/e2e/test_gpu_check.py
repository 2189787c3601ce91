"""`python -m bench.gpu_check` without CUDA: says nothing was checked and why, exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command runs the real checks")
def test_gpu_check_without_cuda_says_why_and_exits_0() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bench.gpu_check: nothing was checked: ")
    assert "CUDA" in done.stdout
