"""A sweep across several nodes: node 0 owns the run folder, the others run in step and keep a pointer.

Node 0's runner hosts the store, loads the config (or --resume's folder), creates the one run
folder and publishes the cell list; every other runner takes that list from the store (so it
needs neither the config's folder nor the run folder) and runs each cell in a staging folder
of its own, whose files go to node 0 after every cell (bench/sweep/lockstep.py). At the end
node 0 writes the summary; the others delete their staging folder and keep only
`<results-dir>/<run>.node<r>.json`, a pointer to node 0's folder.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.config import CellConfig, ConfigError
from bench.config.matrix import Cell
from bench.sweep import env_info, lockstep
from bench.sweep.nodes import NodeSpec
from bench.sweep.runner import EXIT_FAILED_CELLS, EXIT_INTERRUPTED
from bench.sweep.team import NodeLost, Team
from bench.worker.hang_watch import NODE_ENV

# What env.json says about every node (compare diffs the flat keys, which stay node 0's).
NODE_KEYS = ("hostname", "platform", "cpu_count", "torch", "cuda", "nccl", "cuda_available", "gpu",
             "gpu_count", "driver", "git_commit")
FINISH_WAIT_S = 60.0

HeadPlan = Callable[[], tuple[Path, list[Cell]]]  # run folder (created) and the cells to run
Sweep = Callable[[Path, list[Cell], lockstep.LaunchFn], int]  # the runner, with its launcher


def node_entry(node_rank: int) -> dict[str, Any]:
    env = env_info.collect()
    return {"node_rank": node_rank, **{k: env.get(k) for k in NODE_KEYS}}


def run(spec: NodeSpec, results_dir: Path, head_plan: HeadPlan, sweep: Sweep,
        summarize: Callable[[Path], None]) -> int:
    """This node's part of the sweep; the exit code as the one-node runner's."""
    os.environ[NODE_ENV] = str(spec.node_rank)  # every rank's ring says which node it ran on
    try:
        team = Team(spec)
    except NodeLost as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILED_CELLS
    run_dir = None
    try:
        team.join(node_entry(spec.node_rank))
        if spec.is_head:
            run_dir, code = _head(team, head_plan, sweep)
        else:
            code = _member(team, results_dir, sweep)
    except KeyboardInterrupt:
        team.stop_all(team.heartbeat.stop_reason or f"node {spec.node_rank} interrupted")
        print("interrupted", flush=True)
        code = EXIT_INTERRUPTED
    except NodeLost as exc:
        print(f"node {spec.node_rank}: {exc}; stopping", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:  # Ctrl-C between cells too: every node stops
        team.stop_all(team.heartbeat.stop_reason or f"node {spec.node_rank} interrupted")
    team.finish(FINISH_WAIT_S)
    if run_dir is not None:
        summarize(run_dir)
    return code


def _head(team: Team, head_plan: HeadPlan, sweep: Sweep) -> tuple[Path, int]:
    try:
        run_dir, cells = head_plan()
    except ConfigError as exc:
        for line in exc.messages:  # at once: the wait below can be long
            print(line, file=sys.stderr, flush=True)
        team.publish_plan({"error": exc.messages})
        team.node_envs(team.spec.rdzv_timeout_s)  # the others may not be there yet to read it
        team.finish(FINISH_WAIT_S)
        raise ConfigError([]) from None  # printed above; the exit code stays 2
    team.run_name = run_dir.name
    team.publish_plan({"run": run_dir.name, "run_dir": str(run_dir.resolve()), "host": socket.gethostname(),
                       "cells": [{"id": c.id, "swept": c.swept, "config": c.config.to_dict()} for c in cells]})
    if (run_dir / "env.json").is_file():
        _add_nodes(run_dir / "env.json", team.node_envs(team.spec.rdzv_timeout_s), team.spec)
    print(f"{len(cells)} cell(s) on {team.spec.nnodes} nodes (endpoint {team.spec.endpoint}) -> {run_dir}",
          flush=True)
    return run_dir, sweep(run_dir, cells, functools.partial(lockstep.run_cell, team, run_dir))


def _add_nodes(path: Path, nodes: list[dict[str, Any]], spec: NodeSpec) -> None:
    env = json.loads(path.read_text())
    env.update({"nnodes": spec.nnodes, "rdzv_endpoint": spec.endpoint, "node_source": spec.source,
                "nodes": nodes})
    path.write_text(json.dumps(env, indent=1) + "\n")


def _member(team: Team, results_dir: Path, sweep: Sweep) -> int:
    r = team.spec.node_rank
    plan = team.receive_plan()
    if "error" in plan:
        print(f"node {r}: node 0 refused the config:", *plan["error"], sep="\n", file=sys.stderr)
        return 2
    team.run_name = plan["run"]
    results_dir.mkdir(parents=True, exist_ok=True)
    pointer = results_dir / f"{plan['run']}.node{r}.json"
    pointer.write_text(json.dumps({"node_rank": r, "nnodes": team.spec.nnodes, "head_host": plan["host"],
                                   "rdzv_endpoint": team.spec.endpoint, "run_dir_on_node0": plan["run_dir"]},
                                  indent=1) + "\n")
    staging = results_dir / f".node{r}-{plan['run']}"
    staging.mkdir(parents=True, exist_ok=True)
    cells = [Cell(c["id"], c["swept"], CellConfig.from_dict(c["config"])) for c in plan["cells"]]
    print(f"node {r}: {len(cells)} cell(s), records on node 0 ({plan['host']}): {plan['run_dir']}", flush=True)
    try:
        return sweep(staging, cells, functools.partial(lockstep.run_cell, team, staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"node {r}: results on node 0 ({plan['host']}) in {plan['run_dir']}; pointer {pointer}", flush=True)
