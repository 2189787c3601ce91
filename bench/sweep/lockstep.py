"""One cell on every node at once: arrive, launch, ship, agree.

Each node's runner arrives at the cell; node 0 says go once all have (or fails the cell for
every node when one does not arrive in time or its heartbeat stops); each node runs the
cell's torchrun job with c10d rendezvous at the sweep's endpoint; the other nodes then ship
what their ranks wrote (logs, traces, result.json where global rank 0 ran) to node 0 through
the store and delete it locally; node 0 writes the files into the run folder, merges the
outcomes and publishes the cell's agreed outcome, which every node reports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.config import CellConfig
from bench.metrics.loss_check import REFERENCE_FILE
from bench.metrics.roofline import LINKS_FILE
from bench.sweep import attempt_logs, peer_loss
from bench.sweep.launch import (
    CellPaths,
    LaunchOptions,
    Outcome,
    judged_result,
    launch,
    read_result,
)
from bench.sweep import hang
from bench.sweep.team import NodeLost, Team

LaunchFn = Callable[[CellConfig, CellPaths, LaunchOptions], Outcome]
INTERRUPTED_WAIT_S = 30.0  # after a stop, how long node 0 waits for the others' files
CELL_INPUTS = (LINKS_FILE, REFERENCE_FILE)  # beside the cell's config; node 0's go to every node


def torchrun_args(team: Team, n: int, opts: LaunchOptions) -> LaunchOptions:
    """The cell's launch options: torchrun with c10d rendezvous at the team's store."""
    spec = team.spec
    rdzv = (f"--nnodes={spec.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={spec.endpoint}",
            f"--rdzv-id={team.run_name}-{n}",
            # The runner's store is there already: torchrun must not try to host its own.
            f"--rdzv-conf=is_host=false,join_timeout={int(spec.rdzv_timeout_s)}")
    return dataclasses.replace(opts, torchrun_args=(*rdzv, *opts.torchrun_args))


def _error(reason: str) -> dict[str, Any]:
    return {"reason": reason, "exit_code": None, "rank": None, "log_file": None, "log_tail": ""}


def _as_json(outcome: Outcome) -> dict[str, Any]:
    return dataclasses.asdict(outcome)


def _from_json(doc: dict[str, Any]) -> Outcome:
    fields = {f.name for f in dataclasses.fields(Outcome)}
    values = {k: v for k, v in doc.items() if k in fields}
    values["warnings"] = tuple(values.get("warnings") or ())
    return Outcome(**values)


def as_interrupted(outcome: Outcome) -> Outcome:
    """The outcome of a job a stop cut short (status interrupted, with an error to say so)."""
    if outcome.interrupted:
        return outcome
    return dataclasses.replace(outcome, status="interrupted", error=outcome.error or _error("interrupted"))


def ran_clean(outcome: Outcome) -> bool:
    """This node's torchrun exited 0: ok, or ok but global rank 0 (with result.json) ran elsewhere."""
    return outcome.status == "ok" or (outcome.error or {}).get("exit_code") == 0


def run_cell(team: Team, run_dir: Path, config: CellConfig, paths: CellPaths, opts: LaunchOptions,
             launch_fn: LaunchFn = launch) -> Outcome:
    n = team.launches
    team.launches += 1
    start = time.monotonic()
    if team.heartbeat.stop_reason:
        return _interrupted_before(team, start)
    team.put(f"c{n}/arrived/{team.spec.node_rank}", True)
    if (refused := _go(team, n, start, paths)) is not None:
        return refused
    if not team.spec.is_head:
        attempt_logs.seal(paths.log_dir, team.spec.node_rank)
    local = _launch(team, launch_fn, config, paths, torchrun_args(team, n, opts))
    if team.spec.is_head:
        return _settle(team, n, run_dir, paths, local, start)
    _ship(team, n, run_dir, paths, local)
    if local.interrupted:
        return local  # node 0 records the cell; this node stops without waiting for it
    if team.wait_for(lambda: team.has(f"c{n}/final"), give_up=_stopped(team)) is not None:
        return _why_stopped(team, as_interrupted(local))
    return _from_json(team.take(f"c{n}/final"))


