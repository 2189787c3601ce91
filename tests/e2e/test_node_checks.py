"""Nodes that disagree are refused before any cell: real runners on this host's loopback.

Each node's runner checks the others as it arrives (bench/sweep/roll_call.py): a different
--nnodes, a different config (by hash) or a node rank given twice ends in exit 2 naming both
values, and no cell is launched. The stand-in worker (tests/support/fake_worker.py) keeps
the one sweep that does run short.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.e2e.test_two_nodes import free_port
from tests.e2e.test_runner import SMALL

REPO = Path(__file__).resolve().parents[2]


def start(tmp: Path, label: str, rank: int, nnodes: int, port: int, config: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), ISP_BENCH_WORKER="tests.support.fake_worker")
    cmd = [sys.executable, str(REPO / "run_bench.py"), str(config), "--results-dir", str(tmp / label),
           "--nnodes", str(nnodes), "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-timeout", "60"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(tmp / f"{label}.out", "w"), stderr=subprocess.STDOUT)


def finish(tmp: Path, procs: dict[str, subprocess.Popen], timeout: float = 120) -> dict[str, tuple[int, str]]:
    try:
        return {label: (p.wait(timeout=timeout), (tmp / f"{label}.out").read_text()) for label, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def config_file(tmp: Path, name: str, measure_steps: int = 3) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({"name": "checks", "base": {**SMALL, "run": {**SMALL["run"],
                                                                                "measure_steps": measure_steps}}}))
    return path


def no_record(results: Path) -> bool:
    return not any(p.stat().st_size for p in results.glob("*/results.jsonl"))


def test_a_node_with_another_nnodes_is_refused_by_both(tmp_path: Path) -> None:
    config, port = config_file(tmp_path, "c.yaml"), free_port()
    out = finish(tmp_path, {"n0": start(tmp_path, "n0", 0, 2, port, config),
                            "n1": start(tmp_path, "n1", 1, 3, port, config)})
    assert [code for code, _ in out.values()] == [2, 2], out
    for _, text in out.values():
        assert re.search(r"--nnodes differs: node 0 .*has --nnodes 2, node 1 .*has --nnodes 3", text), text
    assert no_record(tmp_path / "n0")


def test_a_node_with_another_config_is_refused_by_both(tmp_path: Path) -> None:
    mine, other, port = config_file(tmp_path, "mine.yaml"), config_file(tmp_path, "other.yaml", 4), free_port()
    start_s = time.monotonic()
    out = finish(tmp_path, {"n0": start(tmp_path, "n0", 0, 2, port, mine),
                            "n1": start(tmp_path, "n1", 1, 2, port, other)})
    assert [code for code, _ in out.values()] == [2, 2], out
    for _, text in out.values():
        found = re.search(r"the config differs: node 0 runs (\S+) \(sha256 (\w+)\), node 1 runs (\S+) \(sha256 (\w+)\)",
                          text)
        assert found and found.group(1) == str(mine) and found.group(3) == str(other), text
        assert found.group(2) != found.group(4)
    assert time.monotonic() - start_s < 60  # at once, not after a rendezvous timeout
    assert no_record(tmp_path / "n0")


def test_a_node_rank_given_twice_is_refused_before_any_cell(tmp_path: Path) -> None:
    """Whichever of the two runners with --node-rank 1 counts second is refused, naming the first.
    If node 0 hears of it before its cell list is out it refuses the sweep (every node exits 2);
    otherwise the sweep runs with the first (both exit 0). Either way nothing runs twice."""
    config, port = config_file(tmp_path, "c.yaml"), free_port()
    procs = {"n0": start(tmp_path, "n0", 0, 2, port, config), "n1a": start(tmp_path, "n1a", 1, 2, port, config),
             "n1b": start(tmp_path, "n1b", 1, 2, port, config)}
    pids = {label: p.pid for label, p in procs.items()}
    out = finish(tmp_path, procs)
    refused = [label for label in ("n1a", "n1b") if "node 1: refused: --node-rank 1 given twice" in out[label][1]]
    assert len(refused) == 1, out
    (loser,) = refused
    winner = "n1b" if loser == "n1a" else "n1a"
    text = out[loser][1]
    assert f"runner pid {pids[winner]} on " in text and f"runner pid {pids[loser]} on " in text, text
    assert "[1/1]" not in text  # the refused runner launched nothing
    assert out[loser][0] == 2 and (out["n0"][0], out[winner][0]) in ((0, 0), (2, 2)), out
    if out["n0"][0] == 0:
        (run_dir,) = [p for p in (tmp_path / "n0").iterdir() if p.is_dir()]
        records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
        assert [r["status"] for r in records] == ["ok"]
    else:
        assert "node 0: refused: --node-rank 1 given twice" in out["n0"][1] and no_record(tmp_path / "n0")
        assert "node 0 refused the nodes" in out[winner][1]
