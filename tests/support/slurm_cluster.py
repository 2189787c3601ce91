"""A real two-node Slurm cluster on this one host, for tests that run sweeps through srun/sbatch.

Debian's slurmctld, slurmd, slurm-client and munge packages (installed by .ci/run; where they
are missing this module says why and the test skips). The cluster has a slurm.conf of its own
under a temporary folder: a unique ClusterName with its own state folder (slurmctld refuses a
state folder left by a cluster of another name), two nodes n1 and n2 on this host
(NodeAddr=127.0.0.1, a port each, per-node spool/pid/log files through %n), munged started as
the munge user. Every daemon is ended by the pid in its pid file, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
NODES = ("n1", "n2")
DAEMONS = ("slurmctld", "slurmd", "munged", "srun", "sbatch", "sinfo", "scontrol")


class ClusterUnavailable(RuntimeError):
    """Why no cluster could be brought up here (the caller skips with this message)."""


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _kill_pidfile(path: Path, timeout: float = 10.0) -> None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class SlurmCluster:
    root: Path
    # A prefix of one's own (SLURM_TEST_CLUSTER_PREFIX) keeps clusters of parallel sessions apart.
    name: str = field(default_factory=lambda: os.environ.get("SLURM_TEST_CLUSTER_PREFIX", "ispb") + uuid.uuid4().hex[:8])
    started_munge: bool = False

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for srun/sbatch/sinfo against this cluster (and nothing else)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def pidfiles(self) -> list[Path]:
        return [self.root / f"slurmd.{n}.pid" for n in NODES] + [self.root / "slurmctld.pid"]

    # -- bring-up -------------------------------------------------------------------------

    def write_conf(self) -> None:
        ctld, *slurmd = _free_ports(1 + len(NODES))
        host = socket.gethostname()
        cpus = os.cpu_count() or 1
        for sub in ("state", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            "AuthType=auth/munge", "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmdPidFile={self.root / 'slurmd.%n.pid'}",
            f"SlurmdLogFile={self.root / 'slurmd.%n.log'}",
            # No cgroups: the test host (a container, often) may not delegate them.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "MpiDefault=none", "ReturnToService=2", "SlurmdTimeout=30", "KillWait=5",
            *(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} State=UNKNOWN"
              for n, p in zip(NODES, slurmd)),
            f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def ensure_munge(self) -> None:
        if _run(["sh", "-c", "munge -n | unmunge"]).returncode == 0:
            return  # a munged is already serving this host: use it, leave it running
        if not MUNGE_KEY.is_file():
            _run(["sh", "-c", f"mkdir -p {MUNGE_KEY.parent} && dd if=/dev/urandom of={MUNGE_KEY} bs=1 count=1024"])
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        out = _run(["runuser", "-u", "munge", "--", "munged"])
        if out.returncode != 0:
            raise ClusterUnavailable(f"munged did not start: {out.stderr.strip()}")
        self.started_munge = True

    def start(self, timeout: float = 60.0) -> None:
        missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
        if missing:
            raise ClusterUnavailable(f"Slurm/munge not installed ({', '.join(missing)} missing): "
                                     "apt-get install slurmctld slurmd slurm-client munge")
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting slurmd/munged needs root")
        self.write_conf()
        self.ensure_munge()
        env = self.env
        commands = [["slurmctld", "-i"], *(["slurmd", "-N", n] for n in NODES)]
        for cmd in commands:
            out = _run(cmd, env)
            if out.returncode != 0:
                self.stop()
                raise ClusterUnavailable(f"{' '.join(cmd)} failed: {out.stderr.strip()} {self.logs_tail()}")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = _run(["sinfo", "-h", "-N", "-o", "%N %T"], env).stdout
            if sorted(state.split()) == sorted([*NODES, "idle", "idle"]):
                return
            time.sleep(0.5)
        self.stop()
        raise ClusterUnavailable(f"nodes not idle after {timeout:g}s (sinfo: {state.strip()!r}) {self.logs_tail()}")

    def logs_tail(self, lines: int = 5) -> str:
        out = []
        for log in sorted(self.root.glob("*.log")):
            out.append(f"[{log.name}] " + " | ".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # -- tear-down ------------------------------------------------------------------------

    def stop(self) -> None:
        for pidfile in self.pidfiles():
            _kill_pidfile(pidfile)
        if self.started_munge:
            _kill_pidfile(MUNGE_SOCKET_DIR / "munged.pid")
            self.started_munge = False
