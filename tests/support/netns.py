"""Nodes that share nothing but a cable: N network namespaces on a bridge, for multi-node tests.

Node k is the network namespace `<prefix>n<k>` with
- its own address 10.23.0.<k+1>/24 on `eth0`, one end of a veth pair whose other end
  (`<prefix>e<k>`, the switch port) sits on the bridge `<prefix>br` in the root namespace;
- its own loopback: traffic between ranks of one node never leaves the namespace, so only
  traffic between nodes crosses the veth link, which tbf shapes to `rate_mbit` on each node's
  egress (so in each direction);
- its own hostname (every process is started in a UTS namespace of its own) and /etc/hosts
  naming every node (`ip netns exec` binds /etc/netns/<ns>/hosts over /etc/hosts), as a
  cluster's DNS would: torchrun advertises the hostname, gloo binds the address it resolves to;
- its own working folder (the process's cwd and TMPDIR) and results folder under `root/node<k>`.

What the nodes still share, and why it does not matter here: the repository and the venv (the
code and the interpreter they run, only read), the kernel, its clock and the CPUs. No results
path is shared: a file of node 1 reaches node 0 only through the network.

The prefix starts with `ISP_BENCH_NETNS_PREFIX` (default `i23`) and carries this process's pid
and a count, so two runs, or two sets of nodes in one run, never collide; `close()` kills every process in the namespaces, deletes the
namespaces (and with them the veth pairs), the bridge and the hosts files, and is safe to call
twice. `available()` says why namespaces cannot be made here (not root, no `ip`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX_ENV = "ISP_BENCH_NETNS_PREFIX"
SUBNET = "10.23.0"


def available() -> str | None:
    """None when namespaces can be made here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not found (iproute2 / util-linux)"
    probe = f"{_prefix()}probe"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


_made = itertools.count()


def _prefix() -> str:
    """Unique per run and per set of nodes in it; short, as interface names are at most 15 chars."""
    base = os.environ.get(PREFIX_ENV, "i23")[:7]  # 7 + 4 + 2 + "br" <= 15
    return f"{base}{os.getpid() % 0xFFFF:04x}{next(_made) % 36:x}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


@dataclass(frozen=True)
class Node:
    index: int
    netns: str
    hostname: str
    address: str
    port_dev: str  # the switch-side end of its cable, in the root namespace
    work: Path
    results: Path


class NetNodes:
    """N namespaced nodes on one bridge; the inter-node link shaped to rate_mbit (None: unshaped)."""

    def __init__(self, root: Path, count: int = 2, rate_mbit: float | None = 1000.0) -> None:
        self.prefix, self.rate_mbit = _prefix(), rate_mbit
        self.bridge = f"{self.prefix}br"
        self.nodes: list[Node] = []
        self.procs: list[subprocess.Popen] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for k in range(count):
                self._add_node(root, k)
            self._write_hosts()
        except BaseException:
            self.close()
            raise

    def _add_node(self, root: Path, k: int) -> None:
        ns, inner, port = f"{self.prefix}n{k}", f"{self.prefix}v{k}", f"{self.prefix}e{k}"
        node = Node(k, ns, f"{self.prefix}-node{k}", f"{SUBNET}.{k + 1}", port,
                    root / f"node{k}" / "work", root / f"node{k}" / "results")
        node.work.mkdir(parents=True, exist_ok=True)
        node.results.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", ns)
        self.nodes.append(node)  # from here close() removes it, whatever fails next
        _ip("link", "add", inner, "type", "veth", "peer", "name", port)
        _ip("link", "set", port, "master", self.bridge)
        _ip("link", "set", port, "up")
        _ip("link", "set", inner, "netns", ns)
        _ip("-n", ns, "link", "set", inner, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        if self.rate_mbit is not None:
            # burst above the largest segment veth passes (64 KiB with GSO), or tbf drops it
            self.tc(node, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{self.rate_mbit:g}mbit",
                    "burst", "256kb", "latency", "200ms")

    def tc(self, node: Node, *args: str) -> None:
        out = subprocess.run(["ip", "netns", "exec", node.netns, "tc", *args], capture_output=True, text=True,
                             timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"tc {' '.join(args)} in {node.netns}: {out.stderr.strip()}")

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost", *(f"{n.address} {n.hostname}" for n in self.nodes)]
        for node in self.nodes:
            folder = Path("/etc/netns") / node.netns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    # -- processes ------------------------------------------------------------------------------

    def popen(self, node: Node, cmd: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """`cmd` on `node`: in its namespace, under its hostname, in its working folder."""
        tmp = node.work / "tmp"
        tmp.mkdir(exist_ok=True)
        env = dict(os.environ if env is None else env, TMPDIR=str(tmp))
        wrapped = ["ip", "netns", "exec", node.netns, "unshare", "--uts", "--", "sh", "-c",
                   'hostname "$0" && exec "$@"', node.hostname, *cmd]
        proc = subprocess.Popen(wrapped, cwd=node.work, env=env, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, node: Node, cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        proc = self.popen(node, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def pids(self, node: Node) -> list[int]:
        """Every process alive in the node's namespace (whoever started it)."""
        out = _ip("netns", "pids", node.netns, check=False)
        return [int(p) for p in out.stdout.split()]

    # -- the cable ------------------------------------------------------------------------------

    def cut(self, node: Node) -> None:
        """Pull the node's cable at the switch: nothing is told, packets just stop."""
        _ip("link", "set", node.port_dev, "down")

    def mend(self, node: Node) -> None:
        _ip("link", "set", node.port_dev, "up")

    # -- the end --------------------------------------------------------------------------------

    def kill_all(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for node in self.nodes:
            for pid in self.pids(node):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while any(self.pids(n) for n in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.kill_all()
        for node in self.nodes:
            _ip("netns", "del", node.netns, check=False)  # takes its veth pair with it
            shutil.rmtree(Path("/etc/netns") / node.netns, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        self.nodes = []
