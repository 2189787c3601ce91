"""The pieces of a several-node sweep that need no second node: a store call with a deadline
against a real TCPStore whose server stops answering, the config hash the nodes compare, and
how node 0 joins the logs other nodes ship."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from bench.sweep.attempt_logs import append, only_marks, seal
from bench.sweep.launch import ATTEMPT_MARK
from bench.sweep.roll_call import config_identity
from bench.sweep.store import BoundedStore, StoreDead

SERVER = """import sys, time
from datetime import timedelta
from torch.distributed import TCPStore
s = TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
print("up", flush=True)
time.sleep(120)
"""


def stopped(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until every thread of `pid` is stopped (state T in /proc/PID/task/*/stat)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [Path(t, "stat").read_text().rpartition(")")[2].split()[0] for t in Path(f"/proc/{pid}/task").iterdir()]
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not stop within {timeout_s} s")


def test_a_call_to_a_server_that_stops_answering_ends_at_its_deadline() -> None:
    """SIGSTOP the server: the connection stays open and nothing fails, as on a pulled cable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "up"
        store = BoundedStore(TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30),
                                      wait_for_workers=False), deadline_s=1.5)
        assert store.call("add", "k", 1) == 1
        os.kill(server.pid, signal.SIGSTOP)
        stopped(server.pid)  # the signal is asynchronous: a thread still running could answer
        start = time.monotonic()
        with pytest.raises(StoreDead, match="no answer for 1.5s"):
            store.call("add", "k", 1)
        assert 1.5 <= time.monotonic() - start < 3.0
        with pytest.raises(StoreDead):  # dead from now on, at once
            store.call("check", ["k"])
        assert time.monotonic() - start < 3.0
    finally:
        server.kill()
        server.wait()


def test_the_config_hash_ignores_comments_and_follows_set_and_filter(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("name: x\nbase: {run: {measure_steps: 3}}\n")
    b.write_text("# the same, written another way\nname: x\nbase:\n  run:\n    measure_steps: 3\n")
    same = config_identity(a, [], None)
    assert same is not None and same["source"] == str(a)
    assert config_identity(b, [], None)["sha256"] == same["sha256"]
    assert config_identity(a, ["run.measure_steps=4"], None)["sha256"] != same["sha256"]
    assert config_identity(a, [], "ws2")["sha256"] != same["sha256"]
    assert config_identity(tmp_path / "missing.yaml", [], None) is None  # not compared


M = ATTEMPT_MARK


def test_shipped_logs_join_node_0s_under_its_attempt_marks(tmp_path: Path) -> None:
    assert only_marks(f"{M}1 of c ====\n\n".encode()) and not only_marks(f"{M}1 of c ====\nx\n".encode())
    dest = tmp_path / "rank2.log"
    dest.write_text(f"{M}1 of c, T1 ====\nfirst\n")  # an attempt shipped before
    append(dest, f"{M}1 of c, t ====\nsecond\n".encode(), f"{M}2 of c, T2 ====", 1)
    assert dest.read_text() == f"{M}1 of c, T1 ====\nfirst\n\n{M}2 of c, T2 ====\nsecond\n"
    # an attempt node 1 kept while node 0 was out of reach, sealed before the next one
    staging = tmp_path / "logs" / "c"
    staging.mkdir(parents=True)
    (staging / "rank3.log").write_text("cut short\n")
    (staging / "rank0.log").write_text(f"{M}1 of c ====\n")  # marked, never written: left as it is
    seal(staging, 1)
    assert (staging / "rank0.log").read_text() == f"{M}1 of c ====\n"
    with open(staging / "rank3.log", "a") as f:
        f.write("resumed\n")
    kept = tmp_path / "rank3.log"
    append(kept, (staging / "rank3.log").read_bytes(), f"{M}2 of c, T2 ====", 1)
    assert kept.read_text() == (f"{M}? of c ==== (kept on node 1 while node 0 was out of reach)\ncut short\n"
                                f"\n{M}2 of c, T2 ====\nresumed\n")
