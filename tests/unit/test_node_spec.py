"""Which node a runner is (flags, Slurm variables) and how node 0 merges the nodes' outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.config import ConfigError
from bench.sweep.launch import CellPaths, Outcome
from bench.sweep.lockstep import merge
from bench.sweep.nodes import from_flags, from_slurm, resolve


def test_flags_give_the_node_and_the_endpoint() -> None:
    spec = from_flags(2, 1, "10.0.0.5:29511")
    assert spec is not None and (spec.nnodes, spec.node_rank, spec.host, spec.port) == (2, 1, "10.0.0.5", 29511)
    assert not spec.is_head and spec.endpoint == "10.0.0.5:29511"


def test_no_flag_or_nnodes_1_means_one_node() -> None:
    assert from_flags(None, None, None) is None
    assert resolve(1, None, None) is None


@pytest.mark.parametrize(("nnodes", "rank", "endpoint", "needle"), [
    (2, None, "h:1", "--node-rank missing"),
    (2, 0, None, "--rdzv-endpoint missing"),
    (2, 2, "h:1", "node rank 2 outside 0..1"),
    (2, 0, "h", "expected HOST:PORT"),
    (2, 0, "h:70000", "port 70000 outside"),
])
def test_bad_flags_are_config_errors_naming_the_flag(nnodes: int, rank: int | None, endpoint: str | None,
                                                     needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_flags(nnodes, rank, endpoint)
    assert needle in " ".join(err.value.messages)


def test_outside_a_slurm_step_or_in_a_one_node_step_there_is_one_node() -> None:
    # The batch script sees SLURM_NNODES=2 but is one process on one node: it must not wait for a second.
    assert from_slurm({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "0"}) is None
    assert from_slurm({"SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0"}) is None


def test_slurm_step_with_several_tasks_per_node_is_refused() -> None:
    env = {"SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NODEID": "0", "SLURM_JOB_ID": "7",
           "SLURM_STEP_NODELIST": "n[1-2]"}
    with pytest.raises(ConfigError, match="one task per node"):
        from_slurm(env)


def _paths(tmp: Path) -> CellPaths:
    paths = CellPaths.under(tmp, "c")
    paths.result.parent.mkdir(parents=True)
    return paths


def _failed(reason: str, code: int | None, interrupted: bool = False) -> Outcome:
    return Outcome("interrupted" if interrupted else "failed", None,
                   {"reason": reason, "exit_code": code, "rank": None, "log_file": "logs/c/x.log",
                    "log_tail": "..."}, 1.0)


def test_merge_ok_when_every_node_exited_0_and_one_shipped_the_result(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    paths.result.write_text(json.dumps({"metrics": {"loss": [1.0]}}))
    # Node 0's own launch saw no result.json (global rank 0 ran on node 1): that is not a failure.
    merged = merge({0: _failed("exited 0 but rank 0 left no readable result.json", 0),
                    1: Outcome("ok", {"loss": [1.0]}, None, 1.0)}, paths, 2.0)
    assert merged.status == "ok" and merged.metrics == {"loss": [1.0]} and merged.wall_s == 2.0


def test_merge_names_every_failing_node(tmp_path: Path) -> None:
    merged = merge({0: _failed("rank 0 exited with code 1", 1), 1: "lost node 1 (no heartbeat for 20s)"},
                   _paths(tmp_path), 3.0)
    assert merged.status == "failed" and not merged.interrupted
    assert merged.error["reason"] == "node 0: rank 0 exited with code 1; node 1: lost node 1 (no heartbeat for 20s)"
    assert merged.error["log_tail"] == "..."


def test_merge_without_any_result_fails_and_an_interruption_stops_the_sweep(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    assert "no readable result.json" in merge({0: _failed("x", 0), 1: _failed("y", 0)}, paths, 1.0).error["reason"]
    merged = merge({0: _failed("interrupted: node 1 interrupted", None, interrupted=True),
                    1: _failed("interrupted: node 1 interrupted", None, interrupted=True)}, paths, 1.0)
    assert merged.interrupted and merged.status == "interrupted"
