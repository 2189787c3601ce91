"""The runners of a several-node sweep in step, through torch's c10d TCPStore at the endpoint.

Node 0's runner hosts the store for the whole sweep; every other runner and every cell's
torchrun (c10d rendezvous, `is_host=false`) connects to it, so one port serves all. Keys:

    claim/<r>, claimant/<r>/<n>  runners that said --node-rank r, counted (two is a collision)
    head                node 0's nnodes and config hash, for every node to check its own against
    refused             why a node refused the sweep before any cell (bench/sweep/roll_call.py)
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
stop is noticed within a second whatever the step; and every call has a deadline
(bench/sweep/store.py), so a link that dies silently cannot hold a runner either.

Heartbeats go both ways: node 0 judges every other node by its counter, and every other node
judges node 0 by its counter and by whether the store answers at all. Silence for
`--heartbeat-timeout` (20 s) is a lost node. Node 0 ends a running job whose peer is lost and
records the cell; a node that lost node 0 ends its job and exits.
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
from bench.sweep.store import BoundedStore, StoreDead

POLL_S = 0.2
HEARTBEAT_S = 1.0
CONNECT_TIMEOUT_S = 120.0
# Node 0's heartbeat to its own main thread: end the job, a peer is lost. A real-time signal, as
# SIGINT, SIGTERM and SIGUSR1 stop the sweep and SIGUSR2 asks ranks for their stacks.
LOST_PEER_SIGNAL = signal.SIGRTMIN + 2
LOST_PEER_SIGNAME = "SIGRTMIN+2"


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

    A stop set by another node, or node 0 lost, interrupts this runner's main thread with
    SIGINT while it waits for a torchrun job (`in_launch`): the runner then ends the job
    exactly as on Ctrl-C. On node 0 a lost peer during a job sends LOST_PEER_SIGNAL instead,
    every beat until the job is gone (bench/sweep/lockstep.py turns it into a failed cell).
    Outside a launch the runner's own waits look at `stop_reason` and `lost()`, so a stop never
    lands in the middle of the store exchange.
    """

    def __init__(self, spec: NodeSpec) -> None:
        super().__init__(name="isp-bench-heartbeat", daemon=True)
        self.spec = spec
        self.store = BoundedStore(connect(spec, host=False), spec.heartbeat_timeout_s)
        self.stop_reason: str | None = None
        self.lost_peer: str | None = None  # node 0: why it ends the running job
        self.heard_at = time.monotonic()  # when the store last answered a whole beat
        self.closing = threading.Event()
        self.in_launch = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}

    def run(self) -> None:
        while not self.closing.wait(HEARTBEAT_S):
            reason = self._beat()
            if reason is None and not self.spec.is_head and self.lost([0]):
                reason = f"lost node 0 (no heartbeat for {self.spec.heartbeat_timeout_s:g}s)"
            if reason and self.stop_reason is None and not self.closing.is_set():
                self.stop_reason = reason
                if self.in_launch.is_set():
                    os.kill(os.getpid(), signal.SIGINT)
            if self.stop_reason and reason and reason.startswith("lost node 0"):
                return
            if self.spec.is_head and self.in_launch.is_set() and (lost := self.lost(self.others)):
                self.lost_peer = f"lost node {', '.join(map(str, lost))} (no heartbeat for " \
                                 f"{self.spec.heartbeat_timeout_s:g}s)"
                os.kill(os.getpid(), LOST_PEER_SIGNAL)

    def _beat(self) -> str | None:
        """One round trip: count, read every counter and the stop key; a reason to stop, or None."""
        try:
            self.store.call("add", f"hb/{self.spec.node_rank}", 1)
            for r in range(self.spec.nnodes):
                count, now = self.store.call("add", f"hb/{r}", 0), time.monotonic()
                if self._seen.get(r, (None,))[0] != count:
                    self._seen[r] = (count, now)
            stop = self.store.call("get", "stop").decode() if self.store.call("check", ["stop"]) else None
        except StoreDead as exc:  # the link to node 0 died silently
            return f"lost node 0 ({exc})"
        except Exception as exc:  # noqa: BLE001 - the store's server (node 0) went away
            return f"lost node 0 ({type(exc).__name__})"
        self.heard_at = time.monotonic()
        return stop

    @property
    def others(self) -> list[int]:
        return [r for r in range(self.spec.nnodes) if r != self.spec.node_rank]

    def lost(self, ranks: list[int]) -> list[int]:
        """Of `ranks`, those that were alive and whose heartbeat has not moved for the timeout.
        A node not yet started is not lost: it is late, and the rendezvous timeout judges that."""
        now, limit = time.monotonic(), self.spec.heartbeat_timeout_s
        return [r for r in ranks
                if (seen := self._seen.get(r)) is not None and seen[0] > 0 and now - seen[1] > limit]


