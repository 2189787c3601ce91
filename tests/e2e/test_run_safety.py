"""Nothing lost, nothing left behind: the runner under SIGKILL, SIGTERM, a second runner, a torn
results file, --retry, a read-only folder and a full disk (issue 13).

Real run_bench.py processes, real torchrun and gloo, the stand-in worker
(tests/support/fake_worker.py). Run folders that only need records to exist are written with
the runner's own functions instead of launched, to keep torchrun launches few (about 10 s each
on 2 busy cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.cli import main as cli
from bench.cli import nightly as nightly_cli
from bench.config.matrix import load_config
from bench.results import history, report
from bench.results.records import append_record, load_run
from bench.sweep import runner
from bench.sweep.launch import Outcome
from bench.sweep.processes import RUN_ENV, alive, start_time
from tests.e2e.test_runner import SMALL, assert_no_leftovers, processes_mentioning, run_cli
from tests.support.fake_worker import fake_metrics

SEEDS = ["s0", "s1", "s2", "s3"]


def write_config(tmp: Path, cells: int) -> Path:
    path = tmp / "safety.yaml"
    path.write_text(yaml.safe_dump({"name": "safety", "base": SMALL,
                                    "matrix": {"data.seed": list(range(cells))}}))
    return path


def made_run(tmp: Path, statuses: list[str | None], torn: bool = False) -> Path:
    """A run folder as the runner leaves it, one record per cell with the given status (None: no
    record), the metrics the stand-in worker would give; `torn` cuts the last record short."""
    bench = load_config(write_config(tmp, len(statuses)))
    run_dir = runner.new_run_dir(tmp / "results", bench.name)
    runner.prepare(run_dir, bench, ["test"])
    for cell, status in zip(bench.cells, statuses):
        if status is None:
            continue
        error = None if status == "ok" else {"reason": f"made {status}", "log_tail": ""}
        outcome = Outcome(status, fake_metrics(cell.config) if status == "ok" else None, error, 1.0)
        append_record(run_dir / "results.jsonl", runner.make_record(run_dir, cell, "2026-01-01T00:00:00+00:00", outcome))
    if torn:
        data = (run_dir / "results.jsonl").read_bytes()
        last = data.rstrip(b"\n").rfind(b"\n") + 1
        (run_dir / "results.jsonl").write_bytes(data[: last + (len(data) - last) // 2])
    return run_dir


def ok_nights(tmp: Path, nights: int = 5) -> Path:
    """A history DB of `nights` earlier runs on which both cells (s0, s1) were ok."""
    db = tmp / "history.sqlite"
    for night in range(nights):
        (tmp / f"night{night}").mkdir()
        history.record_run(db, made_run(tmp / f"night{night}", ["ok", "ok"]))
    return db


def judged(run_dir: Path, db: Path) -> dict[str, Any]:
    """`nightly --run RUN_DIR` against `db`, which must exit 3 (not judged complete); its nightly.json."""
    assert nightly_cli.main(["--run", str(run_dir), "--db", str(db), "--format", "json"]) == 3
    return json.loads((run_dir / "nightly.json").read_text())


def step_statuses(verdict: dict[str, Any], cell: str) -> list[str]:
    return [v["status"] for v in verdict["series"] if (v["cell"], v["metric"]) == (cell, "step_time_s")]


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def wait_for(predicate: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert predicate(), "timed out waiting"


def rank_log_says(run_dir: Path, cell: str, text: str, attempt: int = 1) -> bool:
    log = run_dir / "logs" / cell / "rank1.log"
    return log.is_file() and log.read_text().count("==== attempt ") >= attempt and \
        text in log.read_text().rpartition("==== attempt ")[2]


def test_sigkill_of_the_runner_leaves_no_process(tmp_path: Path) -> None:
    """s0 ok, s1 hangs, the runner is SIGKILLed: nothing is left running, and the nightly judging
    the half-run night against five whole ones lists s1 as missing and exits 3, not 0."""
    db = ok_nights(tmp_path)
    proc = run_cli([str(write_config(tmp_path, 2)), "--results-dir", str(tmp_path / "r")], {"s0": "ok", "s1": "hang"},
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: list((tmp_path / "r").glob("*/logs/s1/rank1.log")))
        run_dir = next((tmp_path / "r").iterdir())
        wait_for(lambda: rank_log_says(run_dir, "s1", "mode hang"))
        lock = json.loads((run_dir / "runner.lock").read_text())
        assert lock["pid"] == proc.pid and lock["host"] and lock["start_time"] == start_time(proc.pid)
        assert len(processes_mentioning(str(run_dir))) >= 3  # torchrun and both ranks
        proc.kill()
        proc.communicate()
        deadline = time.monotonic() + 5
        while processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(run_dir)) == []
    finally:
        proc.kill()
    verdict = judged(run_dir, db)
    assert verdict["missing_cells"] == ["s1"] and verdict["interrupted_cells"] == [] and verdict["failed_cells"] == []
    assert step_statuses(verdict, "s0") == ["no change"]


def test_resume_ends_what_a_dead_runner_left(tmp_path: Path) -> None:
    run_dir = made_run(tmp_path, ["ok"])
    dead_pid = (1 << 22) + 1  # above the largest pid_max: no live process has it
    (run_dir / "runner.lock").write_text(json.dumps({"pid": dead_pid, "host": os.uname().nodename,
                                                     "start_time": "1", "started_utc": "2026-01-01T00:00:00+00:00"}))
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                              env=dict(os.environ, **{RUN_ENV: f"{run_dir.resolve()}|{dead_pid}:1"}))
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        out = run_cli(["--resume", str(run_dir)], {})
        assert out.returncode == 0, out.stderr
        assert f"ended 1 process(es) left by runner pid {dead_pid}: {orphan.pid}" in out.stdout
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert stranger.poll() is None  # a process of no run is left alone
    finally:
        for p in (orphan, stranger):
            p.kill()
            p.wait()


@pytest.mark.slow  # three torchrun launches
def test_second_runner_then_sigterm_then_resume(tmp_path: Path) -> None:
    """s0 ends in gloo's teardown abort after its result is agreed; s1 hangs. A second runner is
    refused, SIGTERM records s1 as interrupted within --grace-s, the nightly judging that night
    against five ok ones exits 3 (not judged), never 1, and --resume runs s1 alone."""
    db = ok_nights(tmp_path)
    config = write_config(tmp_path, 2)
    proc = run_cli([str(config), "--results-dir", str(tmp_path / "r"), "--grace-s", "15"],
                   {"s0": "abort", "s1": "hang"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: list((tmp_path / "r").glob("*/logs/s1/rank1.log")))
        run_dir = next((tmp_path / "r").iterdir())
        wait_for(lambda: rank_log_says(run_dir, "s1", "mode hang"))

        second = run_cli(["--resume", str(run_dir)], {})
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"in use by runner pid {proc.pid} on host {os.uname().nodename}" in second.stderr

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130 and took < 15, (took, stdout, stderr)  # 130: not the watchdog (137)
    print(f"SIGTERM to exit: {took:.1f} s")
    s0, s1 = records(run_dir)
    assert s0["status"] == "ok" and s0["metrics"]["step_time_s"]["median"] > 0 and s0["error"] is None
    assert s0["warnings"] == ["rank 1 killed by signal 6 (SIGABRT) after every rank agreed on the result"]
    assert s1["status"] == "interrupted" and s1["error"]["reason"] == "interrupted by SIGTERM"
    assert "mode hang" in s1["error"]["log_tail"]
    assert "[2/2] s1 ... interrupted" in stdout and "1 interrupted" in (run_dir / "summary.md").read_text()
    assert_no_leftovers(run_dir)

    verdict = judged(run_dir, db)
    assert verdict["interrupted_cells"] == ["s1"] and verdict["failed_cells"] == []
    assert not [v for v in verdict["series"] if v["status"] == "regression"], verdict["series"]
    assert step_statuses(verdict, "s0") == ["no change"]  # judged against five nights: the exit 3 is the interruption's
    assert "Interrupted cells" in (run_dir / "nightly.md").read_text()

    out = run_cli(["--resume", str(run_dir)], {})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"resume {run_dir}: 1 cell(s) ok, 1 to run")
    assert [(r["cell"], r["status"]) for r in records(run_dir)] == [("s0", "ok"), ("s1", "interrupted"), ("s1", "ok")]
    rank1 = (run_dir / "logs" / "s1" / "rank1.log").read_text()
    torchrun = (run_dir / "logs" / "s1" / "torchrun.log").read_text()
    for log in (rank1, torchrun):
        assert "==== attempt 1 of s1, " in log and "==== attempt 2 of s1, " in log
    first, _, second_attempt = rank1.partition("==== attempt 2 of s1")
    assert "mode hang" in first and "mode ok" in second_attempt and "mode hang" not in second_attempt


def test_torn_tail_warned_then_set_aside_by_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = made_run(tmp_path, ["ok", "ok"], torn=True)
    torn_bytes = (run_dir / "results.jsonl").read_bytes().rpartition(b"\n")[2]
    assert torn_bytes and b'"cell": "s1"' in torn_bytes

    # The readers: compare and history use the complete record and warn; so does the summary.
    assert cli.main(["compare", str(run_dir), str(run_dir)]) == 0
    assert "results.jsonl:2: warning: torn tail" in capsys.readouterr().err
    assert cli.main(["history", "record", str(run_dir), "--db", str(tmp_path / "h.sqlite")]) == 0
    assert list(load_run(run_dir).records) == ["s0"]
    report.write_summary(run_dir)
    assert "cells: 1 (1 ok" in (run_dir / "summary.md").read_text()

    out = run_cli(["--resume", str(run_dir)], {})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torn tail (" in out.stdout and "cell s1 runs again" in out.stdout
    (side,) = run_dir.glob("results.jsonl.torn-*")
    assert side.read_bytes() == torn_bytes  # nothing deleted
    assert [(r["cell"], r["status"]) for r in records(run_dir)] == [("s0", "ok"), ("s1", "ok")]
    assert (run_dir / "results.jsonl").read_bytes().endswith(b"\n")


def test_bad_line_in_the_middle_is_still_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = made_run(tmp_path, ["ok", "ok"])
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    (run_dir / "results.jsonl").write_text("\n".join([lines[0][:40], lines[1]]) + "\n")
    assert cli.main(["compare", str(run_dir), str(run_dir)]) == 2
    assert f"{run_dir / 'results.jsonl'}:1: not valid JSON" in capsys.readouterr().err
    assert cli.main(["--resume", str(run_dir), "--dry-run"]) == 2
    assert f"{run_dir / 'results.jsonl'}:1: not valid JSON" in capsys.readouterr().err


def test_append_starts_on_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"schema_version": 1, "cell": "a", "status": "ok"}')  # newline lost, record whole
    append_record(path, {"schema_version": 1, "cell": "b", "status": "ok"})
    assert [json.loads(line)["cell"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_retry_reruns_only_the_chosen_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = made_run(tmp_path, ["ok", "failed", "timeout", "interrupted"])
    assert cli.main(["--resume", str(run_dir), "--retry", "failed,timeout", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "2 to run" in listed and "\ns1 " in listed and "\ns2 " in listed and "\ns3 " not in listed
    with pytest.raises(SystemExit) as usage:  # argparse's usage error
        cli.main(["--resume", str(run_dir), "--retry", "failed,bogus"])
    assert usage.value.code == 2
    assert "expected a comma-separated subset of failed,timeout,interrupted" in capsys.readouterr().err

    launches = tmp_path / "launches.txt"
    monkeypatch.setenv("FAKE_WORKER_LAUNCHES", str(launches))
    out = run_cli(["--resume", str(run_dir), "--retry", "interrupted"], {})
    assert out.returncode == 0, out.stdout + out.stderr  # the exit code speaks for the cells it ran
    assert launches.read_text().split() == ["s3"]
    assert [r["cell"] for r in records(run_dir)] == SEEDS + ["s3"]  # earlier attempts stay
    newest = {r["cell"]: r["status"] for r in report.latest(report.read_records(run_dir))}
    assert newest == {"s0": "ok", "s1": "failed", "s2": "timeout", "s3": "ok"}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    """A small tmpfs of its own (root only): read-only and full-disk cases without touching /tmp."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"mnt{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_folder_is_refused_before_any_cell(tmp_path: Path, tmpfs: Any) -> None:
    root = tmpfs("4m")
    run_dir = made_run(root, ["ok", None])
    before = (run_dir / "results.jsonl").read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    out = run_cli(["--resume", str(run_dir)], {})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"{run_dir}: results cannot be written there (Read-only file system)" in out.stderr
    assert (run_dir / "results.jsonl").read_bytes() == before and not (run_dir / "logs").exists()
    new = run_cli([str(write_config(tmp_path, 1)), "--results-dir", str(root / "results")], {})
    assert new.returncode == 2 and "cannot create a run folder there (Read-only file system)" in new.stderr


def test_full_disk_refused_by_the_probe_then_at_the_append(tmp_path: Path, tmpfs: Any) -> None:
    root = tmpfs("1m")
    run_dir = made_run(root, ["ok", None, None])
    results = run_dir / "results.jsonl"
    before = results.read_bytes()
    filler = root / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
    out = run_cli(["--resume", str(run_dir)], {})
    assert out.returncode == 2 and "results cannot be written there (No space left on device)" in out.stderr
    assert results.read_bytes() == before

    # A record bigger than the room left in the file's last page: the write gets part of it in,
    # then ENOSPC; append_record cuts that part off again.
    with pytest.raises(OSError, match="No space left"):
        append_record(results, {"schema_version": 1, "cell": "big", "status": "ok", "pad": "x" * 20000})
    assert results.read_bytes() == before

    # Pad the record (JSON allows trailing blanks) to fill its 4 KiB page, so that the next
    # record needs a page of its own: the disk filled by the cell then fails the append itself.
    results.write_bytes(before[:-1] + b" " * (-len(before) % 4096) + b"\n")
    before = results.read_bytes()
    assert len(before) % 4096 == 0 and json.loads(before)["status"] == "ok"
    filler.unlink()
    out = run_cli(["--resume", str(run_dir)], {"s1": "fill"})
    assert out.returncode == 3, out.stdout + out.stderr
    assert "stopped: cannot write to" in out.stdout and "No space left on device" in out.stdout
    assert results.read_bytes() == before  # no half-written record
    assert "[1/2] s1" in out.stdout and "[2/2]" not in out.stdout
    assert_no_leftovers(run_dir)


def test_lock_refuses_a_live_holder_and_takes_a_stale_one(tmp_path: Path) -> None:
    from bench.sweep import lock

    held, previous = lock.acquire(tmp_path)
    assert previous == {}
    with pytest.raises(lock.RunLocked, match=f"in use by runner pid {os.getpid()}"):
        lock.acquire(tmp_path)  # a second open file description: flock refuses it
    held.release()
    again, previous = lock.acquire(tmp_path)
    assert previous["pid"] == os.getpid() and alive(os.getpid(), previous["start_time"])
    again.release()
