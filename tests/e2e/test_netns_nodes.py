"""Two nodes that share nothing but a cable (tests/support/netns.py), and the cable cut mid-cell.

One cell at world size 4 (2 ranks per node), endpoint on node 0's namespace address: while it
runs, node 1's cable is pulled at the switch (`ip link set DEV down`: no error, the packets
just stop). Node 0 must record the cell as failed, naming node 1, within a few heartbeats;
node 1 must notice node 0 is gone, keep the files it could not ship, and exit; nothing may be
left in either node. Then, as after a crash, node 0's record is torn in half and a dead
runner's process is left on each node; with the cable back, `--resume` on both nodes sets the
torn bytes aside, ends both leftovers and completes the sweep, every line of results.jsonl
parsing and both attempts of every rank's log on node 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.sweep.processes import RUN_ENV
from tests.e2e import test_hang as hang
from tests.e2e.test_two_nodes import BASE, Nodes, wait_for_rank_log
from tests.support import netns
from tests.support.netns import NetNodes

pytestmark = pytest.mark.slow
HEARTBEAT_S = 5  # --heartbeat-timeout: a lost node is judged after this much silence
CUT = {**BASE, "parallel": {**BASE["parallel"], "world_size": 4}, "run": {**BASE["run"], "timeout_s": 120}}
DEAD_PID = (1 << 22) + 1  # above the largest pid_max: the "dead runner" no live process is


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetNodes]:
    if (why := netns.available()) is not None:
        pytest.skip(why)
    nodes = NetNodes(tmp_path_factory.mktemp("net"), 2, rate_mbit=1000)
    try:
        yield nodes
    finally:
        nodes.close()


@dataclass
class CutRun:
    nodes: Nodes
    cut_to_record_s: float
    cut_to_node1_exit_s: float
    codes: list[int]
    left_after_cut: list[list[int]]
    records_after_cut: list[dict]
    torn_bytes: bytes
    orphans: list[subprocess.Popen]
    resumed: Nodes
    resume_codes: list[int]
    left_after_resume: list[list[int]]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def _until(what: callable, timeout: float) -> float:
    start = time.monotonic()
    while not what():
        assert time.monotonic() - start < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def _orphan(net: NetNodes, node: netns.Node, folder: Path) -> subprocess.Popen:
    """A process a dead runner of `folder` left on `node` (its job's tag in the environment)."""
    env = dict(os.environ, **{RUN_ENV: f"{folder.resolve()}|{DEAD_PID}:1"})
    return net.popen(node, [sys.executable, "-c", "import time; time.sleep(300)"], env=env)


@pytest.fixture(scope="module")
def cut(net: NetNodes, tmp_path_factory: pytest.TempPathFactory) -> CutRun:
    tmp = tmp_path_factory.mktemp("cut")
    config = {"name": "cut", "base": CUT, "matrix": {"run.measure_steps": [25]}}
    nodes = Nodes(tmp, config, "--heartbeat-timeout", str(HEARTBEAT_S), "--grace-s", "4", net=net)
    run_dir = None
    try:
        wait_for_rank_log(net.nodes[1].results)  # node 1's ranks are in the first cell
        time.sleep(1.0)
        run_dir = nodes.run_dir()
        net.cut(net.nodes[1])
        start = time.monotonic()
        results = run_dir / "results.jsonl"
        to_record = _until(lambda: results.is_file() and results.read_bytes().endswith(b"\n"), 90)
        to_exit = _until(lambda: nodes.procs[1].poll() is not None, 90)
        codes = nodes.wait(timeout=90)
        left = [net.pids(n) for n in net.nodes]
        after_cut = _records(run_dir)
    finally:
        net.mend(net.nodes[1])
    print(f"\ncable cut -> node 0's failed record: {to_record:.1f}s; -> node 1's runner exits: {to_exit:.1f}s "
          f"(heartbeat timeout {HEARTBEAT_S}s; load {os.getloadavg()[0]:.1f})")
    # A crash in the middle of node 0's last write, and a dead runner's job left on each node.
    data = results.read_bytes()
    last = data[data.rstrip(b"\n").rfind(b"\n") + 1:]
    torn = last[:len(last) // 2]
    results.write_bytes(data[:len(data) - len(last)] + torn)
    staging = net.nodes[1].results / f".node1-{run_dir.name}"
    staging.mkdir(exist_ok=True)  # kept by node 1, which could not ship its files
    orphans = [_orphan(net, net.nodes[0], run_dir), _orphan(net, net.nodes[1], staging)]
    resumed = Nodes(tmp, None, "--resume", str(run_dir), "--heartbeat-timeout", str(HEARTBEAT_S), net=net)
    resume_codes = resumed.wait(timeout=300)
    for orphan in orphans:
        orphan.wait(timeout=10)
    return CutRun(nodes, to_record, to_exit, codes, left, after_cut, torn, orphans, resumed, resume_codes,
                  [net.pids(n) for n in net.nodes])


def test_the_cut_fails_the_cell_on_both_nodes_naming_the_lost_node(cut: CutRun) -> None:
    (first,) = cut.records_after_cut
    assert first["cell"] == "ms25" and first["status"] == "failed", first
    assert "lost node 1 (no heartbeat for 5s)" in first["error"]["reason"], first["error"]
    assert cut.codes == [1, 130], cut.nodes.output(0) + cut.nodes.output(1)
    assert "lost node 0 (no answer for 5s)" in cut.nodes.output(1) or \
        "lost node 0 (no heartbeat for 5s)" in cut.nodes.output(1), cut.nodes.output(1)
    # Bounded by the heartbeat, not by the cell's 120 s timeout nor by TCP's retransmissions;
    # node 1 also gives its torchrun the kill grace (--grace-s / 2 = 2 s) to stop.
    assert cut.cut_to_record_s < HEARTBEAT_S + 20, cut.cut_to_record_s
    assert cut.cut_to_node1_exit_s < HEARTBEAT_S + 2 + 20, cut.cut_to_node1_exit_s
    assert cut.left_after_cut == [[], []]  # no runner, torchrun or rank left in either node


def test_resume_on_both_nodes_sets_the_torn_tail_aside_ends_leftovers_and_completes(cut: CutRun) -> None:
    run_dir = cut.nodes.run_dir()
    assert cut.resume_codes == [0, 0], cut.resumed.output(0) + cut.resumed.output(1)
    out0, out1 = cut.resumed.output(0), cut.resumed.output(1)
    assert "torn tail (" in out0 and "cell ms25 runs again" in out0, out0
    (side,) = run_dir.glob("results.jsonl.torn-*")
    assert side.read_bytes() == cut.torn_bytes  # nothing measured is lost: the bytes are kept
    records = _records(run_dir)  # every line parses
    assert [(r["cell"], r["status"]) for r in records] == [("ms25", "ok")]  # the failed one is the torn one
    for node_out, orphan in zip((out0, out1), cut.orphans):
        assert f"ended 1 process(es) left by runner pid" in node_out and str(orphan.pid) in node_out, node_out
        assert orphan.returncode == -9
    assert cut.left_after_resume == [[], []]
    logs = run_dir / "logs" / "ms25"
    for r in range(4):  # both attempts of every rank, the one the cut ended and the resumed one
        text = (logs / f"rank{r}.log").read_text()
        assert "==== attempt 2 of ms25" in text and text.count("strategy isp") == 2, (r, text[-2000:])
        # node 1's ranks: the first attempt was kept on node 1 and shipped with the second
        assert ("kept on node 1 while node 0 was out of reach" in text) == (r >= 2), (r, text[-2000:])


def test_a_hang_across_the_link_names_the_stuck_rank_on_the_other_node(net: NetNodes, tmp_path: Path) -> None:
    """The hang diagnosis (bench/sweep/hang.py) across the cable: the highest rank of node 1
    SIGSTOPped mid-measure; node 0's record names it, with its node and its collective."""
    nodes = Nodes(tmp_path, {"name": "hang", "base": hang.HANG}, "--grace-s", "4", net=net, subdir="hang")
    try:
        ring = hang.stop_when_measuring(nodes.results(1), lambda found: max(found, default=None))
    finally:
        codes = nodes.wait()
    assert codes == [1, 1], nodes.output(0) + nodes.output(1)
    (record,) = nodes.records()
    log_dir = nodes.run_dir() / "logs" / record["cell"]
    hang.assert_hang_record(record, log_dir, stopped=ring["rank"], node=1)  # rank logs too: shipped whole
    assert {r["node"] for r in record["error"]["hang"]["ranks"]} == {0, 1}
    assert [net.pids(n) for n in net.nodes] == [[], []]
