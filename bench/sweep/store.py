"""A c10d TCPStore connection whose every call ends within a deadline, whatever the network does.

torch's TCPStore bounds the wait for a missing key by its timeout, but not a call on a TCP link
that died silently (a cable pulled, a switch port down): the request sits in the kernel's
retransmission queue and the call blocks until the link comes back or TCP gives up, some
fifteen minutes later (seen here: `add` blocked past 60 s on a store whose timeout was 5 s).
So each call runs on a helper thread while the caller waits; a call that has not answered
after `deadline_s` marks the connection dead and raises StoreDead, and every later call on it
fails at once. The stuck helper is a daemon thread: it keeps nothing alive.

A call that moves a large value (a trace shipped to node 0) may take longer than the deadline
on a slow but live link; `heard` (when the other connection last heard the server) extends
the wait for as long as the server answers there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from torch.distributed import TCPStore

SLICE_S = 0.05  # how often a waiting caller looks at the clock


class StoreDead(RuntimeError):
    """The store did not answer within the deadline; str() says for how long."""


class BoundedStore:
    def __init__(self, store: TCPStore, deadline_s: float, heard: Callable[[], float] | None = None) -> None:
        self.store, self.deadline_s = store, deadline_s
        self.heard = heard or (lambda: 0.0)
        self.dead: str | None = None

    def call(self, name: str, *args: Any) -> Any:
        """`store.<name>(*args)`; raises StoreDead, or what the store raised (a closed server)."""
        if self.dead is not None:
            raise StoreDead(self.dead)
        box: list[tuple[bool, Any]] = []
        done = threading.Event()

        def run() -> None:
            try:
                box.append((True, getattr(self.store, name)(*args)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller as it is
                box.append((False, exc))
            done.set()

        start = time.monotonic()
        threading.Thread(target=run, name=f"store-{name}", daemon=True).start()
        while not done.wait(SLICE_S):
            if time.monotonic() - max(start, self.heard()) > self.deadline_s:
                self.dead = f"no answer for {self.deadline_s:g}s"
                raise StoreDead(self.dead)
        ok, value = box[0]
        if not ok:
            raise value
        return value
