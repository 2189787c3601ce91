"""A sweep across several nodes: node 0 owns the run folder, the others run in step and keep a pointer.

Node 0's runner hosts the store, loads the config (or --resume's folder), creates the one run
folder and publishes the cell list; every other runner takes that list from the store (so it
needs neither the config's folder nor the run folder) and runs each cell in a staging folder
of its own, whose files go to node 0 after every cell (bench/sweep/lockstep.py). At the end
node 0 writes the summary; the others delete their staging folder and keep only
`<results-dir>/<run>.node<r>.json`, a pointer to node 0's folder.

Before any cell the nodes check each other (bench/sweep/roll_call.py), and each runner claims
its folder as a one-node runner does (runner.claimed(): the lock, a dead runner's processes,
a torn tail, a probe write): node 0 its run folder (in the caller's head_plan), every other
node its staging folder, whose lock token also tags its jobs.
"""

from __future__ import annotations

import dataclasses
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
from bench.sweep import env_info, lockstep, roll_call, runner
from bench.sweep.launch import CellPaths, LaunchOptions, Outcome
from bench.sweep.nodes import NodeSpec
from bench.sweep.runner import EXIT_FAILED_CELLS, EXIT_INTERRUPTED
from bench.sweep.team import NodeLost, Team
from bench.worker.hang_watch import NODE_ENV

EXIT_REFUSED = 2  # as a config error: nothing ran

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
        summarize: Callable[[Path], None], config_id: dict[str, str] | None = None) -> int:
    """This node's part of the sweep; the exit code as the one-node runner's.
    `config_id`: roll_call.config_identity() of the command's config, checked across nodes."""
    os.environ[NODE_ENV] = str(spec.node_rank)  # every rank's ring says which node it ran on
    try:
        team = Team(spec)
    except NodeLost as exc:
        print(exc, file=sys.stderr)
        return EXIT_REFUSED if spec.is_head else EXIT_FAILED_CELLS  # node 0: the port is taken
    run_dir = None
    try:
        roll_call.claim_rank(team)
        team.join({**node_entry(spec.node_rank), "nnodes": spec.nnodes, "config": config_id})
        if spec.is_head:
            run_dir, code = _head(team, head_plan, sweep, config_id)
        else:
            code = _member(team, results_dir, sweep, config_id)
    except roll_call.Refused as exc:
        print(f"node {spec.node_rank}: refused: {exc}", file=sys.stderr, flush=True)
        code = EXIT_REFUSED
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


def _head(team: Team, head_plan: HeadPlan, sweep: Sweep, config_id: dict[str, str] | None) -> tuple[Path | None, int]:
    roll_call.announce(team, config_id)
    try:
        run_dir, cells = head_plan()
    except (ConfigError, runner.RunRefused) as exc:
        lines = exc.messages if isinstance(exc, ConfigError) else [str(exc)]
        for line in lines:  # at once: the wait below can be long
            print(line, file=sys.stderr, flush=True)
        team.publish_plan({"error": lines, "what": "config" if isinstance(exc, ConfigError) else "run folder"})
        team.node_envs(team.spec.rdzv_timeout_s)  # the others may not be there yet to read it
        return None, EXIT_REFUSED
    nodes = team.node_envs(team.spec.rdzv_timeout_s)
    if problems := roll_call.problems(team, nodes, config_id):
        for line in problems:
            print(f"node 0: refused: {line}", file=sys.stderr, flush=True)
        team.publish_plan({"error": problems, "what": "nodes"})
        return None, EXIT_REFUSED  # the run folder has no record: nothing ran
    team.run_name = run_dir.name
    team.publish_plan({"run": run_dir.name, "run_dir": str(run_dir.resolve()), "host": socket.gethostname(),
                       "cells": [{"id": c.id, "swept": c.swept, "config": c.config.to_dict()} for c in cells]})
    if (run_dir / "env.json").is_file():
        _add_nodes(run_dir / "env.json", nodes, team.spec)
    print(f"{len(cells)} cell(s) on {team.spec.nnodes} nodes (endpoint {team.spec.endpoint}) -> {run_dir}",
          flush=True)
    return run_dir, sweep(run_dir, cells, functools.partial(lockstep.run_cell, team, run_dir))


def _add_nodes(path: Path, nodes: list[dict[str, Any]], spec: NodeSpec) -> None:
    env = json.loads(path.read_text())
    env.update({"nnodes": spec.nnodes, "rdzv_endpoint": spec.endpoint, "node_source": spec.source,
                "nodes": nodes})
    path.write_text(json.dumps(env, indent=1) + "\n")


def _member(team: Team, results_dir: Path, sweep: Sweep, config_id: dict[str, str] | None) -> int:
    r = team.spec.node_rank
    roll_call.check_head(team, config_id)
    plan = team.receive_plan()
    if "error" in plan:
        print(f"node {r}: node 0 refused the {plan.get('what', 'config')}:", *plan["error"], sep="\n",
              file=sys.stderr)
        return EXIT_REFUSED
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
    kept = False
    try:
        with runner.claimed(staging) as claim:  # what a dead runner of this node left is ended here
            return sweep(staging, cells, _tagged(functools.partial(lockstep.run_cell, team, staging), claim.token))
    except runner.RunRefused as exc:
        print(f"node {r}: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    except NodeLost:
        kept = True  # what could not be shipped stays here; --resume ships it with the cell's next attempt
        raise
    finally:
        if kept:
            print(f"node {r}: node 0 out of reach; files it did not get stay in {staging}", flush=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"node {r}: results on node 0 ({plan['host']}) in {plan['run_dir']}; pointer {pointer}", flush=True)


def _tagged(launcher: lockstep.LaunchFn, token: str) -> lockstep.LaunchFn:
    """The launcher with this runner's lock token in every job (a later runner finds its leftovers)."""
    def run(config: CellConfig, paths: CellPaths, opts: LaunchOptions) -> Outcome:
        return launcher(config, paths, dataclasses.replace(opts, run_token=token))
    return run
