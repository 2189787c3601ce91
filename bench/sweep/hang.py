"""The runner's side of a hang: before a cell's job is killed, take down what every rank was doing.

At a timeout (and after a job that lost a rank) the runner of each node, for its own ranks:
reads each rank's collective ring (`logs/<cell>/rank<r>.ring`, no help from the rank needed),
looks at each rank's process (running, stopped, exited), asks every live rank for its Python
stacks (SIGUSR2: faulthandler writes them into `rank<r>.log` after a marked line) and for a
Flight Recorder dump (`fr_rank<r>.json`), then writes all of it to `logs/<cell>/hang.node<k>.json`
(bench/worker/hang_watch.py is the ranks' side). With several nodes those files travel to node
0 with the rest of the cell's logs, and node 0 explains the hang over every node's ranks
(`across_nodes`). The explanation itself is bench/sweep/hang_diagnosis.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from bench.sweep import hang_diagnosis
from bench.worker.collective_ring import read_ring
from bench.worker.hang_watch import DUMP_REQUEST, STACK_SIGNAL, fr_path, node_index

if TYPE_CHECKING:
    from bench.sweep.launch import CellPaths, Outcome

STACKS_MARK = "==== Python stacks requested by the runner (SIGUSR2) ===="
DUMP_WAIT_S = 5.0  # how long live ranks get to write their stacks and Flight Recorder dumps
PEER_SKEW_S = 2.0  # how far apart the nodes' timers for one cell may fire
RECENT = 8  # launches per rank kept in the record
STACK_LINES = 24
_STATES = {"T": "stopped", "t": "stopped", "Z": "exited", "X": "exited"}


def clear(paths: CellPaths) -> None:
    """A new attempt must not be explained by an earlier one's rings and dumps."""
    for pattern in ("rank*.ring", "hang.node*.json", "fr_rank*.json", DUMP_REQUEST):
        for path in paths.log_dir.glob(pattern):
            path.unlink(missing_ok=True)


def process_state(pid: int, ring: Path) -> str:
    """running, stopped (SIGSTOP, a debugger) or exited; a reused pid, not mapping the ring, is exited."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        maps = Path(f"/proc/{pid}/maps").read_text()
    except (OSError, IndexError):
        return "exited"
    if str(ring.resolve()) not in maps:
        return "exited"
    return _STATES.get(state, "running")


def _launch(e: dict[str, Any], now_ns: int) -> dict[str, Any]:
    state = "done" if e["done_ns"] else ("waiting" if e["waiting_ns"] else "in flight")
    out = {k: e[k] for k in ("seq", "kind", "group", "ranks", "bytes")}
    out.update(state=state, issued_s_ago=round((now_ns - e["issued_ns"]) / 1e9, 3))
    if state == "waiting":
        out["waiting_s"] = round((now_ns - e["waiting_ns"]) / 1e9, 3)
    return out


def rank_info(ring: dict[str, Any], process: str, now_ns: int) -> dict[str, Any]:
    """One rank as the diagnosis and the record see it: where it waits, what it did last."""
    entries = [_launch(e, now_ns) for e in ring["entries"]]
    open_ = [e for e in entries if e["state"] != "done"]
    return {"rank": ring["rank"], "node": ring["node"], "local_rank": ring["local_rank"], "pid": ring["pid"],
            "world_size": ring["world_size"], "process": process, "launches": ring["launches"],
            "groups": ring["groups"], "waiting": next((e for e in reversed(open_) if e["state"] == "waiting"), None),
            "in_flight": next((e for e in reversed(open_) if e["state"] == "in flight"), None),
            "last": entries[-1] if entries else None, "recent": entries[-RECENT:]}


def _request_dumps(log_dir: Path, live: list[dict[str, Any]]) -> None:
    """Stacks by signal, Flight Recorder by request file; wait for the dumps (or DUMP_WAIT_S)."""
    (log_dir / DUMP_REQUEST).write_text(str(time.time()))
    for info in live:
        with open(log_dir / f"rank{info['rank']}.log", "a") as log:
            log.write(f"\n{STACKS_MARK}\n")
        try:
            os.kill(info["pid"], STACK_SIGNAL)
        except ProcessLookupError:
            pass
    # On a loaded host a signalled rank may wait a while for a core: wait for both dumps of every
    # live rank (its stacks in its log, its Flight Recorder file), up to DUMP_WAIT_S in all.
    deadline = time.monotonic() + DUMP_WAIT_S
    while time.monotonic() < deadline and not all(_dumped(log_dir, i["rank"]) for i in live):
        time.sleep(0.1)


def hold_for_peers(since: float) -> None:
    """Several nodes: keep this node's ranks, and with them their connections, alive until the
    other nodes, whose timers fire within PEER_SKEW_S of this one's (every node starts a cell at
    one go), have had their DUMP_WAIT_S. A node that killed its ranks at once closed the
    connections under ranks still dumping elsewhere: a rank on node 0 died of "Connection closed
    by peer" before writing its Flight Recorder. `since`: when this node began collecting."""
    time.sleep(max(0.0, since + DUMP_WAIT_S + PEER_SKEW_S - time.monotonic()))


