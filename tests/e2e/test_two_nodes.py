"""Two nodes on one machine: two runners with --nnodes 2 --node-rank 0|1, real torchrun and gloo.

Node 1 writes into a results folder of its own, so everything in node 0's folder that came
from node 1's ranks travelled through the store, not through a shared path. Where network
namespaces can be made (root), the sweep's nodes are two namespaces joined by a 1 Gbit/s link
(tests/support/netns.py) and the endpoint is node 0's own address; elsewhere both runners
share this host's loopback. The faults below run on loopback; the network's own faults (a cut
cable) are tests/e2e/test_netns_nodes.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.config import CellConfig
from bench.plan.predict import ELEMENT_SIZE
from bench.strategies.common import data_spec, model_config
from isp_core.comm_formula import predicted_comm
from tests.support import netns
from tests.support.netns import NetNodes

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

BASE = {
    "model": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128, "mlp_hidden": 64},
    "data": {"seq_len": 32, "global_batch": 4, "micro_num": 1, "packed": True, "seed": 7},
    "parallel": {"world_size": 2, "sp": "world", "wp": "world", "overlap": True, "memory_pool": True},
    "run": {"warmup_steps": 1, "measure_steps": 3, "timeout_s": 240},
    "profile": {"enabled": False},
}
PROFILED = {**BASE, "profile": {"enabled": True, "wait": 0, "warmup": 1, "active": 2}}


def formula_bytes(config: dict[str, Any]) -> dict[str, Any]:
    """Calls and bytes per step by group and kind from isp_core's formula, for the record's config."""
    cell = CellConfig.from_dict(config)
    p = cell.parallel
    return predicted_comm(model_config(cell), data_spec(cell), p.world_size, p.sp, p.wp, p.overlap,
                          ELEMENT_SIZE[cell.run.dtype])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """Two runners of one sweep, started like torchrun's nodes: the same command, rank 0 and 1.
    On loopback by default; with `net`, each in its own namespace, at node 0's address."""

    def __init__(self, tmp: Path, config: dict | None, *extra: str, port: int | None = None,
                 net: NetNodes | None = None, ranks: tuple[int, ...] = (0, 1), subdir: str = "") -> None:
        # subdir: a results folder of its own inside each namespaced node's, for a test that shares
        # the nodes with others (their run folders and rings must not be taken for its own)
        self.tmp, self.port, self.net, self.subdir = tmp, port or free_port(), net, subdir
        self.host = net.nodes[0].address if net is not None else "127.0.0.1"
        args = []
        if config is not None:
            (tmp / "sweep.yaml").write_text(yaml.safe_dump(config))
            args.append(str(tmp / "sweep.yaml"))
        self.procs = [self._start(r, [*args, *extra]) for r in ranks]

    def results(self, rank: int) -> Path:
        return self.net.nodes[rank].results / self.subdir if self.net is not None else self.tmp / f"r{rank}"

    def _start(self, rank: int, args: list[str]) -> subprocess.Popen:
        out = open(self.tmp / f"node{rank}.out", "a")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cmd = [sys.executable, str(REPO / "run_bench.py"), *args, "--results-dir", str(self.results(rank)),
               "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"{self.host}:{self.port}"]
        if self.net is not None:
            return self.net.popen(self.net.nodes[rank], cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 500) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            for p in self.procs:  # a failed assertion must not leave a runner behind
                if p.poll() is None:
                    p.kill()
                    p.wait()

    def output(self, rank: int) -> str:
        return (self.tmp / f"node{rank}.out").read_text()

    def run_dir(self) -> Path:
        (run_dir,) = [p for p in self.results(0).iterdir() if p.is_dir()]
        return run_dir

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir() / "results.jsonl").read_text().splitlines()]


def descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += frontier
    return found


