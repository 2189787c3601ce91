"""Processes of a run: who they are (pid plus kernel start time), how they die with the
runner, how a job's whole tree is killed, and how a later runner finds what a dead one left.

Every torchrun job carries RUN_ENV=<run folder>|<runner pid>:<start time> in its environment,
which its workers inherit; a later runner on the same host finds the leftovers of a dead one
by that variable in /proc/<pid>/environ. The job also gets a parent-death signal (SIGTERM, on
which torchrun takes its workers down), so most of the time there is nothing left to find.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

RUN_ENV = "ISP_BENCH_RUN"
_PR_SET_PDEATHSIG = 1


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat): a pid plus this names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, started: str | None) -> bool:
    return started is not None and start_time(pid) == started


HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}  # the runner's stop signals (bench/sweep/runner.py)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold the stop signals (SIGINT, SIGTERM, SIGUSR1) back (delivered on exit): Python runs a handler raised during
    Popen's fork inside an at-fork hook that prints and drops the exception, so the runner
    would miss its Ctrl-C or SIGTERM. The child unblocks them (die_with_parent's preexec)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A second Ctrl-C in the middle of a kill would leave ranks running: finish the kill first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in sorted(HELD)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_process(cmd: list[str], env: dict[str, str], log: IO[str], cwd: Path, starter: Any = None,
                  fork_argv: list[str] | None = None) -> Any:
    """A job writing to `log`, in a session of its own, that dies with the runner: `starter`'s
    fork running `fork_argv` when it makes one (bench/sweep/zygote.py), else `cmd` started."""
    with signals_held():  # a signal during the fork would be lost in an at-fork hook; it waits here
        if starter is not None and (job := starter.start(fork_argv, env, Path(log.name))) is not None:
            return job
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,  # its own group: Ctrl-C is ours to handle
                                preexec_fn=die_with_parent())  # noqa: PLW1509 - no threads run yet


def kill_tree(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM torchrun (it forwards to its workers), then SIGKILL whatever of the tree is left."""
    tree = _descendants(proc.pid)  # before signalling: once torchrun dies its workers are orphans
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid, started in tree:
        if start_time(pid) == started:  # same process, not a reused pid
            _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    for send in (os.killpg, os.kill):  # workers lead their own group; others may not
        try:
            send(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `root`, from /proc (empty where there is none)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return [(pid, t) for pid in found if (t := start_time(pid)) is not None]


def leftovers(run_dir: Path, own_token: str) -> list[tuple[int, str]]:
    """(pid, start time) of live processes started for this run folder by another runner."""
    prefix = f"{RUN_ENV}={run_dir.resolve()}|".encode()
    mine = f"{RUN_ENV}={own_token}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = any(v.startswith(prefix) and v != mine for v in env)
        if ours and (started := start_time(int(entry.name))) is not None:
            found.append((int(entry.name), started))
    return found


def end_leftovers(run_dir: Path, own_token: str, wait_s: float = 5.0) -> list[int]:
    """SIGKILL what a dead runner of this folder left (checking pid and start time); return the pids."""
    found = leftovers(run_dir, own_token)
    for pid, started in found:
        if alive(pid, started):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + wait_s
    while any(alive(p, s) for p, s in found) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid, _ in found]


def _unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # exec keeps the mask signals_held set


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn giving the child `sig` when the runner dies (Linux; elsewhere it only
    unblocks the signals that signals_held holds back).

    SIGTERM, not SIGKILL: torchrun answers SIGTERM by stopping its workers (seen here with
    torch 2.13), while a SIGKILL gives it no chance to.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return _unblock
    parent = os.getpid()

    def preexec() -> None:
        _unblock()
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the runner died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


_WATCHDOG = """import os, sys, time
pid, started, deadline = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, deadline - time.time()))
try:
    if open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[19] == started:
        os.kill(pid, 9)
except OSError:
    pass
"""


def kill_me_after(seconds: float) -> None:
    """A watchdog process that SIGKILLs this one `seconds` from now, and dies with it if it ends
    first. A process, not a thread: a thread cannot act once the interpreter is shutting down."""
    me = os.getpid()
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(me), str(start_time(me)), str(time.time() + seconds)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     preexec_fn=die_with_parent(signal.SIGKILL))  # noqa: PLW1509 - called from the main thread
