"""bench/sweep/zygote.py: torchrun jobs forked from one launcher, as launch() and kill_tree() see them.

Real torchrun (its --no-python mode runs a plain program per rank, so no worker imports torch):
an ok job, a failing job with torchrun's own report, and a hanging job that kill_tree ends;
the forks carry the launcher's command line and the run's token, which is how a later runner
finds what a dead one left.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench.sweep.launch import REPO_ROOT, TORCHRUN, start_job
from bench.sweep.processes import RUN_ENV, kill_tree
from bench.sweep.zygote import ForkedJob, Zygote


def torchrun(*program: str) -> list[str]:
    return [sys.executable, "-m", TORCHRUN, "--nproc-per-node=1", "--standalone", "--no-python", *program]


def test_forked_torchrun_jobs_end_fail_and_die_like_started_ones(tmp_path: Path) -> None:
    token = f"{tmp_path}|1:1"
    zygote = Zygote(tmp_path, dict(os.environ, **{RUN_ENV: token}), REPO_ROOT)
    env = dict(os.environ, **{RUN_ENV: token})
    try:
        logs = {name: tmp_path / f"{name}.log" for name in ("ok", "bad", "hang")}
        with open(logs["ok"], "a") as log:
            ok = start_job(torchrun("true"), env, log, zygote)
        assert isinstance(ok, ForkedJob) and ok.wait(timeout=120) == 0
        with open(logs["bad"], "a") as log:
            bad = start_job(torchrun("false"), env, log, zygote)
        assert bad.wait(timeout=120) == 1
        report = logs["bad"].read_text()
        assert "Root Cause" in report and "exitcode  : 1" in report
        with open(logs["hang"], "a") as log:
            hang = start_job(torchrun("sleep", "300"), env, log, zygote)
        assert hang.poll() is None
        proc = Path(f"/proc/{hang.pid}")
        assert b"bench.sweep.zygote" in (proc / "cmdline").read_bytes() and str(tmp_path).encode() in (
            proc / "cmdline").read_bytes()
        assert f"{RUN_ENV}={token}".encode() in (proc / "environ").read_bytes()
        assert os.getpgid(hang.pid) == hang.pid  # a session, hence a process group, of its own
        kill_tree(hang, grace_s=5)
        assert hang.returncode is not None and hang.returncode != 0
    finally:
        zygote.close()
    assert zygote.proc is not None and zygote.proc.returncode == 0  # closing its input ends it
    with pytest.raises(OSError):
        os.kill(hang.pid, 0)
