"""The logs of a cell's attempt on several nodes, joined in node 0's run folder.

On one node every log of a cell holds each attempt after a `==== attempt N ... ====` line
(bench/sweep/launch.py). On several, each node's runner marks the logs of the ranks it counts
as its own (rank0..rank<k-1>, before it knows which global ranks torchrun gives it) in a
staging folder that starts afresh each cell, and ships them to node 0 afterwards. So a
shipped log may be nothing but a mark (its rank ran on another node: node 0 must keep its
own copy, not take the empty one), and the mark it carries always says attempt 1. Node 0
therefore appends each shipped log under its own mark of the attempt, after the earlier ones.
"""

from __future__ import annotations

from pathlib import Path

from bench.sweep.launch import ATTEMPT_MARK


def only_marks(data: bytes) -> bool:
    """A log no rank wrote to: blank lines and attempt marks only."""
    return all(not line.strip() or line.startswith(ATTEMPT_MARK.encode()) for line in data.splitlines())


def last_mark(path: Path) -> str:
    """The newest attempt mark of a log (node 0's torchrun.log: the attempt just run)."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    marks = [line for line in lines if line.startswith(ATTEMPT_MARK)]
    return marks[-1] if marks else f"{ATTEMPT_MARK}? ===="


def append(dest: Path, data: bytes, mark: str) -> None:
    """Another node's log of this attempt, after the attempts `dest` already holds, under `mark`."""
    lines = data.decode(errors="replace").splitlines(keepends=True)
    body = "".join(lines[1:] if lines and lines[0].startswith(ATTEMPT_MARK) else lines)
    old = dest.read_text(errors="replace") if dest.is_file() else ""
    if not old.rstrip("\n").endswith(mark):  # node 0 marked only the logs of the ranks it counted
        old += ("\n" if old else "") + mark + "\n"
    dest.write_text(old + body)