class Team:
    """One runner's side of the store: what it says, what it waits for."""

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        own = connect(spec, host=spec.is_head)
        self.heartbeat = Heartbeat(spec)
        # A call may outlast the deadline only while the heartbeat still hears node 0.
        self.store = BoundedStore(own, spec.heartbeat_timeout_s, heard=lambda: self.heartbeat.heard_at)
        self.heartbeat.start()
        self.launches = 0
        self.run_name = "isp-bench"  # node 0's run folder name, once the plan is out
        self.holds_rank = True  # False for a second runner given the same --node-rank (roll_call)

    @property
    def others(self) -> list[int]:
        return [r for r in range(self.spec.nnodes) if r != self.spec.node_rank]

    # -- small store helpers ------------------------------------------------------------------

    def _call(self, name: str, *args: Any) -> Any:
        """Every store call: node 0 gone or out of reach becomes NodeLost, whatever torch raised."""
        try:
            return self.store.call(name, *args)
        except StoreDead as exc:
            raise NodeLost(f"lost node 0 ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - DistNetworkError, DistStoreError, RuntimeError...
            raise NodeLost(f"lost node 0 ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") \
                from None

    def put(self, key: str, value: Any) -> None:
        self._call("set", key, json.dumps(value))

    def take(self, key: str) -> Any:
        return json.loads(self._call("get", key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("set", key, data)

    def take_bytes(self, key: str, delete: bool = True) -> bytes:
        data = self._call("get", key)
        if delete:
            self._call("delete_key", key)
        return data

    def has(self, *keys: str) -> bool:
        return bool(self._call("check", list(keys)))

    def count(self, key: str, by: int = 0) -> int:
        return int(self._call("add", key, by))

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
            limit = self.spec.heartbeat_timeout_s
            return f"lost node {', '.join(map(str, lost))} (no heartbeat for {limit:g}s)" if lost else None
        return check

    # -- start and end of the sweep -----------------------------------------------------------

    def join(self, env: dict[str, Any]) -> None:
        self.put(f"joined/{self.spec.node_rank}", {"node_rank": self.spec.node_rank, **env})

    def node_envs(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every node's env entry; a node not there within timeout_s is listed as missing.
        A refusal (bench/sweep/roll_call.py) ends the wait: there is no sweep to wait for."""
        keys = [f"joined/{r}" for r in range(self.spec.nnodes)]
        self.wait_for(lambda: self.has(*keys), timeout_s, lambda: "refused" if self.has("refused") else None)
        return [self.take(k) if self.has(k) else {"node_rank": r, "missing": f"not there within {timeout_s:g}s"}
                for r, k in enumerate(keys)]

    def publish_plan(self, plan: dict[str, Any]) -> None:
        self.put("plan", plan)

    def receive_plan(self) -> dict[str, Any]:
        self.wait_for(lambda: self.has("plan"))
        return self.take("plan")

    def refuse(self, why: str) -> None:
        """Say why this node will not take part (first reason wins), before any cell."""
        self._call("compare_set", "refused", "", json.dumps(why))

    def stop_all(self, reason: str) -> None:
        """First reason wins: every node's heartbeat sees it and interrupts its runner."""
        try:
            self._call("compare_set", "stop", "", reason)
        except NodeLost:  # node 0 gone: the others notice that by themselves
            pass

    def finish(self, timeout_s: float) -> None:
        """Say this node is through; node 0 keeps the store up until every live node is."""
        if not self.spec.is_head:
            self.heartbeat.closing.set()
            if not self.holds_rank:
                return  # its done/<r> would end node 0's wait for the runner that holds the rank
            try:
                self.put(f"done/{self.spec.node_rank}", True)
            except NodeLost:
                pass  # node 0 is gone: nobody is waiting for this node any more
            return
        lost = self.heartbeat.lost(self.others)
        live = [r for r in self.others if r not in lost and self.has(f"joined/{r}")]
        # The heartbeat keeps watching until then, or every node would look lost after the timeout.
        self.wait_for(lambda: self.has(*(f"done/{r}" for r in live)), timeout_s, self.lost_from(live))
        self.heartbeat.closing.set()