def wait_for_rank_log(folder: Path, timeout: float = 180) -> None:
    """Until some rank on that node has built its model (the cell is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("strategy" in p.read_text(errors="replace") for p in folder.glob("**/logs/*/rank*.log")):
            return
        time.sleep(0.3)
    raise AssertionError(f"no rank started under {folder}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """World sizes 2 and 4 over two nodes: in two namespaces where they can be made."""
    tmp = tmp_path_factory.mktemp("nodes")
    net = NetNodes(tmp, 2, rate_mbit=1000) if netns.available() is None else None
    try:
        config = {"name": "nodes", "base": PROFILED, "matrix": {"parallel.world_size": [2, 4]}}
        nodes = Nodes(tmp, config, net=net)
        codes = nodes.wait()
        assert codes == [0, 0], nodes.output(0) + nodes.output(1)
        if net is not None:
            assert [net.pids(n) for n in net.nodes] == [[], []]  # nothing left in either node
        yield nodes
    finally:
        if net is not None:
            net.close()


def test_every_cell_ok_on_both_nodes_with_the_reference_losses(sweep: Nodes) -> None:
    records = {r["config"]["parallel"]["world_size"]: r for r in sweep.records()}
    assert set(records) == {2, 4} and {r["status"] for r in records.values()} == {"ok"}
    for record in records.values():
        assert record["metrics"]["loss_matches_reference"] is True  # the world-size-1 reference
        counted = record["metrics"]["comm"]["counted_per_step"]  # what the ranks issued, by group and kind
        assert counted == formula_bytes(record["config"]), (counted, record["config"]["parallel"])
    assert records[4]["metrics"]["loss"] == pytest.approx(records[2]["metrics"]["loss"], rel=1e-5)
    # One reference, computed in the world-2 cell, reached the world-4 cell's rank 0 on whichever node.
    sources = {json.dumps(r["metrics"]["loss_reference_source"], sort_keys=True) for r in records.values()}
    assert len(sources) == 1 and json.loads(sources.pop())["cell"] == records[2]["cell"]
    assert records[4]["metrics"]["phases_s"]["loss_reference"] == 0.0 < records[2]["metrics"]["phases_s"]["loss_reference"]
    for rank in (0, 1):
        assert len(re.findall(r"^\[\d/2\] ws\d \.\.\. ok ", sweep.output(rank), re.M)) == 2, sweep.output(rank)


def test_node_0_folder_holds_every_ranks_log_and_trace(sweep: Nodes) -> None:
    run_dir = sweep.run_dir()
    for cell, world in (("ws2", 2), ("ws4", 4)):
        logs = {p.name for p in (run_dir / "logs" / cell).iterdir()}
        assert logs == {*(f"rank{r}.{ext}" for r in range(world) for ext in ("log", "ring")), "torchrun.log",
                        "torchrun.node1.log"}, logs
        for r in range(world):  # each rank's own lines, not only the runner's attempt mark
            assert "strategy isp" in (run_dir / "logs" / cell / f"rank{r}.log").read_text(), (cell, r)
        traces = sorted(p.name for p in (run_dir / "traces" / cell).iterdir())
        assert traces == [f"rank{r}.json.gz" for r in range(world)]
    for record in sweep.records():  # every rank's trace figures reached the record, paths in node 0's folder
        world = record["config"]["parallel"]["world_size"]
        assert len(record["metrics"]["overlap"]["per_rank"]) == world
        assert all((run_dir / p).is_file() for p in record["metrics"]["traces"]) and len(record["metrics"]["traces"]) == world
    env = json.loads((run_dir / "env.json").read_text())
    assert env["nnodes"] == 2 and [n["node_rank"] for n in env["nodes"]] == [0, 1]
    assert all(n["hostname"] for n in env["nodes"])
    if sweep.net is not None:  # two hosts that know each other by name, as in a cluster
        assert [n["hostname"] for n in env["nodes"]] == [n.hostname for n in sweep.net.nodes]
        assert env["rdzv_endpoint"].startswith(sweep.net.nodes[0].address + ":")
    # Node 1 keeps a pointer to node 0's folder and nothing else.
    (pointer,) = list(sweep.results(1).iterdir())
    assert json.loads(pointer.read_text())["run_dir_on_node0"] == str(run_dir)


def test_summary_and_compare_work_on_node_0_folder(sweep: Nodes) -> None:
    run_dir = sweep.run_dir()
    summary = (run_dir / "summary.md").read_text()
    assert "ws2" in summary and "ws4" in summary
    out = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "compare", str(run_dir), str(run_dir)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ws4" in out.stdout


def test_a_node_killed_mid_cell_fails_that_cell_on_both_and_the_sweep_goes_on(tmp_path: Path) -> None:
    config = {"name": "kill", "base": BASE, "matrix": {"run.measure_steps": [200, 2]}}
    nodes = Nodes(tmp_path, config)
    wait_for_rank_log(tmp_path / "r1")
    for pid in descendants(nodes.procs[1].pid):  # node 1's torchrun and its ranks, not its runner
        os.kill(pid, signal.SIGKILL)
    assert nodes.wait() == [1, 1], nodes.output(0) + nodes.output(1)
    first, second = nodes.records()
    assert first["config"]["run"]["measure_steps"] == 200 and first["status"] == "failed"
    assert "node 1:" in first["error"]["reason"], first["error"]
    assert second["status"] == "ok"
    for rank in (0, 1):
        assert "[1/2]" in nodes.output(rank) and " failed " in nodes.output(rank)
        assert "[2/2]" in nodes.output(rank) and " ok " in nodes.output(rank).split("[2/2]")[1]


def test_a_runner_that_dies_is_a_lost_node_and_node_0_finishes_the_sweep(tmp_path: Path) -> None:
    config = {"name": "lost", "base": BASE, "matrix": {"run.measure_steps": [200, 2]}}
    nodes = Nodes(tmp_path, config, "--heartbeat-timeout", "5")
    wait_for_rank_log(tmp_path / "r1")
    for pid in [nodes.procs[1].pid, *descendants(nodes.procs[1].pid)]:  # the whole node: runner and job
        os.kill(pid, signal.SIGKILL)
    codes = nodes.wait()
    assert codes == [1, -signal.SIGKILL], nodes.output(0)
    first, second = nodes.records()
    assert first["status"] == "failed" and "node 1: lost node 1 (no heartbeat for 5s)" in first["error"]["reason"]
    assert second["status"] == "failed" and second["error"]["reason"].startswith("lost node 1")


def test_sigterm_on_node_1_stops_both_and_resume_from_node_0_finishes(tmp_path: Path) -> None:
    config = {"name": "stop", "base": {**BASE, "run": {**BASE["run"], "measure_steps": 40}}}
    nodes = Nodes(tmp_path, config)
    wait_for_rank_log(tmp_path / "r1")
    nodes.procs[1].send_signal(signal.SIGTERM)
    assert nodes.wait(timeout=120) == [130, 130], nodes.output(0) + nodes.output(1)
    (record,) = nodes.records()
    assert record["status"] != "ok" and "node 1 interrupted" in record["error"]["reason"], record["error"]
    run_dir = nodes.run_dir()
    again = Nodes(tmp_path, None, "--resume", str(run_dir))
    assert again.wait() == [0, 0], again.output(0) + again.output(1)
    assert [r["status"] for r in nodes.records()][-1] == "ok"
    assert "resume" in again.output(0) and "1 to run" in again.output(0)


def test_a_node_that_never_arrives_fails_the_cell_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(yaml.safe_dump({"name": "alone", "base": BASE}))
    cmd = [sys.executable, str(REPO / "run_bench.py"), str(tmp_path / "one.yaml"), "--results-dir",
           str(tmp_path / "r0"), "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "--rdzv-timeout", "3"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 1, out.stdout + out.stderr
    (run_dir,) = (tmp_path / "r0").iterdir()
    (record,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert record["error"]["reason"] == "rendezvous timeout: node 1 did not arrive within 3s"
    assert json.loads((run_dir / "env.json").read_text())["nodes"][1]["missing"]


def test_a_world_size_that_does_not_split_over_the_nodes_is_a_config_error(tmp_path: Path) -> None:
    config = {"name": "odd", "base": {**BASE, "parallel": {**BASE["parallel"], "world_size": 1}}}
    nodes = Nodes(tmp_path, config)
    codes = nodes.wait(timeout=120)
    assert codes == [2, 2], nodes.output(0) + nodes.output(1)
    assert "world_size=1 does not split over nnodes=2" in nodes.output(0)
    assert "node 0 refused the config" in nodes.output(1)
