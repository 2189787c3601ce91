"""Counts of every collective the ISP core issues, per process group and kind, and the hook
through which each launch can also be logged one by one (a hang's post-mortem).

Bytes follow nccl-tests' conventions so they can be turned into bus bandwidth directly:
all_gather counts the full output, reduce_scatter the full input, all_to_all the whole
per-rank send buffer, all_reduce the buffer.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Protocol

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce")
NO_TOKEN = -1  # what record() returns when no log is attached


class LaunchLog(Protocol):
    """Where each launch goes one by one (bench/worker/collective_ring.py keeps them in a file a
    stuck rank cannot stop others from reading). A token names the launch until it completes."""

    def issue(self, group: str, ranks: tuple[int, ...], kind: str, nbytes: int, blocking: bool) -> int: ...

    def waiting(self, token: int) -> None: ...

    def done(self, token: int) -> None: ...


class CommStats:
    """calls and bytes per (group name, kind); `snapshot()` gives a plain nested dict.

    `enabled` gates the counts only: the launch log, when there is one, sees every launch, so a
    hang in a phase that is not counted (profiling, say) is still explained."""

    def __init__(self, log: Optional[LaunchLog] = None) -> None:
        self.enabled = True
        self.log = log
        self._calls: dict[tuple[str, str], int] = defaultdict(int)
        self._bytes: dict[tuple[str, str], int] = defaultdict(int)

    def record(self, group: str, kind: str, nbytes: int, ranks: tuple[int, ...] = (),
               blocking: bool = False) -> int:
        """Count one launch; returns the log's token for waiting()/done() (NO_TOKEN without a log).
        `blocking`: the caller waits inside the launch itself (a synchronous call)."""
        assert kind in KINDS, kind
        if self.enabled:
            self._calls[(group, kind)] += 1
            self._bytes[(group, kind)] += int(nbytes)
        return self.log.issue(group, ranks, kind, int(nbytes), blocking) if self.log is not None else NO_TOKEN

    def waiting(self, token: int) -> None:
        if token != NO_TOKEN and self.log is not None:
            self.log.waiting(token)

    def done(self, token: int) -> None:
        if token != NO_TOKEN and self.log is not None:
            self.log.done(token)

    def reset(self) -> None:
        self._calls.clear()
        self._bytes.clear()

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        """{group: {kind: {"calls": n, "bytes": b}}}, only for pairs that were used."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (group, kind), calls in sorted(self._calls.items()):
            out.setdefault(group, {})[kind] = {"calls": calls, "bytes": self._bytes[(group, kind)]}
        return out
