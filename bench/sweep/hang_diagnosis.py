"""Which rank holds the others up, and where each one is: read from every rank's collective ring.

Every member of a process group issues the group's collectives in the same order, so each
launch has the same sequence number on every member (bench/worker/collective_ring.py). A rank
waiting in `all_gather #58` on a group is held up by each member that has launched fewer than
58 collectives there. Those members are *behind*; the ones behind that are not themselves
waiting in a collective (computing, stopped, dead) are where the hang is. The reason reads

    rank 3 (node 1, stopped) past reduce_scatter #57 on weight group [0..3]; ranks 0-2 wait in
    all_gather #58 on weight group [0..3]

"in X" means the rank is blocked inside X, "past X" that X (its last launch) completed and it
is outside any collective; the state in brackets is its process' (stopped: SIGSTOP or a
debugger; exited: gone before the runner looked). When every member launched the collective
and it still did not complete, the transport is stuck, not a rank, and the reason says that.
Pure: the runner's collection is bench/sweep/hang.py.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

from bench.worker.collective_ring import ranks_text

Info = dict[str, Any]  # one rank as bench/sweep/hang.py collects it


def span(ranks: list[int]) -> str:
    """[0,1,2,5] -> 'ranks 0-2,5'; [3] -> 'rank 3'."""
    ranks = sorted(ranks)
    parts, start = [], 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or ranks[i] != ranks[i - 1] + 1:
            lo, hi = ranks[start], ranks[i - 1]
            parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
            start = i
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(parts)


def launch_text(e: dict[str, Any]) -> str:
    return f"{e['kind']} #{e['seq']} on {e['group']} group [{ranks_text(tuple(e['ranks']))}]"


def _group_key(e: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
    return e["group"], tuple(e["ranks"])


def _launched(info: Info, key: tuple[str, tuple[int, ...]]) -> int:
    for g in info.get("groups", []):
        if (g["name"], tuple(g["ranks"])) == key:
            return int(g["launched"])
    return 0


def _who(info: Info) -> str:
    state = info.get("process", "running")
    return f"node {info['node']}" + ("" if state == "running" else f", {state}")


def behind_ranks(ranks: dict[int, Info], waiting: dict[int, Info]) -> dict[int, list[int]]:
    """rank -> the waiting ranks it holds up (members that have not launched what they wait in)."""
    held: dict[int, list[int]] = defaultdict(list)
    for r, e in waiting.items():
        for m in e["ranks"]:
            if m != r and (m not in ranks or _launched(ranks[m], _group_key(e)) < e["seq"]):
                held[m].append(r)
    return dict(held)


def _where(info: Info) -> str:
    if info.get("waiting"):
        return f"in {launch_text(info['waiting'])}"
    last = info.get("last")
    where = f"past {launch_text(last)}" if last else "before its first collective"
    if info.get("in_flight") and info["in_flight"] != last:
        where += f", {info['in_flight']['kind']} #{info['in_flight']['seq']} in flight"
    return where


def _blocked_in(ranks: dict[int, Info]) -> dict[int, Info]:
    """Each rank's explicit wait. When no rank was seen waiting (DDP's reducer waits in C++, out of
    the log's sight), a rank's newest launch that did not complete stands for its wait."""
    waiting = {r: i["waiting"] for r, i in ranks.items() if i.get("waiting")}
    if waiting:
        return waiting
    return {r: i["in_flight"] for r, i in ranks.items() if i.get("in_flight")}


def _describe(r: int, ranks: dict[int, Info], waiting: dict[int, Info]) -> str:
    if r not in ranks:
        return f"rank {r} (no ring: never started, or its node sent nothing)"
    where = f"in {launch_text(waiting[r])}" if r in waiting else _where(ranks[r])
    return f"rank {r} ({_who(ranks[r])}) {where}"


def _waiters(waiting: dict[int, Info], skip: list[int], gone: set[int]) -> list[str]:
    """'ranks 1,2 wait in all_to_all #100 on sequence groups [0,1], [2,3]': one part per launch
    ('waited ... (then exited)' when they all died in it: torchrun ends the others when one fails)."""
    by_launch: dict[tuple[str, int, str], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    for r, e in waiting.items():
        if r not in skip:
            by_launch[(e["kind"], e["seq"], e["group"])].append((r, tuple(e["ranks"])))
    parts = []
    for (kind, seq, group), members in sorted(by_launch.items(), key=lambda kv: min(r for r, _ in kv[1])):
        rs, sets = [r for r, _ in members], sorted({g for _, g in members})
        where = ", ".join(f"[{ranks_text(g)}]" for g in sets)
        verb = "waited" if set(rs) <= gone else ("waits" if len(rs) == 1 else "wait")
        parts.append(f"{span(rs)} {verb} in {kind} #{seq} on {group} group{'s' if len(sets) > 1 else ''} {where}"
                     + (" (then exited)" if set(rs) <= gone else ""))
    return parts


def diagnose(ranks: dict[int, Info], world_size: int) -> dict[str, Any]:
    """{"reason": one line, "stuck": [ranks], "behind": {rank: [waiters]}, "waiting": {rank: launch},
    "missing": [ranks without a ring]} from every rank the runners could read.

    Stuck: a rank whose process is stopped, one gone while outside any collective, and every rank
    that others wait for while it waits in no collective itself (when all of those wait, the
    cycle's members; when nothing else is found, the ranks that are gone)."""
    missing = [r for r in range(world_size) if r not in ranks]
    waiting = _blocked_in(ranks)
    held = behind_ranks(ranks, waiting)
    stopped = {r for r, i in ranks.items() if i.get("process") == "stopped"}
    gone = {r for r, i in ranks.items() if i.get("process") == "exited"}
    suspects = stopped | {r for r in gone if r not in waiting} | {r for r in held if r in missing or r not in waiting}
    stuck = sorted(suspects) or sorted(held) or sorted(gone)
    down = stopped | gone
    parts = [_describe(r, ranks, waiting) for r in stuck] + _waiters(waiting, stuck, gone)
    if waiting and not held and not down:
        parts.append("launched by every member of its group, not completed: the transport, not a rank, is stuck")
    elif not waiting:
        parts.append("no rank is waiting in a collective" +
                     (f" ({span(sorted(ranks))} outside collectives)" if ranks else ""))
    idle = [r for r in ranks if r not in waiting and r not in stuck]
    if waiting and idle:
        parts.append(f"{span(idle)} outside collectives")
    if set(missing) - set(stuck):
        parts.append(f"{span(sorted(set(missing) - set(stuck)))}: no ring")
    return {"reason": "; ".join(parts), "stuck": stuck, "behind": {str(k): v for k, v in sorted(held.items())},
            "waiting": {str(r): waiting[r] for r in sorted(waiting)}, "missing": missing}


def merged_ranks(nodes: list[dict[str, Any]]) -> tuple[dict[int, Info], int]:
    """Every node's collected ranks in one map, and the world size their rings give."""
    ranks: dict[int, Info] = {}
    world = 0
    for doc in nodes:
        for info in doc.get("ranks", []):
            ranks[int(info["rank"])] = info
            world = max(world, int(info.get("world_size", 0)))
    return ranks, world


def worth_saying(result: dict[str, Any], ranks: dict[int, Info]) -> bool:
    """Something a log tail would not say: a rank in a collective, or one stopped. (Ranks that all
    exited outside collectives, a cell failing its own check, say nothing new.)"""
    return bool(result["waiting"]) or any(i.get("process") == "stopped" for i in ranks.values())


def summary(nodes: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The diagnosis of every collected node, with each rank's detail; None without a ring."""
    ranks, world = merged_ranks(nodes)
    if not ranks:
        return None
    result = diagnose(ranks, world)
    result["ranks"] = [ranks[r] for r in sorted(ranks)]
    result["nodes"] = [{k: v for k, v in doc.items() if k != "ranks"} for doc in nodes]
    result["worth_saying"] = worth_saying(result, ranks)
    return result
