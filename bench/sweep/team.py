"""The runners of a several-node sweep in step, through torch's c10d TCPStore at the endpoint.

Node 0's runner hosts the store for the whole sweep; every other runner and every cell's
torchrun (c10d rendezvous, `is_host=false`) connects to it, so one port serves all. Keys:

    joined/<r>          node r's env.json entry: it is there
    plan                node 0's cell list and run folder name, or the config errors
    hb/<r>              node r's heartbeat counter (a runner that stops counting is lost)
    stop                why every node must stop (Ctrl-C or SIGTERM on some node)
    c<n>/arrived/<r>    node r is ready for the sweep's n-th launch
    c<n>/go | c<n>/final  node 0's word: launch now | the cell's agreed outcome
    c<n>/outcome/<r>    node r's own outcome and the files it ships (c<n>/file/<r>/<i>)
    done/<r>            node r is through the sweep

A launch is numbered, not named by cell, so a cell run twice in one sweep never reads the
keys of its first try. Every wait polls (check(), never a blocking get), so a lost node or a
stop is noticed within a second whatever the step.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from torch.distributed import TCPStore

from bench.sweep.nodes import NodeSpec

POLL_S = 0.2
HEARTBEAT_S = 1.0
LOST_AFTER_S = 20.0  # a runner whose counter has not moved for this long is gone
CONNECT_TIMEOUT_S = 120.0


class NodeLost(RuntimeError):
    """The head (node 0) can no longer be reached: nothing more can be agreed."""


def connect(spec: NodeSpec, host: bool, timeout_s: float = CONNECT_TIMEOUT_S) -> TCPStore:
    """Node 0 hosts the store (host=True, once); every other connection waits up to timeout_s for it."""
    try:
        return TCPStore(spec.host, spec.port, is_master=host, timeout=timedelta(seconds=timeout_s),
                        wait_for_workers=False)
    except (RuntimeError, TimeoutError) as exc:
        role = "host the store on port" if host else "reach node 0's store at"
        raise NodeLost(f"node {spec.node_rank}: could not {role} {spec.endpoint} "
                       f"within {timeout_s:g}s ({type(exc).__name__}: {exc})") from None


class Heartbeat(threading.Thread):
    """Counts this node's heartbeat, watches the others' and the stop key, on its own connection.

    A stop set by another node, or node 0 gone, interrupts this runner's main thread with
    SIGINT while it waits for a torchrun job (`in_launch`): the runner then ends the job
    exactly as on Ctrl-C. Outside a launch the runner's own waits look at `stop_reason`, so a
    stop never lands in the middle of the store exchange.
    """

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(name="isp-bench-heartbeat", daemon=True)
        self.spec = spec
        self.store = connect(spec, host=False)
        self.stop_reason: str | None = None
        self.closing = threading.Event()
        self.in_launch = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}

    def run(self) -> None:
        while not self.closing.wait(HEARTBEAT_S):
            try:
                self.store.add(f"hb/{self.spec.node_rank}", 1)
                for r in range(self.spec.nnodes):
                    count, now = self.store.add(f"hb/{r}", 0), time.monotonic()
                    if self._seen.get(r, (None,))[0] != count:
                        self._seen[r] = (count, now)
                reason = self.store.get("stop").decode() if self.store.check(["stop"]) else None
            except Exception as exc:  # noqa: BLE001 - the store's server (node 0) went away
                reason = f"lost node 0 ({type(exc).__name__})"
            if reason and self.stop_reason is None and not self.closing.is_set():
                self.stop_reason = reason
                if self.in_launch.is_set():
                    os.kill(os.getpid(), signal.SIGINT)
            if self.stop_reason and reason and reason.startswith("lost node 0"):
                return

    def lost(self, ranks: list[int]) -> list[int]:
        """Of `ranks`, those that were alive and whose heartbeat has not moved for LOST_AFTER_S.
        A node not yet started is not lost: it is late, and the rendezvous timeout judges that."""
        now = time.monotonic()
        return [r for r in ranks
                if (seen := self._seen.get(r)) is not None and seen[0] > 0 and now - seen[1] > LOST_AFTER_S]


class Team:
    """One runner's side of the store: what it says, what it waits for."""

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.store = connect(spec, host=spec.is_head)
        self.heartbeat = Heartbeat(spec)
        self.heartbeat.start()
        self.launches = 0
        self.run_name = "isp-bench"  # node 0's run folder name, once the plan is out

    @property
    def others(self) -> list[int]:
        return [r for r in range(self.spec.nnodes) if r != self.spec.node_rank]

    # -- small store helpers ------------------------------------------------------------------

    def _call(self, op: Callable[..., Any], *args: Any) -> Any:
        """Every store call: a dead server (node 0 gone) becomes NodeLost, whatever torch raised."""
        try:
            return op(*args)
        except Exception as exc:  # noqa: BLE001 - DistNetworkError, DistStoreError, RuntimeError...
            raise NodeLost(f"lost node 0 ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") \
                from None

    def put(self, key: str, value: Any) -> None:
        self._call(self.store.set, key, json.dumps(value))

    def take(self, key: str) -> Any:
        return json.loads(self._call(self.store.get, key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(self.store.set, key, data)

    def take_bytes(self, key: str, delete: bool = True) -> bytes:
        data = self._call(self.store.get, key)
        if delete:
            self._call(self.store.delete_key, key)
        return data

    def has(self, *keys: str) -> bool:
        return bool(self._call(self.store.check, list(keys)))

    def wait_for(self, done: Callable[[], bool], timeout_s: float | None = None,
                 give_up: Callable[[], str | None] = lambda: None) -> str | None:
        """Poll until done() (None), timeout_s ('timeout') or give_up() names a reason."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            if (why := give_up()) is not None:
                return why
            if deadline is not None and time.monotonic() > deadline:
                return "timeout"
            time.sleep(POLL_S)
        return None

    def lost_from(self, ranks: list[int]) -> Callable[[], str | None]:
        def check() -> str | None:
            lost = self.heartbeat.lost(ranks) if self.spec.is_head else []
            return f"lost node {', '.join(map(str, lost))} (no heartbeat for {LOST_AFTER_S:g}s)" if lost else None
        return check

    # -- start and end of the sweep -----------------------------------------------------------

    def join(self, env: dict[str, Any]) -> None:
        self.put(f"joined/{self.spec.node_rank}", {"node_rank": self.spec.node_rank, **env})

    def node_envs(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every node's env entry; a node not there within timeout_s is listed as missing."""
        keys = [f"joined/{r}" for r in range(self.spec.nnodes)]
        self.wait_for(lambda: self.has(*keys), timeout_s)
        return [self.take(k) if self.has(k) else {"node_rank": r, "missing": f"not there within {timeout_s:g}s"}
                for r, k in enumerate(keys)]

    def publish_plan(self, plan: dict[str, Any]) -> None:
        self.put("plan", plan)

    def receive_plan(self) -> dict[str, Any]:
        self.wait_for(lambda: self.has("plan"))
        return self.take("plan")

    def stop_all(self, reason: str) -> None:
        """First reason wins: every node's heartbeat sees it and interrupts its runner."""
        try:
            self.store.compare_set("stop", "", reason)
        except Exception:  # noqa: BLE001 - node 0 gone: the others notice that by themselves
            pass

    def finish(self, timeout_s: float) -> None:
        """Say this node is through; node 0 keeps the store up until every live node is."""
        if not self.spec.is_head:
            self.heartbeat.closing.set()
            try:
                self.put(f"done/{self.spec.node_rank}", True)
            except NodeLost:
                pass  # node 0 is gone: nobody is waiting for this node any more
            return
        lost = self.heartbeat.lost(self.others)
        live = [r for r in self.others if r not in lost and self.has(f"joined/{r}")]
        # The heartbeat keeps watching until then, or every node would look lost after LOST_AFTER_S.
        self.wait_for(lambda: self.has(*(f"done/{r}" for r in live)), timeout_s, self.lost_from(live))
        self.heartbeat.closing.set()
