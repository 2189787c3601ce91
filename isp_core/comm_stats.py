"""Counts of every collective the ISP core issues, per process group and kind.

Bytes follow nccl-tests' conventions so they can be turned into bus bandwidth directly:
all_gather counts the full output, reduce_scatter the full input, all_to_all the whole
per-rank send buffer, all_reduce the buffer.
"""

from __future__ import annotations

from collections import defaultdict

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce")


class CommStats:
    """calls and bytes per (group name, kind); `snapshot()` gives a plain nested dict."""

    def __init__(self) -> None:
        self.enabled = True
        self._calls: dict[tuple[str, str], int] = defaultdict(int)
        self._bytes: dict[tuple[str, str], int] = defaultdict(int)

    def record(self, group: str, kind: str, nbytes: int) -> None:
        assert kind in KINDS, kind
        if self.enabled:
            self._calls[(group, kind)] += 1
            self._bytes[(group, kind)] += int(nbytes)

    def reset(self) -> None:
        self._calls.clear()
        self._bytes.clear()

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        """{group: {kind: {"calls": n, "bytes": b}}}, only for pairs that were used."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (group, kind), calls in sorted(self._calls.items()):
            out.setdefault(group, {})[kind] = {"calls": calls, "bytes": self._bytes[(group, kind)]}
        return out
