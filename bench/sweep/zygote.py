"""A launcher started once per sweep that has imported torchrun: each cell's torchrun is a fork of it.

torchrun's agent otherwise starts an interpreter and imports torch for every cell (about a
second on 2 busy cores) before it starts any worker. Only the agent is forked: its workers
are started by it as always, as fresh interpreters, so everything a worker measures (its
peak RSS included) is as with a torchrun of its own.

    python -m bench.sweep.zygote --run-dir RUN_DIR    (started by the runner, never by hand)

The runner writes one JSON line per job to its stdin, {"argv", "env", "log"}, and reads back
{"pid": p} at once and {"exit": p, "code": c} when the job ends. A fork is made to look like
`subprocess.Popen(cmd, ...)` would have made it: a session of its own, the parent-death
signal, default signal handlers, the job's environment and working directory, stdin from
/dev/null, output to its log, no other file descriptor. The launcher itself runs no thread,
never touches CUDA (it only imports torch) and dies with the runner; its forks die with it,
and their workers with them. Its command line names the run folder and its environment
carries the run's token, which its forks share: a later runner finds what a dead one left
(bench/sweep/processes.py).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.sweep.processes import die_with_parent, signals_held

POLL_S = 0.01


# --- the launcher process -------------------------------------------------------------------

def serve() -> None:
    from bench.sweep import torchrun  # what every fork saves: torch and torchrun, imported once
    import torch

    replies = os.dup(1)  # the pipe to the runner; anything printed by accident goes to the log instead
    os.dup2(2, 1)
    pending = b""
    while True:
        if select.select([0], [], [], POLL_S)[0]:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return  # the runner is done (or gone): the forks get their parent-death signal
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                job = json.loads(line)
                if torch.cuda.is_initialized():  # never: a CUDA-initialised process must not fork
                    _reply(replies, {"error": "the launcher has CUDA initialised; cannot fork"})
                    continue
                _reply(replies, {"pid": _fork(job, torchrun.main)})
        _reap(replies)


def _reply(fd: int, doc: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(doc) + "\n").encode())


def _reap(replies: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply(replies, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork(job: dict[str, Any], main: Any) -> int:
    preexec = die_with_parent()
    pid = os.fork()
    if pid:
        _await_session(pid)
        return pid
    code = 1
    try:
        _become_job(job, preexec)
        code = main(job["argv"])
    except BaseException:  # noqa: BLE001 - whatever happens, the fork never returns to the loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _await_session(pid: int, limit_s: float = 5.0) -> None:
    """Until the fork leads its own session, as a Popen child does once Popen returns (a kill of
    its process group right away must reach it)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if os.getpgid(pid) == pid:
                return
        except ProcessLookupError:
            return  # gone already: its exit is reaped and reported
        time.sleep(0.001)


def _become_job(job: dict[str, Any], preexec: Any) -> None:
    os.setsid()  # its own session, as start_new_session=True gives
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    preexec()  # the parent-death signal: the job dies with this launcher, which dies with the runner
    log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:  # the pipes to the runner among them
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already gone
    os.environ.clear()
    os.environ.update(job["env"])


# --- the runner's side ----------------------------------------------------------------------

class Zygote:
    """The runner's handle: started on first use, ended by close()."""

    def __init__(self, run_dir: Path, env: dict[str, str], cwd: Path) -> None:
        self.run_dir, self.env, self.cwd = run_dir, env, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.codes: dict[int, int] = {}
        self.dead = False
        self._pending = b""

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> ForkedJob | None:
        """The job as a fork, or None when the launcher cannot make one (start it another way)."""
        if self.dead:
            return None
        if self.proc is None:
            self.proc = self._launch()
        try:
            self.proc.stdin.write((json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            self.dead = True
            return None
        while True:
            for doc in self._read(block=True):
                if "pid" in doc:
                    return ForkedJob(doc["pid"], self)
                if "error" in doc:
                    self.dead = True
                    return None
            if self.dead:
                return None

    def _launch(self) -> subprocess.Popen[bytes]:
        log = self.run_dir / "logs" / "launcher.log"  # its stderr: what torch's import may print
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as err, signals_held():
            return subprocess.Popen([sys.executable, "-m", "bench.sweep.zygote", "--run-dir", str(self.run_dir)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=self.cwd,
                                    env=self.env, start_new_session=True,
                                    preexec_fn=die_with_parent())  # noqa: PLW1509 - no threads run yet

    def _read(self, block: bool) -> list[dict[str, Any]]:
        """The launcher's replies so far (exit codes are kept); blocking waits for at least one line."""
        assert self.proc is not None and self.proc.stdout is not None
        out = []
        fd = self.proc.stdout.fileno()
        while select.select([fd], [], [], None if block and not out else 0)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.dead = True
                break
            self._pending += chunk
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                doc = json.loads(line)
                if "exit" in doc:
                    self.codes[doc["exit"]] = doc["code"]
                out.append(doc)
            if out:
                block = False
        return out

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class ForkedJob:
    """What launch(), the pool and kill_tree() use of a Popen: pid, poll(), wait(timeout), returncode."""

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid, self.zygote = pid, zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if not self.zygote.dead:
                self.zygote._read(block=False)
            if self.pid in self.zygote.codes:
                self.returncode = self.zygote.codes.pop(self.pid)
            elif self.zygote.dead and not Path(f"/proc/{self.pid}").exists():
                self.returncode = -signal.SIGTERM  # its launcher died, and it with it: no code to read
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["torchrun"], timeout or 0.0)
            time.sleep(POLL_S)
        return self.returncode  # type: ignore[return-value]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="the run it serves (named so that ps and a later "
                                                         "runner see it)")
    parser.parse_args()
    serve()
