"""Slurm for real: a two-node cluster on this host (tests/support/slurm_cluster.py), a sweep
through `srun` with no node flag, and through `sbatch` of the shipped configs/slurm/nightly.sbatch
(its CPU variant), whose SIGTERM forwarding is checked too. Skipped, with the reason, where the
Debian packages are missing or the daemons cannot start.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_two_nodes import free_port
from tests.support.slurm_cluster import ClusterUnavailable, SlurmCluster

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "configs" / "slurm" / "nightly.sbatch"
pytestmark = pytest.mark.slow

CONFIG = {"name": "slurm", "base": {
    "model": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128, "mlp_hidden": 64},
    "data": {"seq_len": 32, "global_batch": 4, "micro_num": 1, "packed": True, "seed": 7},
    "parallel": {"world_size": 2, "sp": "world", "wp": "world", "overlap": True, "memory_pool": True},
    "run": {"warmup_steps": 1, "measure_steps": 2, "timeout_s": 240},
    "profile": {"enabled": False}}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        print(f"no Slurm test cluster: {exc}")
        pytest.skip(f"no Slurm test cluster: {exc}")
    print(f"Slurm cluster {cluster.name} up:", subprocess.run(["sinfo", "-N"], env=cluster.env, capture_output=True,
                                                             text=True).stdout)
    yield cluster
    cluster.stop()


def job_env(cluster: SlurmCluster, tmp: Path, config: dict, results: Path) -> dict[str, str]:
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(config))
    # A free port, not 29500 + job id: another test cluster on this host numbers its jobs alike.
    return dict(cluster.env, PYTHONPATH=str(REPO), ISP_BENCH_CONFIG=str(tmp / "sweep.yaml"),
                ISP_BENCH_RESULTS=str(results), ISP_BENCH_PYTHON=sys.executable, ISP_BENCH_RDZV_PORT=str(free_port()))


def check_run(results: Path, cells: int = 1) -> Path:
    """Node 0's folder holds the ok records and both nodes' files; node 1 left only a pointer."""
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    (pointer,) = [p for p in results.iterdir() if p.name.endswith(".node1.json")]
    assert json.loads(pointer.read_text())["run_dir_on_node0"] == str(run_dir.resolve())
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(records) == cells and {r["status"] for r in records} == {"ok"}, records
    assert all(r["metrics"]["loss_matches_reference"] for r in records)
    logs = {p.name for p in (run_dir / "logs" / records[0]["cell"]).iterdir()}
    assert logs == {"rank0.log", "rank1.log", "rank0.ring", "rank1.ring", "torchrun.log", "torchrun.node1.log"}, logs
    env = json.loads((run_dir / "env.json").read_text())
    assert env["nnodes"] == 2 and env["node_source"] == "slurm" and len(env["nodes"]) == 2
    return run_dir


def test_srun_one_task_per_node_needs_no_node_flag(cluster: SlurmCluster, tmp_path: Path) -> None:
    env = job_env(cluster, tmp_path, CONFIG, tmp_path / "results")
    out = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", sys.executable, "run_bench.py",
                          env["ISP_BENCH_CONFIG"], "--results-dir", env["ISP_BENCH_RESULTS"]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    check_run(tmp_path / "results")
    assert "1 cell(s) on 2 nodes" in out.stdout and "node 1: results on node 0" in out.stdout


def test_sbatch_of_the_shipped_script_cpu_variant(cluster: SlurmCluster, tmp_path: Path) -> None:
    env = job_env(cluster, tmp_path, CONFIG, tmp_path / "results")
    out = subprocess.run(["sbatch", "--wait", "-N2", "--gpus-per-node=0", "--exclusive=user", "-o",
                          str(tmp_path / "job.out"), str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=400)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    print(out.stdout, log)
    assert out.returncode == 0, out.stdout + out.stderr + log
    assert "sweep ended with exit code 0" in log
    check_run(tmp_path / "results")


def submit(env: dict[str, str], out: Path) -> str:
    """sbatch the shipped script's CPU variant; its job id."""
    submitted = subprocess.run(["sbatch", "--parsable", "-N2", "--gpus-per-node=0", "--exclusive=user", "-o", str(out),
                                str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def test_sbatch_sigterm_reaches_every_runner(cluster: SlurmCluster, tmp_path: Path) -> None:
    config = {**CONFIG, "base": {**CONFIG["base"], "run": {**CONFIG["base"]["run"], "measure_steps": 60}}}
    results = tmp_path / "results"
    env = job_env(cluster, tmp_path, config, results)
    job = submit(env, tmp_path / "job.out")
    deadline = time.monotonic() + 240
    while not any("strategy" in p.read_text() for p in results.glob(".node1-*/logs/*/rank*.log")):
        assert time.monotonic() < deadline, "the cell never started on node 1"
        time.sleep(0.3)
    # A preemption's (or a cancel's) SIGTERM to the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=env, check=True, timeout=30)
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline + 120, "the job did not end after SIGTERM"
        time.sleep(0.5)
    log = (tmp_path / "job.out").read_text()
    print(log)
    assert "SIGTERM (preemption or cancel): stopping every node" in log and "exit code 130" in log, log
    assert "requeueing" not in log  # a cancel or a preemption is not requeued by the script
    (run_dir,) = [p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")]
    (record,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert record["status"] != "ok" and "interrupted" in record["error"]["reason"], record["error"]


def test_sbatch_picks_its_config_by_node_count(cluster: SlurmCluster, tmp_path: Path) -> None:
    """No ISP_BENCH_CONFIG: one node runs gpu-nightly-8 (world 8), two run gpu-nightly-nodes at
    world 16 (the script's --set); a dry run on each node shows which, without any GPU."""
    env = dict(cluster.env, PYTHONPATH=str(REPO), ISP_BENCH_PYTHON=sys.executable, ISP_BENCH_ARGS="--dry-run",
               ISP_BENCH_RESULTS=str(tmp_path / "results"))
    for nodes, config, ranks in ((1, "configs/gpu-nightly-8.yaml", "8"), (2, "configs/gpu-nightly-nodes.yaml", "16")):
        log = tmp_path / f"job{nodes}.out"
        out = subprocess.run(["sbatch", "--wait", f"-N{nodes}", "--gpus-per-node=0", "--exclusive=user", "-o", str(log),
                              str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        text = log.read_text() if log.exists() else ""
        assert out.returncode == 0, out.stdout + out.stderr + text
        assert text.count(f"cell(s) from {config}") == nodes, text
        rows = [line.split() for line in text.splitlines() if re.match(r"^(ov|wp)\S*-", line)]
        assert rows and {row[-1] for row in rows} == {ranks}, text



def wait_for(what: str, done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def queued(env: dict[str, str], job: str) -> bool:
    """Whether the job is still in the queue. Slurm holds a requeued batch job for two minutes
    (its BeginTime); the test lets it start a few seconds after the requeue instead (not at once:
    slurmd refuses a job whose new credential dates from the second its old one was revoked)."""
    state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True,
                           text=True).stdout.strip()
    if state == "PENDING BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=env, check=True, timeout=30)
    return bool(state)


def test_sbatch_requeued_before_the_time_limit_resumes_its_folder(cluster: SlurmCluster, tmp_path: Path) -> None:
    """What --signal=B:USR1@300 does near the time limit, mid-sweep: the script stops the runners,
    requeues itself, and the requeued job (SLURM_RESTART_COUNT 1) runs only the cell not done."""
    base = CONFIG["base"]
    config = {"name": "requeue", "base": base, "matrix": {"run.measure_steps": [2, 80]}}
    results = tmp_path / "results"
    env = job_env(cluster, tmp_path, config, results)
    job = submit(env, tmp_path / "job.out")
    run_dir = results / f"nightly-{job}"
    records = run_dir / "results.jsonl"
    wait_for("the first cell never ended", lambda: records.is_file() and records.read_text().strip(), 240)
    wait_for("the second cell never started on node 1",
             lambda: any("strategy" in p.read_text() for p in results.glob(".node1-*/logs/*/rank*.log")), 120)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
    out = tmp_path / "job.out"
    # Requeued, the job leaves the queue for a moment: done when its second run has ended too.
    wait_for(f"the requeued job did not end: {out.read_text()}",
             lambda: not queued(env, job) and out.read_text().count("sweep ended") == 2, 400)
    log = out.read_text()
    print(log)
    assert "SIGUSR1 (time limit near)" in log and f"requeueing job {job}" in log, log
    assert "restart 0" in log and "restart 1" in log, log
    assert [p.name for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")] == [run_dir.name]
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    statuses = [(r["config"]["run"]["measure_steps"], r["status"]) for r in rows]
    assert statuses == [(2, "ok"), (80, "interrupted"), (80, "ok")], statuses
    assert log.count("sweep ended with exit code") == 2 and log.rstrip().endswith("exit code 0 (0 ok, 1 a cell "
                                                                                   "failed, 2 config error, 130 interrupted)")