def _launch(team: Team, launch_fn: LaunchFn, config: CellConfig, paths: CellPaths, opts: LaunchOptions) -> Outcome:
    """The local torchrun job, which a stop from another node may interrupt (and only it), and
    which node 0 ends when a peer is lost (the cell then fails, naming the lost node)."""
    team.heartbeat.lost_peer = None
    with peer_loss.ends_the_job():
        team.heartbeat.in_launch.set()
        try:
            if team.heartbeat.stop_reason:  # came in just before: do not start the job at all
                local = Outcome("interrupted", None, _error("interrupted"), 0.0)
            else:
                local = launch_fn(config, paths, opts)
        finally:
            team.heartbeat.in_launch.clear()
    if team.heartbeat.stop_reason and local.status != "ok":  # came in as the job ended: an ok job stays ok
        local = as_interrupted(local)
    elif local.interrupted and (lost := team.heartbeat.lost_peer):
        return dataclasses.replace(local, status="failed", error={**(local.error or {}), "reason": f"job ended: {lost}"})
    return _why_stopped(team, local) if local.interrupted else local


def _stopped(team: Team) -> Callable[[], str | None]:
    return lambda: team.heartbeat.stop_reason


def _go(team: Team, n: int, start: float, paths: CellPaths) -> Outcome | None:
    """None: launch. Otherwise the cell's outcome without a launch (a node missing or lost).

    The go carries node 0's cell inputs (links.json for metrics.roofline, the shared loss
    reference of bench/sweep/references.py): global rank 0, which computes the record, may run
    on any node and must see the same inputs.
    """
    arrived = [f"c{n}/arrived/{r}" for r in range(team.spec.nnodes)]
    inputs = [paths.config.parent / name for name in CELL_INPUTS]
    if not team.spec.is_head:
        if team.wait_for(lambda: team.has(f"c{n}/go") or team.has(f"c{n}/final"), give_up=_stopped(team)):
            return _interrupted_before(team, start)
        if not team.has(f"c{n}/go"):
            return _from_json(team.take(f"c{n}/final"))
        shipped = team.take(f"c{n}/go")["inputs"]
        for path in inputs:
            if (text := shipped.get(path.name)) is not None:
                path.write_text(text)
            else:
                path.unlink(missing_ok=True)
        return None
    timeout = team.spec.rdzv_timeout_s
    lost = team.lost_from(team.others)
    why = team.wait_for(lambda: team.has(*arrived), timeout, lambda: _stopped(team)() or lost())
    if why is not None and team.heartbeat.stop_reason:
        outcome = _interrupted_before(team, start)
        team.put(f"c{n}/final", _as_json(outcome))
        return outcome
    if why is None:
        team.put(f"c{n}/go", {"inputs": {p.name: p.read_text() if p.is_file() else None for p in inputs}})
        return None
    if why == "timeout":
        missing = [str(r) for r, key in enumerate(arrived) if not team.has(key)]
        why = f"rendezvous timeout: node {', '.join(missing)} did not arrive within {timeout:g}s"
    outcome = Outcome("failed", None, _error(why), time.monotonic() - start)
    team.put(f"c{n}/final", _as_json(outcome))
    return outcome


def _interrupted_before(team: Team, start: float) -> Outcome:
    reason = f"interrupted before the launch: {team.heartbeat.stop_reason}"
    return Outcome("interrupted", None, _error(reason), time.monotonic() - start)


def _why_stopped(team: Team, local: Outcome) -> Outcome:
    """Tell every node to stop (first reason wins) and say in the record who stopped the sweep."""
    reason = team.heartbeat.stop_reason
    if reason is None:
        reason = team.heartbeat.stop_reason = f"node {team.spec.node_rank} interrupted"
        team.stop_all(reason)
    error = {**(local.error or _error("")), "reason": f"interrupted: {reason}"}
    return dataclasses.replace(local, error=error)


def _files_to_ship(run_dir: Path, paths: CellPaths) -> dict[str, Path]:
    """What this node's ranks wrote for the cell, by path in node 0's run folder."""
    cell_id = paths.config.parent.name
    found = {}
    for folder in (paths.log_dir, run_dir / "traces" / cell_id):
        found.update({str(f.relative_to(run_dir)): f for f in sorted(folder.rglob("*")) if f.is_file()})
    if paths.result.is_file():
        found[str(paths.result.relative_to(run_dir.resolve()))] = paths.result
    return found


