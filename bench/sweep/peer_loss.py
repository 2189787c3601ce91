"""Node 0 ends a cell's job when a peer is lost, instead of waiting for the cell's timeout.

A node whose link died silently leaves the ranks of every other node blocked in a collective
until `run.timeout_s`. Node 0's heartbeat (bench/sweep/team.py) sees the peer's counter stop
and sends LOST_PEER_SIGNAL to its own main thread, every beat until the job is gone; while
the job runs, the handler installed here raises Interrupted there, and launch() ends the job's
whole tree as on Ctrl-C. bench/sweep/lockstep.py then records the cell as failed, naming the
lost node.

The handler acts once, and only where launch() waits for the job: a signal that lands in the
fork or in the kill itself passes, and the next beat comes back.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator
from types import FrameType

from bench.sweep import launch
from bench.sweep.launch import Interrupted
from bench.sweep.team import LOST_PEER_SIGNAL, LOST_PEER_SIGNAME
from bench.sweep.zygote import ForkedJob

# The job is a Popen, or a torchrun forked by the sweep's launcher (bench/sweep/zygote.py).
_JOB_WAITS = (subprocess.Popen.wait.__code__, ForkedJob.wait.__code__)


@contextlib.contextmanager
def ends_the_job() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[bool] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if not raised and _waiting_for_the_job(frame):
            raised.append(True)
            raise Interrupted(LOST_PEER_SIGNAME)

    previous = signal.signal(LOST_PEER_SIGNAL, handler)
    try:
        yield
    finally:
        # A beat that comes after the job must not end the runner (a real-time signal's default).
        signal.signal(LOST_PEER_SIGNAL, signal.SIG_IGN if previous in (None, signal.SIG_DFL) else previous)


def _waiting_for_the_job(frame: FrameType | None) -> bool:
    """Is the main thread in launch()'s own wait for its job (not in the kill's, not elsewhere)?"""
    while frame is not None:
        if frame.f_code in _JOB_WAITS:
            return frame.f_back is not None and frame.f_back.f_code is launch.launch.__code__
        frame = frame.f_back
    return False
