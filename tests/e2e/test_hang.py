"""A hang and a straggler with real processes on gloo: one rank SIGSTOPped mid-measure (one node,
then two runners on this host), one rank really slowed (pinned to a core with a busy process, at a lower priority).

The test watches the ranks from outside as the runner does: each rank's ring file gives its pid
and how far it got (bench/worker/collective_ring.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bench.sweep.hang import STACKS_MARK
from bench.worker.collective_ring import read_ring
from tests.e2e.test_two_nodes import Nodes

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

MODEL = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128, "mlp_hidden": 64}
DATA = {"seq_len": 32, "global_batch": 4, "micro_num": 1, "packed": True, "seed": 7}
# Measures until stopped; the timeout leaves room for torchrun's start on 2 busy cores.
HANG = {"model": MODEL, "data": DATA, "parallel": {"world_size": 4, "sp": 2, "wp": 4},
        "run": {"warmup_steps": 1, "measure_steps": 100000, "timeout_s": 40}, "profile": {"enabled": False}}
SLOW = {"parallel.world_size": 2, "parallel.sp": 2, "parallel.wp": 2, "run.measure_steps": 8,
        "run.timeout_s": 200, "model.hidden": 128, "data.seq_len": 256}
MEASURING = 6  # two benchmark barriers per timed step: past the third step's start, it measures


def rings(root: Path, world: int) -> dict[int, dict]:
    """Every ring file under `root` of a cell with `world` ranks, by rank."""
    found = {}
    for path in root.glob("**/logs/*/rank*.ring"):
        try:
            ring = read_ring(path)
        except (OSError, ValueError):
            continue
        if ring["world_size"] == world:
            found[ring["rank"]] = ring
    return found


def bench_launches(ring: dict) -> int:
    return next((g["launched"] for g in ring["groups"] if g["name"] == "bench"), 0)


def wait_until(what: str, found: Callable[[], object], timeout: float = 200) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := found():
            return value
        time.sleep(0.1)
    raise AssertionError(what)


def stop_when_measuring(root: Path, pick: Callable[[dict[int, dict]], int | None]) -> dict:
    """SIGSTOP the rank `pick` names once it is measuring; its ring as it was then."""
    def ready() -> dict | None:
        found = rings(root, 4)
        rank = pick(found)
        ring = found.get(rank) if rank is not None else None
        return ring if ring is not None and bench_launches(ring) >= MEASURING else None

    ring = wait_until("the rank never started measuring", ready)
    os.kill(ring["pid"], signal.SIGSTOP)
    return ring


def assert_hang_record(record: dict, log_dir: Path, stopped: int, node: int, world: int = 4,
                       rank_logs: bool = True) -> None:
    assert record["status"] == "timeout", record["error"]
    error = record["error"]
    reason = error["reason"]
    assert reason.startswith(f"rank {stopped} (node {node}, stopped) "), reason
    hang = error["hang"]
    assert hang["stuck"] == [stopped] and [r["rank"] for r in hang["ranks"]] == list(range(world))
    where = hang["ranks"][stopped]["waiting"] or hang["ranks"][stopped]["last"]
    assert f"{where['kind']} #{where['seq']} on {where['group']} group" in reason  # its collective, named
    assert " wait in " in reason or " waits in " in reason, reason  # and where the others wait
    assert "timeout after 40s" in reason
    for info in hang["ranks"]:
        assert (log_dir / f"rank{info['rank']}.ring").is_file()
        if info["rank"] == stopped:  # a stopped rank answers nothing: its ring speaks for it
            assert info["process"] == "stopped" and info["stack"] == [] and info["flight_recorder"] is None
            continue
        assert info["process"] == "running" and info["stack"][0].startswith("Current thread")
        # Its stack is where its ring says it waits: in ISP's collectives, or in the bench's own
        # step barrier when the stopped rank was caught between two steps.
        waits_in_bench = (info["waiting"] or {}).get("group") == "bench"
        assert any(("bench/worker/" if waits_in_bench else "isp_core/") in frame for frame in info["stack"]), info
        if rank_logs:
            log = (log_dir / f"rank{info['rank']}.log").read_text()
            assert STACKS_MARK in log and "Current thread" in log.split(STACKS_MARK)[1]
        fr = json.loads((log_dir / f"fr_rank{info['rank']}.json").read_text())
        assert fr["entries"] and fr["entries"][-1]["profiling_name"].startswith("gloo:")
    assert (log_dir / f"hang.node{node}.json").is_file()


class Straggler(threading.Thread):
    """Pins every thread of rank 1 of the 2-rank cell, and a busy loop, to CPU 0 and lowers rank 1's
    priority (nice 5: a third of a nice-0 process' share) until the cell's record is written. The
    nice keeps rank 1 behind whatever else this shared machine runs, which the pinning alone does
    not: the scheduler moves other processes off a crowded core, evening the shares out."""

    def __init__(self, root: Path, records: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.records, self.busy = root, records, None
        self.pinned: set[int] = set()

    def run(self) -> None:
        ring = wait_until("the slowed cell never started", lambda: rings(self.root, 2).get(1))
        self.busy = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])
        while not self._cell_done():
            self._pin(ring["pid"], 0)  # again and again: threads started since inherit it, or not
            time.sleep(0.2)
        self.busy.kill()
        self.busy.wait()

    def _cell_done(self) -> bool:
        text = self.records.read_text() if self.records.is_file() else ""
        return any(json.loads(line)["config"]["parallel"]["world_size"] == 2 for line in text.splitlines())

    def _pin(self, pid: int, cpu: int) -> None:
        for task in Path(f"/proc/{pid}/task").glob("*"):  # threads started later inherit it
            try:
                os.sched_setaffinity(int(task.name), {cpu})
                os.setpriority(os.PRIO_PROCESS, int(task.name), 5)
                self.pinned.add(pid)
            except (OSError, ValueError):
                pass


def test_one_node_stopped_rank_named_with_dumps_and_a_slowed_rank_named_straggler(tmp_path: Path) -> None:
    config = {"name": "hang", "base": HANG, "include": [SLOW]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    runner = subprocess.Popen([sys.executable, str(REPO / "run_bench.py"), str(tmp_path / "sweep.yaml"),
                               "--results-dir", str(results), "--grace-s", "4"], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        stop_when_measuring(results, lambda found: 3)
        run_dir = wait_until("no run folder", lambda: next((p for p in results.iterdir() if p.is_dir()), None))
        slow = Straggler(results, run_dir / "results.jsonl")
        slow.start()
        out, _ = runner.communicate(timeout=400)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 1, out
    slow.join(timeout=30)
    hung, slowed = (json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines())
    assert_hang_record(hung, run_dir / "logs" / hung["cell"], stopped=3, node=0)
    assert " timeout " in out and ": rank 3 (node 0, stopped) " in out  # the progress line says it too
    assert slowed["status"] == "ok" and slow.pinned, slowed["error"]
    found = slowed["metrics"]["straggler"]
    assert found["slowest"]["rank"] == 1 and [s["rank"] for s in found["stragglers"]] == [1], found
    compute = slowed["metrics"]["per_rank"]["compute_s"]
    print("slowed cell compute_s per rank:", compute["values"], "straggler:", found)
    assert compute["values"][1] > 1.3 * compute["values"][0] and found["slowest"]["lag_pct"] > 10
    summary = (run_dir / "summary.md").read_text()
    assert f"`{slowed['cell']}`: rank 1 (node 0) +" in summary and "straggler" in summary
    judge_a_night_with_only_this_straggler(tmp_path / "nights", run_dir, slowed)


def _night(root: Path, run_dir: Path, day: int, record: dict) -> Path:
    """A copy of the real run folder holding one record, dated 2026-01-<day>."""
    night = root / f"202601{day:02d}-020000_hang"
    night.mkdir(parents=True)
    env = json.loads((run_dir / "env.json").read_text())
    (night / "env.json").write_text(json.dumps({**env, "utc": f"2026-01-{day:02d}T02:00:00+00:00"}))
    (night / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    cells = [c for c in json.loads((run_dir / "cells.json").read_text()) if c["cell"] == record["cell"]]
    (night / "cells.json").write_text(json.dumps(cells))
    (night / "results.jsonl").write_text(json.dumps({**record, "run": night.name}) + "\n")
    return night


def judge_a_night_with_only_this_straggler(root: Path, run_dir: Path, slowed: dict) -> None:
    """Six earlier nights of the same cell without a straggler, 20% faster (the record's own
    figures, its straggler fields emptied), then tonight's real record: the nightly labels the
    slowdown as the straggler's, names it, and does not call it a code regression (exit 3)."""
    db = root / "history.sqlite"
    for day in range(1, 7):
        calm = json.loads(json.dumps(slowed))
        step = calm["metrics"]["step_time_s"]
        step.update({k: v * 0.8 for k, v in step.items() if isinstance(v, float)},
                    samples=[x * 0.8 for x in step["samples"]])
        calm["metrics"]["tokens_per_s"] /= 0.8
        calm["metrics"]["straggler"].update(stragglers=[], node_stragglers=[],
                                            slowest={**calm["metrics"]["straggler"]["slowest"], "lag_pct": 1.0})
        out = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "history", "record",
                              str(_night(root, run_dir, day, calm)), "--db", str(db)], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    tonight = _night(root, run_dir, 7, slowed)
    out = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "nightly", "--run", str(tonight), "--db", str(db),
                          "--format", "json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    doc = json.loads((tonight / "nightly.json").read_text())
    assert out.returncode == 3 and doc["exit_code"] == 3 and doc["regressions"] == 0, out.stdout + out.stderr
    step = next(v for v in doc["series"] if v["metric"] == "step_time_s")
    assert step["status"] == "straggler" and step["note"].startswith("straggler rank 1 (node 0), lag "), step
    md = (tonight / "nightly.md").read_text()
    assert "## Straggler nights (not the code)" in md and "## Regressions" not in md, md


def test_two_nodes_stopped_rank_on_node_1_named_by_node_0(tmp_path: Path) -> None:
    nodes = Nodes(tmp_path, {"name": "hang2", "base": HANG}, "--grace-s", "4")
    try:
        # the highest global rank that runs on node 1 (the rendezvous, not the runner, numbers them)
        ring = stop_when_measuring(tmp_path / "r1", lambda found: max(found, default=None))
    finally:
        codes = nodes.wait()
    assert codes == [1, 1], nodes.output(0) + nodes.output(1)
    (record,) = nodes.records()
    log_dir = nodes.run_dir() / "logs" / record["cell"]
    # Not the rank logs themselves here: on main a node ships the empty marked logs of ranks that
    # ran elsewhere over node 0's (i23 fixes that); the stacks are in the record either way.
    assert_hang_record(record, log_dir, stopped=ring["rank"], node=1, rank_logs=False)
    assert record["error"]["reason"].endswith("(node 0: timeout after 40s; node 1: timeout after 40s)")
    assert {r["node"] for r in record["error"]["hang"]["ranks"]} == {0, 1}
    assert (log_dir / "hang.node0.json").is_file() and (log_dir / "hang.node1.json").is_file()