def _ship(team: Team, n: int, run_dir: Path, paths: CellPaths, local: Outcome) -> None:
    r = team.spec.node_rank
    run_dir = run_dir.resolve()
    manifest, shipped = {}, []
    for i, (rel, path) in enumerate(_files_to_ship(run_dir, paths).items()):
        shipped.append(path)
        if Path(rel).name == "torchrun.log":  # every node has one: keep them apart
            rel = str(Path(rel).with_name(f"torchrun.node{r}.log"))
        elif rel.endswith(".log") and attempt_logs.only_marks(path.read_bytes()):
            continue  # marked for a rank that ran on another node: node 0's copy is the real one
        key = f"c{n}/file/{r}/{i}"
        team.put_bytes(key, path.read_bytes())
        manifest[rel] = key
    error = local.error
    if error and error.get("log_file", "").endswith("torchrun.log"):
        error = {**error, "log_file": error["log_file"].replace("torchrun.log", f"torchrun.node{r}.log")}
    team.put(f"c{n}/outcome/{r}", {"outcome": _as_json(dataclasses.replace(local, error=error)),
                                    "files": manifest})
    # A set has no answer (it may sit in this kernel's buffer on a dead link): only a call that
    # is answered says node 0 has it all. Until then the files stay (NodeLost keeps the folder).
    if not team.has(f"c{n}/outcome/{r}"):
        raise NodeLost(f"node 0 did not keep node {r}'s outcome of launch {n}")
    for path in shipped:
        path.unlink()


def _receive(team: Team, n: int, run_dir: Path, r: int, mark: str) -> Outcome:
    doc = team.take(f"c{n}/outcome/{r}")
    for rel, key in doc["files"].items():
        dest = run_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = team.take_bytes(key)
        if rel.startswith("logs/") and rel.endswith(".log"):
            attempt_logs.append(dest, data, mark, r)
        else:
            dest.write_bytes(data)
    return _from_json(doc["outcome"])


def _settle(team: Team, n: int, run_dir: Path, paths: CellPaths, local: Outcome, start: float) -> Outcome:
    """Node 0: every node's outcome and files in, one verdict out."""
    keys = {r: f"c{n}/outcome/{r}" for r in team.others}
    def pending() -> list[int]:
        return [r for r, k in keys.items() if not team.has(k)]

    why = team.wait_for(lambda: not pending(), give_up=_lost_or_late(team, pending))
    per_node: dict[int, Outcome | str] = {0: local}
    mark = attempt_logs.last_mark(paths.torchrun_log)
    for r in team.others:
        per_node[r] = _receive(team, n, run_dir.resolve(), r, mark) if team.has(keys[r]) else (
            why if why != "timeout" else f"node {r} sent nothing within {INTERRUPTED_WAIT_S:g}s of the stop")
    merged = hang.across_nodes(merge(per_node, paths, time.monotonic() - start), paths)
    team.put(f"c{n}/final", _as_json(merged))
    return merged


def _lost_or_late(team: Team, pending: Callable[[], list[int]]) -> Callable[[], str | None]:
    """A pending node is lost; or the sweep is stopping and it had INTERRUPTED_WAIT_S to ship."""
    stop_seen: list[float] = []

    def check() -> str | None:
        if (lost := team.lost_from(pending())()) is not None:
            return lost
        if team.heartbeat.stop_reason and not stop_seen:
            stop_seen.append(time.monotonic())
        return "timeout" if stop_seen and time.monotonic() - stop_seen[0] > INTERRUPTED_WAIT_S else None
    return check


def merge(per_node: dict[int, Outcome | str], paths: CellPaths, wall_s: float) -> Outcome:
    """ok only when every node's torchrun exited 0 and some node's global rank 0 left a result."""
    outcomes = [o for o in per_node.values() if isinstance(o, Outcome)]
    interrupted = any(o.interrupted for o in outcomes)
    problems = [(r, o) for r, o in sorted(per_node.items()) if isinstance(o, str) or not ran_clean(o)]
    if not problems:
        metrics, problem = read_result(paths.result)
        if problem is None:
            # job_s: node 0's own job, which the record's phases add up to (the rest is coordination)
            job_s = per_node[0].job_s if isinstance(per_node.get(0), Outcome) else None
            return Outcome("ok", metrics, None, wall_s, job_s=job_s)  # a later stop is seen before the next cell
        return Outcome("interrupted" if interrupted else "failed", None,
                       _error(f"every node exited 0 but {problem}"), wall_s)
    first = next((o for _, o in problems if isinstance(o, Outcome) and o.error), None)
    error = dict(first.error) if first else _error("")
    error["reason"] = "; ".join(f"node {r}: {o if isinstance(o, str) else o.error['reason']}" for r, o in problems)
    timed_out = any(isinstance(o, Outcome) and o.status == "timeout" for _, o in problems)
    status = "interrupted" if interrupted else ("timeout" if timed_out else "failed")
    metrics, _ = judged_result(paths.result)  # a collectives check that failed still has its figures
    return Outcome(status, metrics, error, wall_s)

