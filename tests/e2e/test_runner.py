"""The runner end to end: real torchrun, real gloo ranks, the stand-in worker (tests/support/fake_worker.py).

torchrun costs several seconds a launch on 2 busy cores, so there are nine launches in all:
one sweep of five cells (two ok, a crash, a killed rank, a hang), its resume (three cells),
and one Ctrl-C. Everything else here is unit-sized.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.cli import main as cli
from bench.results import report
from bench.config import CellConfig, ParallelConfig, RunConfig
from bench.sweep.launch import CellPaths, LaunchOptions, command, environment, failure
from bench.sweep.runner import fmt_duration, new_run_dir

REPO = Path(__file__).resolve().parents[2]
RECORD_KEYS = {"schema_version", "run", "cell", "status", "swept", "config", "metrics", "error", "warnings",
               "started_utc", "wall_s", "runner_overhead_s"}
SMALL = {"model": {"hidden": 64, "layers": 1, "heads": 4, "kv_heads": 2, "vocab": 256, "mlp_hidden": 128},
         "data": {"seq_len": 32, "global_batch": 4, "micro_num": 1},
         "parallel": {"world_size": 2, "sp": 2, "wp": 2},
         "run": {"warmup_steps": 0, "measure_steps": 3, "timeout_s": 120}}
CRASH, KILL, HANG = "ov1-s1-ts120", "ov1-s2-ts120", "ov1-s3-ts4"
OK = ["ov0-s0-ts120", "ov1-s0-ts120"]


def run_cli(args: list[str], plan: dict[str, str], **popen: Any) -> Any:
    env = dict(os.environ, ISP_BENCH_WORKER="tests.support.fake_worker", FAKE_WORKER_PLAN=json.dumps(plan))
    cmd = [sys.executable, str(REPO / "run_bench.py"), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line names `text`: what a kill must not leave behind."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def assert_no_leftovers(run_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(run_dir)) == []


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("sweep")
    config = tmp / "fake.yaml"
    config.write_text(yaml.safe_dump({
        "name": "fake", "base": SMALL, "matrix": {"parallel.overlap": [False, True]},
        "include": [{"data.seed": 1}, {"data.seed": 2}, {"data.seed": 3, "run.timeout_s": 4}],
        "baseline": {"parallel.overlap": False}}))
    out = run_cli([str(config), "--results-dir", str(tmp / "results")], {CRASH: "crash", KILL: "kill", HANG: "hang"})
    runs = list((tmp / "results").iterdir())
    assert len(runs) == 1, (out.stdout, out.stderr)
    return runs[0], out


def test_sweep_records_every_cell_and_goes_on(sweep: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, out = sweep
    assert out.returncode == 1, out.stderr  # some cells failed
    assert run_dir.name.endswith("_fake") and len(run_dir.name) == len("20250101-120000_fake")
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in records] == [*OK, CRASH, KILL, HANG]
    assert all(set(r) == RECORD_KEYS and r["schema_version"] == 1 and r["run"] == run_dir.name for r in records)
    assert all(0 <= r["runner_overhead_s"] < 5 for r in records)  # the runner's own work around each job
    by = {r["cell"]: r for r in records}
    for cell in OK:
        assert by[cell]["status"] == "ok" and by[cell]["error"] is None
        assert by[cell]["metrics"]["step_time_s"]["median"] > 0 and len(by[cell]["metrics"]["loss"]) == 3
        assert CellConfig.from_dict(by[cell]["config"]).parallel.world_size == 2
    assert by[OK[0]]["swept"] == {"parallel.overlap": False, "data.seed": 0, "run.timeout_s": 120}

    crash, kill, hang = by[CRASH]["error"], by[KILL]["error"], by[HANG]["error"]
    assert by[CRASH]["status"] == "failed" and crash["reason"] == "rank 1 exited with code 1"
    assert crash["rank"] == 1 and "injected crash" in crash["log_tail"]
    assert crash["log_file"] == f"logs/{CRASH}/rank1.log"
    assert by[KILL]["status"] == "failed" and kill["reason"] == "rank 1 killed by signal 9 (SIGKILL)"
    assert by[HANG]["status"] == "timeout" and hang["reason"] == "timeout after 4s"
    assert 4 <= by[HANG]["wall_s"] < 30
    assert all(r["metrics"] is None for r in (by[CRASH], by[KILL], by[HANG]))

    lines = out.stdout.splitlines()
    assert lines[0] == f"fake: 5 cell(s) -> {run_dir}"
    assert lines[1].startswith(f"[1/5] {OK[0]} ... ok ") and "(elapsed " in lines[1] and "left)" in lines[1]
    assert lines[5].startswith(f"[5/5] {HANG} ... timeout ") and "left" not in lines[5]
    table = "\n".join(lines[6:])
    assert "speed-up" in table and "1.25x" in table and "baseline" in table and "n/a" in table
    assert_no_leftovers(run_dir)


def test_sweep_leaves_a_complete_results_folder(sweep: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _ = sweep
    for name in ("config.yaml", "cells.json", "env.json", "results.csv", "summary.md"):
        assert (run_dir / name).is_file(), name
    env = json.loads((run_dir / "env.json").read_text())
    assert {"python", "torch", "cuda", "nccl", "driver", "gpu", "hostname", "platform", "cpu_count", "git_commit",
            "git_dirty", "command_line", "utc"} <= set(env)
    assert env["gpu"] is None and env["nvml_unavailable"] or env["gpu"]
    torchrun_log = (run_dir / "logs" / OK[1] / "torchrun.log").read_text()
    assert torchrun_log.startswith(f"==== attempt 1 of {OK[1]}, ") and "\n$ " in torchrun_log
    assert (run_dir / "logs" / OK[1] / "rank1.log").is_file()
    assert json.loads((run_dir / "cells" / OK[1] / "result.json").read_text())["metrics"]
    summary = (run_dir / "summary.md").read_text()
    assert summary.startswith("# ISP Bench: fake") and "| cell " in summary and "## Failures" in summary
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("cell,status,parallel.overlap,data.seed,run.timeout_s,step_time_s.median,"
                              "step_time_s.p10,step_time_s.p90,tokens_per_s,peak_memory_bytes")
    assert "fake_extra.nested" in rows[0] and len(rows) == 6


def test_resume_runs_only_cells_without_ok(sweep: tuple[Path, subprocess.CompletedProcess[str]],
                                           tmp_path: Path) -> None:
    run_dir = tmp_path / sweep[0].name
    shutil.copytree(sweep[0], run_dir)
    out = run_cli(["--resume", str(run_dir)], {})  # every cell would now succeed
    assert out.stdout.splitlines()[0].startswith(f"resume {run_dir}: 2 cell(s) ok, 3 to run")
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in records[5:]] == [CRASH, KILL, HANG]
    assert records[5]["status"] == records[6]["status"] == "ok"
    # The hang cell keeps its 4 s limit; whether start-up fits in it depends on the machine.
    assert out.returncode == (0 if records[7]["status"] == "ok" else 1)
    newest = {r["cell"]: r["status"] for r in report.latest(report.read_records(run_dir))}
    assert newest[CRASH] == newest[KILL] == "ok" and list(newest) == [*OK, CRASH, KILL, HANG]
    assert "failed" not in (run_dir / "summary.md").read_text().split("## Failures")[0].split("| cell")[1]


def test_ctrl_c_kills_the_cell_records_it_and_writes_the_summary(tmp_path: Path) -> None:
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump({"name": "one", "base": SMALL}))
    proc = run_cli([str(config), "--results-dir", str(tmp_path / "r")], {"base": "hang"},
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # The runner marks the attempt in rank1.log before the job starts; the rank's own line says it runs.
    while not any("mode hang" in p.read_text() for p in (tmp_path / "r").glob("*/logs/base/rank1.log")) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    run_dir = next((tmp_path / "r").iterdir())
    (record,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "interrupted" and record["error"]["reason"] == "interrupted by SIGINT"
    assert "[1/1] base ... interrupted" in stdout and (run_dir / "summary.md").is_file()
    assert "Traceback" not in stderr
    assert_no_leftovers(run_dir)


# --- unit-sized -------------------------------------------------------------------------------

ROOT_CAUSE = """
Root Cause (first observed failure):
[0]:
  time      : 2026-11-24_22:10:53
  host      : localhost
  rank      : {rank} (local_rank: {rank})
  exitcode  : {code} (pid: 11963)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
