"""Before any cell, every node checks the others: one runner per node rank, one node count, one config.

- Node ranks are claimed by counting: the runner that adds `claim/<r>` and gets 2 was given a
  rank another runner already holds, and is refused, naming both runners.
- Node 0 publishes its node count and config hash (`head`) as soon as it hosts the store;
  every other node compares its own on arrival and refuses on a difference, naming both values.
- A refusal is also written to `refused` (first reason wins). Node 0, which waits for every
  node to join before it publishes the cell list, refuses the whole sweep when it sees one, or
  when what a node joined with differs from its own: every node then exits 2. A runner refused
  after the cell list is out (it came late) exits 2 alone; the sweep treats it as a node that
  did not arrive.

The config hash is over the YAML document after --set, and --filter: comments, spacing and the
path do not count. A node that cannot read the config (the others need not have its folder,
and a --resume folder is node 0's) has no hash and is not compared on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from bench.config.file import apply_overrides, read_doc
from bench.config.schema import ConfigError
from bench.sweep.team import Team


class Refused(Exception):
    """This node may not take part: str() names both values."""


def config_identity(path: Path | None, overrides: list[str], cell_filter: str | None) -> dict[str, str] | None:
    """{"source", "sha256"} of the config this command names; None when it cannot be read here."""
    try:
        doc, label = read_doc(path)
        doc = apply_overrides(doc, overrides, label)
    except (ConfigError, OSError):
        return None
    text = json.dumps({"doc": doc, "filter": cell_filter}, sort_keys=True, default=str)
    return {"source": label, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _runner(who: dict[str, Any]) -> str:
    return f"runner pid {who.get('pid', '?')} on {who.get('host', '?')}"


def _config_text(identity: dict[str, str] | None) -> str:
    return "?" if identity is None else f"{identity['source']} (sha256 {identity['sha256']})"


def claim_rank(team: Team) -> None:
    """Hold this node rank, or raise Refused when another runner holds it."""
    r = team.spec.node_rank
    n = team.count(f"claim/{r}", 1)
    team.put(f"claimant/{r}/{n}", _me())
    if n > 1:
        team.holds_rank = False
        first = team.take(f"claimant/{r}/1") if team.has(f"claimant/{r}/1") else {}
        _refuse(team, f"--node-rank {r} given twice: {_runner(first)} is node {r} already, and so says "
                      f"this {_runner(_me())}")


def announce(team: Team, identity: dict[str, str] | None) -> None:
    """Node 0: what every node must agree with."""
    team.put("head", {"nnodes": team.spec.nnodes, "config": identity, **_me()})


def check_head(team: Team, identity: dict[str, str] | None) -> None:
    """Any other node: compare with node 0's; raise Refused on a difference."""
    team.wait_for(lambda: team.has("head"))
    head = team.take("head")
    r = team.spec.node_rank
    if head["nnodes"] != team.spec.nnodes:
        _refuse(team, f"--nnodes differs: node 0 ({_runner(head)}) has --nnodes {head['nnodes']}, "
                      f"node {r} ({_runner(_me())}) has --nnodes {team.spec.nnodes}")
    if differs(head["config"], identity):
        _refuse(team, f"the config differs: node 0 runs {_config_text(head['config'])}, "
                      f"node {r} runs {_config_text(identity)}")


def differs(a: dict[str, str] | None, b: dict[str, str] | None) -> bool:
    return a is not None and b is not None and a["sha256"] != b["sha256"]


def _refuse(team: Team, why: str) -> None:
    team.refuse(why)
    raise Refused(why)


def problems(team: Team, joined: list[dict[str, Any]], identity: dict[str, str] | None) -> list[str]:
    """Node 0, once every node joined (or the wait ended): why the sweep must not start."""
    found = [team.take("refused")] if team.has("refused") else []
    for entry in joined:
        r = entry["node_rank"]
        if "missing" in entry or r == 0:
            continue
        if entry.get("nnodes") != team.spec.nnodes:
            found.append(f"--nnodes differs: node 0 has --nnodes {team.spec.nnodes}, node {r} has --nnodes "
                         f"{entry.get('nnodes')}")
        if differs(identity, entry.get("config")):
            found.append(f"the config differs: node 0 runs {_config_text(identity)}, node {r} runs "
                         f"{_config_text(entry.get('config'))}")
    for r in range(team.spec.nnodes):
        if team.count(f"claim/{r}") > 1 and not any(f"--node-rank {r} given twice" in f for f in found):
            first, second = (team.take(f"claimant/{r}/{n}") if team.has(f"claimant/{r}/{n}") else {} for n in (1, 2))
            found.append(f"--node-rank {r} given twice: {_runner(first)} and {_runner(second)}")
    return list(dict.fromkeys(found))
