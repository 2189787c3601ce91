"""The logs of a cell's attempt on several nodes, joined in node 0's run folder.

On one node every log of a cell holds each attempt after a `==== attempt N ... ====` line
(bench/sweep/launch.py). On several, each node's runner marks the logs of the ranks it counts
as its own (rank0..rank<k-1>, before it knows which global ranks torchrun gives it) in a
staging folder that starts afresh each cell, and ships them to node 0 afterwards. So a
shipped log may be nothing but a mark (its rank ran on another node: node 0 must keep its
own copy, not take the empty one), and the marks it carries count that folder's attempts, not
the cell's. Node 0 therefore appends each shipped log under its own mark of the attempt,
after the earlier ones.
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


def append(dest: Path, data: bytes, mark: str, node: int) -> None:
    """Node `node`'s log of this attempt, after the attempts `dest` already holds, under `mark`.

    Attempts before the newest in `data` were kept on that node when node 0 could not be
    reached (bench/sweep/multinode.py): they go first, their marks saying so.
    """
    sections: list[list[str]] = [[]]
    for line in data.decode(errors="replace").splitlines(keepends=True):
        if line.startswith(ATTEMPT_MARK):
            sections.append([line])
        else:
            sections[-1].append(line)
    earlier = [s for s in sections[:-1] if s and "".join(s[1:] if s[0].startswith(ATTEMPT_MARK) else s).strip()]
    newest = sections[-1][1:] if sections[-1] and sections[-1][0].startswith(ATTEMPT_MARK) else sections[-1]
    text = dest.read_text(errors="replace") if dest.is_file() else ""
    for section in earlier:
        head = section[0].rstrip("\n") + f" (kept on node {node} while node 0 was out of reach)\n" \
            if section[0].startswith(ATTEMPT_MARK) else ""
        text += ("\n" if text else "") + head + "".join(section[1:] if head else section).rstrip("\n") + "\n"
    if not text.rstrip("\n").endswith(mark):  # node 0 marked only the logs of the ranks it counted
        text += ("\n" if text else "") + mark + "\n"
    dest.write_text(text + "".join(newest))


def seal(log_dir: Path, node: int) -> None:
    """Before a new attempt on a node other than 0: logs kept from an attempt node 0 never got
    are closed with a mark, so that shipping them later keeps the two attempts apart."""
    for log in sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []:
        text = log.read_text(errors="replace")
        if only_marks(text.encode()):
            continue
        head = "" if text.startswith(ATTEMPT_MARK) else f"{ATTEMPT_MARK}? of {log_dir.name} ====\n"
        log.write_text(f"{head}{text.rstrip(chr(10))}\n\n{ATTEMPT_MARK}next of {log_dir.name}, node {node} ====\n")