=======================================================
"""


@pytest.mark.parametrize("rank, code, rank_log, reason", [
    (1, 1, "Traceback\nRuntimeError: boom\n", "rank 1 exited with code 1"),
    (3, -9, "", "rank 3 killed by signal 9 (SIGKILL)"),
    (0, 137, "step 3\n", "rank 0 exited with code 137 (128+9: SIGKILL, often the kernel OOM killer)"),
    (2, 1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n", "out of memory on rank 2"),
])
def test_failure_reasons(tmp_path: Path, rank: int, code: int, rank_log: str, reason: str) -> None:
    paths = CellPaths.under(tmp_path, "c")
    paths.log_dir.mkdir(parents=True)
    paths.torchrun_log.write_text("noise\n" + ROOT_CAUSE.format(rank=rank, code=code))
    if rank_log:
        (paths.log_dir / f"rank{rank}.log").write_text("line\n" * 100 + rank_log)
    error = failure(paths, 1, None)
    assert error["reason"] == reason and error["rank"] == rank and error["exit_code"] == code
    expected_log = f"logs/c/rank{rank}.log" if rank_log else "logs/c/torchrun.log"
    assert error["log_file"] == expected_log and len(error["log_tail"].splitlines()) <= 40


def test_failure_without_torchrun_report(tmp_path: Path) -> None:
    paths = CellPaths.under(tmp_path, "c")
    paths.log_dir.mkdir(parents=True)
    paths.torchrun_log.write_text("ImportError: no module named bench.worker\n")
    assert failure(paths, 1, None)["reason"] == "torchrun exited with code 1"
    assert failure(paths, -15, None)["reason"] == "torchrun killed by signal 15 (SIGTERM)"
    assert failure(paths, None, "timeout after 5s")["log_tail"].startswith("ImportError")


def test_command_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cell = CellConfig(parallel=ParallelConfig(world_size=4, sp=2, wp=2), run=RunConfig())
    paths = CellPaths.under(Path("/r"), "c")
    cmd = command(cell, paths, LaunchOptions())
    assert cmd[1:6] == ["-m", "bench.sweep.torchrun", "--nproc-per-node=4", "--standalone", "-m"]
    assert cmd[6:] == ["bench.worker", "--cell-config", "/r/cells/c/config.json", "--out", "/r/cells/c/result.json",
                       "--log-dir", "/r/logs/c"]
    multi = LaunchOptions(torchrun_args=("--nnodes=2", "--rdzv-endpoint=h:29500"), worker_module="w")
    assert command(cell, paths, multi)[3:7] == ["--nproc-per-node=2", "--nnodes=2", "--rdzv-endpoint=h:29500", "-m"]
    with pytest.raises(ValueError, match="nproc-per-node"):
        LaunchOptions(torchrun_args=("--nproc-per-node=8",))
    with pytest.raises(ValueError, match="fixed node count"):
        LaunchOptions(torchrun_args=("--nnodes=1:4",))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = environment(cell, LaunchOptions())
    assert env["PYTHONUNBUFFERED"] == "1" and env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 4))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert environment(cell, LaunchOptions())["OMP_NUM_THREADS"] == "7"


def record(cell: str, swept: dict[str, Any], median: float | None, status: str = "ok") -> dict[str, Any]:
    metrics = None if median is None else {"step_time_s": {"median": median, "p10": median, "p90": median}}
    return {"schema_version": 1, "cell": cell, "status": status, "swept": swept, "config": {}, "metrics": metrics,
            "error": None if status == "ok" else {"reason": "boom"}}


def test_report_baselines_missing_metrics_and_newest_record(tmp_path: Path) -> None:
    rows = [record("ov0-ws2", {"parallel.overlap": False, "parallel.world_size": 2}, 0.5),
            record("ov1-ws2", {"parallel.overlap": True, "parallel.world_size": 2}, None, "failed"),
            record("ov1-ws4", {"parallel.overlap": True, "parallel.world_size": 4}, 0.3),
            record("ov1-ws2", {"parallel.overlap": True, "parallel.world_size": 2}, 0.4)]  # a resumed re-run
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"cell": "torn')
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x", "baseline": {"parallel.overlap": False}}))
    text = report.write_summary(tmp_path)
    lines = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert "baseline" in lines["ov0-ws2"] and "1.25x" in lines["ov1-ws2"] and "0.4 s [0.4-0.4]" in lines["ov1-ws2"]
    assert "n/a" in lines["ov1-ws4"] and "—" in lines["ov1-ws4"]  # no ov0-ws4 ran; no tokens/s metric
    assert "error" not in text.splitlines()[0]  # no failure is newest anywhere: the column hides
    assert (tmp_path / "summary.md").read_text().startswith("# ISP Bench: x")


def test_small_helpers(tmp_path: Path) -> None:
    assert [fmt_duration(s) for s in (0.4, 59, 62, 3725)] == ["0s", "59s", "1m02s", "1h02m"]
    a = new_run_dir(tmp_path, "n")
    b = new_run_dir(tmp_path, "n", now=None)
    assert a != b and a.is_dir() and b.is_dir()


def test_subcommands_dispatch_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    fake = types.ModuleType("bench.cli.compare")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.cli.compare", fake)
    assert cli.main(["compare", "a", "--b"]) == 3 and seen == [["a", "--b"]]
    probe = "import sys, bench.cli.main; print(*(m in sys.modules for m in ('bench.cli.compare', 'bench.cli.history', 'torch')))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]