def _dumped(log_dir: Path, rank: int) -> bool:
    return fr_path(log_dir, rank).is_file() and bool(main_thread_stack(log_dir / f"rank{rank}.log"))


def main_thread_stack(log: Path) -> list[str]:
    """The main thread's frames from the last stack dump in a rank's log (faulthandler's format)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    cut = text.rfind(STACKS_MARK)
    if cut < 0:
        return []
    sections, current = [], []
    for line in text[cut + len(STACKS_MARK):].splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            current = [line]
            sections.append(current)
        elif current and line.startswith("  File "):
            current.append(line.strip())
        elif current and line.strip() == "":
            current = []
    # The main thread is the one started by runpy (python -m bench.worker); others are helpers.
    main = next((s for s in sections if any("runpy" in f for f in s)), sections[0] if sections else [])
    return main[:STACK_LINES]


def collect(paths: CellPaths, live: bool) -> Optional[dict[str, Any]]:
    """This node's ranks, read before anything is killed (`live`: the job still runs, so ask
    the live ranks for their stacks and Flight Recorder too). None when no rank left a ring."""
    rings = []
    for path in sorted(paths.log_dir.glob("rank*.ring")):
        try:
            rings.append((path, read_ring(path)))
        except (OSError, ValueError):
            continue
    if not rings:
        return None
    now = time.monotonic_ns()
    ranks = [rank_info(ring, process_state(ring["pid"], path), now) for path, ring in rings]
    if live:
        _request_dumps(paths.log_dir, [r for r in ranks if r["process"] == "running"])
        (paths.log_dir / DUMP_REQUEST).unlink(missing_ok=True)
    for info in ranks:
        info["stack"] = main_thread_stack(paths.log_dir / f"rank{info['rank']}.log")
        fr = fr_path(paths.log_dir, info["rank"])
        info["flight_recorder"] = fr.name if fr.is_file() else None
    return {"node": node_index(), "host": socket.gethostname(), "ranks": ranks}


def explain(paths: CellPaths, error: dict[str, Any], doc: Optional[dict[str, Any]], timed_out: bool,
            rewrite: bool = True) -> dict[str, Any]:
    """Write this node's `hang.node<k>.json`; return the record's error with `hang` (the detail)
    and, when the rings say something a log tail does not, a reason naming the ranks
    (`rewrite`: this node's view is the whole cell's, one node)."""
    if doc is None:
        return error
    doc["cause"] = error["reason"]
    (paths.log_dir / f"hang.node{doc['node']}.json").write_text(json.dumps(doc, indent=1) + "\n")
    result = hang_diagnosis.summary([doc])
    if result is None or not (result["worth_saying"] or timed_out):
        return error
    return _with_reason(error, result, error["reason"], timed_out) if rewrite else {**error, "hang": result}


def _with_reason(error: dict[str, Any], result: dict[str, Any], cause: str, timed_out: bool) -> dict[str, Any]:
    reason = f"{result['reason']} ({cause})" if timed_out else f"{cause}; {result['reason']}"
    return {**error, "reason": reason, "hang": {**result, "cause": cause}}


def across_nodes(outcome: Outcome, paths: CellPaths) -> Outcome:
    """Node 0, several nodes: the cell's hang explained over every node's collected ranks."""
    if outcome.status not in ("timeout", "failed") or outcome.error is None:
        return outcome
    docs, since = [], time.time() - outcome.wall_s - 5.0  # this launch's, not an earlier attempt's
    for path in sorted(paths.log_dir.glob("hang.node*.json")):
        try:
            if path.stat().st_mtime >= since:
                docs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    result = hang_diagnosis.summary(docs) if docs else None
    if result is None or not (result["worth_saying"] or outcome.status == "timeout"):
        return outcome
    # The merged reason already says what each node saw ("node 0: timeout after 600s; node 1: ...",
    # a lost node included): the ranks' story goes beside it.
    error = _with_reason(outcome.error, result, outcome.error["reason"], outcome.status == "timeout")
    return dataclasses.replace(outcome, error=error)
