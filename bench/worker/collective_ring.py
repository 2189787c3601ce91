"""Each rank's last collectives, in a small memory-mapped file that others read without its help.

A rank stopped by SIGSTOP, or stuck inside a C call, answers no signal and runs no thread, but
the pages it wrote are in the kernel's page cache: the runner reads this file at the timeout
(bench/sweep/hang.py) and learns what every rank last issued and whether it was waiting for it.
The writer is isp_core's CommStats launch log (isp_core/comm_stats.py: every ISP, Ulysses, FSDP2
and DDP collective) plus the benchmark's own barriers and gathers (`track`).

File layout (little endian), `logs/<cell>/rank<r>.ring`:

    header  64 B   magic, version, rank, node, local rank, pid, world size, slots, launches so far
    groups  32 x 128 B   name, launches on that group so far, its ranks ("0..3", "0,4", "1,5,..,13")
    slots   SLOTS x 48 B  per launch: sequence number on its group, bytes, issued / waiting /
                          done times (CLOCK_MONOTONIC ns, 0 = not yet), group index, kind, flags

A slot is written before the header's count moves past it, so a reader never sees a launch
whose slot is still empty; the clock is the host's monotonic clock, the same for every process
on a host. Torch-free: the runner imports it.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

MAGIC = b"ISPRING1"
HEADER = struct.Struct("<8sIiiiiiIQ")  # magic, version, rank, node, local rank, pid, world, slots, count
GROUP = struct.Struct("<24sQ96s")  # name, launches, ranks text
SLOT = struct.Struct("<QQQQQHBB4x")  # seq, bytes, issued, waiting, done, group index, kind, flags
HEADER_SIZE, GROUP_SIZE, MAX_GROUPS, SLOT_SIZE = 64, GROUP.size, 32, 48
SLOTS = 256
KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "barrier", "all_gather_object",
         "broadcast", "other")
BLOCKING = 1  # flag: the launch itself waits (a synchronous call)
_COUNT_AT = HEADER.size - 8
_WAIT_AT, _DONE_AT = 24, 32


def ranks_text(ranks: tuple[int, ...]) -> str:
    """[0,1,2,3] -> '0..3'; [0,4] -> '0,4'; [1,5,9,13] -> '1,5,..,13' (every grid group is a stride)."""
    if not ranks:
        return ""
    steps = {b - a for a, b in zip(ranks, ranks[1:])}
    if len(ranks) > 2 and steps == {1}:
        return f"{ranks[0]}..{ranks[-1]}"
    if len(ranks) > 3 and len(steps) == 1:
        return f"{ranks[0]},{ranks[1]},..,{ranks[-1]}"
    return ",".join(map(str, ranks))


def ranks_from_text(text: str) -> list[int]:
    """The inverse of ranks_text ([] for a list too long for its field, cut short)."""
    try:
        if ".." in text and "," not in text:
            lo, hi = text.split("..")
            return list(range(int(lo), int(hi) + 1))
        if ",.." in text:
            first, second, last = (int(x) for x in text.replace(",..", "").split(","))
            return list(range(first, last + 1, second - first))
        return [int(x) for x in text.split(",")] if text else []
    except ValueError:
        return []


class CollectiveRing:
    """The writer: one per rank process, at `path` (a fresh file each attempt).

    Implements isp_core.comm_stats.LaunchLog. While `capture()` is on, every launch is also kept
    in memory as [issued, waiting, done] (ns), for the rank's compute/communication split of
    the measured steps (bench/worker/rank_figures.py)."""

    def __init__(self, path: Path, rank: int, world: int, node: int = 0, local_rank: int = 0,
                 slots: int = SLOTS) -> None:
        self.path, self.slots = Path(path), slots
        size = HEADER_SIZE + MAX_GROUPS * GROUP_SIZE + slots * SLOT_SIZE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._count = 0
        self._groups: dict[tuple[str, tuple[int, ...]], int] = {}
        self._seq: list[int] = []
        self._capture: Optional[list[list[int]]] = None
        self._capture_from = 0
        HEADER.pack_into(self._map, 0, MAGIC, 1, rank, node, local_rank, os.getpid(), world, slots, 0)

    def _group(self, name: str, ranks: tuple[int, ...]) -> int:
        key = (name, ranks)
        index = self._groups.get(key)
        if index is None:
            index = min(len(self._groups), MAX_GROUPS - 1)  # more groups than room: the last slot is shared
            self._groups[key] = index
            self._seq.append(0)
            GROUP.pack_into(self._map, HEADER_SIZE + index * GROUP_SIZE, name.encode()[:24], 0,
                            ranks_text(ranks).encode()[:96])
        return index

    def issue(self, group: str, ranks: tuple[int, ...], kind: str, nbytes: int, blocking: bool = False) -> int:
        now = time.monotonic_ns()
        g = self._group(group, tuple(ranks))
        self._seq[g] += 1
        token = self._count
        SLOT.pack_into(self._map, self._slot_at(token), self._seq[g], nbytes, now, now if blocking else 0, 0, g,
                       KINDS.index(kind) if kind in KINDS else len(KINDS) - 1, BLOCKING if blocking else 0)
        struct.pack_into("<Q", self._map, HEADER_SIZE + g * GROUP_SIZE + 24, self._seq[g])
        self._count += 1
        struct.pack_into("<Q", self._map, _COUNT_AT, self._count)
        if self._capture is not None:
            self._capture.append([now, now if blocking else 0, 0])
        return token

    def _slot_at(self, token: int) -> int:
        return HEADER_SIZE + MAX_GROUPS * GROUP_SIZE + (token % self.slots) * SLOT_SIZE

    def _mark(self, token: int, offset: int, column: int) -> None:
        now = time.monotonic_ns()
        if token >= self._count - self.slots:  # its slot has not been reused yet
            struct.pack_into("<Q", self._map, self._slot_at(token) + offset, now)
        if self._capture is not None and token >= self._capture_from:
            self._capture[token - self._capture_from][column] = now

    def waiting(self, token: int) -> None:
        self._mark(token, _WAIT_AT, 1)

    def done(self, token: int) -> None:
        self._mark(token, _DONE_AT, 2)

    @contextmanager
    def track(self, group: str, ranks: tuple[int, ...], kind: str, nbytes: int = 0) -> Iterator[None]:
        """Log a blocking call made outside isp_core (the benchmark's barriers and gathers)."""
        token = self.issue(group, ranks, kind, nbytes, blocking=True)
        yield
        self.done(token)

    def capture(self) -> list[list[int]]:
        """Start keeping every launch from now on in memory; returns the (growing) list."""
        self._capture, self._capture_from = [], self._count
        return self._capture

    def stop_capture(self) -> None:
        self._capture = None

    def close(self) -> None:
        self._map.flush()
        self._map.close()


def read_ring(path: Path) -> dict[str, Any]:
    """What a ring file holds, oldest launch first; raises ValueError for a file that is not one."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_SIZE or data[:8] != MAGIC:
        raise ValueError(f"{path}: not a collective ring file")
    _, _, rank, node, local_rank, pid, world, slots, count = HEADER.unpack_from(data, 0)
    groups = []
    for i in range(MAX_GROUPS):
        name, launched, text = GROUP.unpack_from(data, HEADER_SIZE + i * GROUP_SIZE)
        if name.strip(b"\0"):
            groups.append({"name": name.rstrip(b"\0").decode(), "launched": launched,
                           "ranks": ranks_from_text(text.rstrip(b"\0").decode())})
    entries = []
    base = HEADER_SIZE + MAX_GROUPS * GROUP_SIZE
    for token in range(max(0, count - slots), count):
        seq, nbytes, issued, waiting, done, g, kind, flags = SLOT.unpack_from(data, base + (token % slots) * SLOT_SIZE)
        group = groups[g] if g < len(groups) else {"name": "?", "ranks": []}
        entries.append({"token": token, "seq": seq, "group": group["name"], "ranks": group["ranks"],
                        "kind": KINDS[kind] if kind < len(KINDS) else "other", "bytes": nbytes,
                        "issued_ns": issued, "waiting_ns": waiting, "done_ns": done,
                        "blocking": bool(flags & BLOCKING)})
    return {"rank": rank, "node": node, "local_rank": local_rank, "pid": pid, "world_size": world,
            "launches": count, "groups": groups, "entries": entries}
