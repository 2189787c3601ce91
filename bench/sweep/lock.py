"""One runner per run folder, and nothing of a dead runner left running.

The lock is `runner.lock` in the run folder: a JSON line (pid, host, process start time, UTC
start) under an flock held for the runner's life. The kernel drops the flock when the runner
dies however it dies, so a lock we can take is stale and one we cannot take names its holder.
The lock's token tags the runner's jobs (bench/sweep/processes.py) so that a later runner can
end what a dead one left.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.sweep.processes import alive, start_time

LOCK_FILE = "runner.lock"


class RunLocked(Exception):
    """Another live runner holds the run folder; str() names it."""


@dataclass
class RunLock:
    path: Path
    fd: int
    token: str  # RUN_ENV's value for this runner's jobs

    def release(self) -> None:
        # The file stays (unlinking it would let a runner that opened it just before lock a
        # deleted inode while a third one locks a new file): an unlocked lock file is stale.
        os.close(self.fd)


def _holder_text(info: dict[str, Any]) -> str:
    return (f"runner pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"started {info.get('started_utc', '?')}")


def _read(fd: int) -> dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def acquire(run_dir: Path) -> tuple[RunLock, dict[str, Any]]:
    """Take the run folder's lock; return it and what a previous (dead) holder wrote, if anything.

    Raises RunLocked when a live runner holds it: by its flock, or, where the file system does
    not share flocks, by a lock file of this host whose pid and start time are still alive.
    """
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise RunLocked(f"{run_dir}: in use by {_holder_text(holder)} ({path})") from None
    previous = _read(fd)
    me = os.getpid()
    if (previous.get("host") == socket.gethostname() and previous.get("pid") != me
            and alive(int(previous.get("pid", 0)), previous.get("start_time"))):
        os.close(fd)
        raise RunLocked(f"{run_dir}: in use by {_holder_text(previous)} ({path})")
    info = {"pid": me, "host": socket.gethostname(), "start_time": start_time(me),
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)
    token = f"{run_dir.resolve()}|{me}:{info['start_time']}"
    return RunLock(path, fd, token), previous
