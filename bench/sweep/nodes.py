"""Which node this runner is in a sweep across several: from the torchrun-style flags or from Slurm.

The same command runs on every node, as with torchrun:

    python run_bench.py CONFIG --nnodes N --node-rank R --rdzv-endpoint HOST:PORT

or, inside a Slurm allocation, `srun --ntasks-per-node=1 python run_bench.py CONFIG` with no
other flag: the node count and rank come from SLURM_STEP_NUM_NODES / SLURM_NODEID, the head is
the first host of `scontrol show hostnames $SLURM_STEP_NODELIST` and its address the NodeAddr
that `scontrol show node` gives (what torchtitan's and Megatron's Slurm scripts do with
MASTER_ADDR). How the nodes then keep in step is bench/sweep/team.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from bench.config.schema import ConfigError

DEFAULT_RDZV_TIMEOUT_S = 300.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 20.0  # a node not heard from for this long is lost
PORT_ENV = "ISP_BENCH_RDZV_PORT"  # Slurm: the endpoint's port, where the default could clash
SLURM_PORT_BASE = 29500


@dataclass(frozen=True)
class NodeSpec:
    nnodes: int
    node_rank: int
    host: str  # the head node's address: node 0's runner hosts the c10d store there
    port: int
    source: str  # "flags" or "slurm", for the messages
    rdzv_timeout_s: float = DEFAULT_RDZV_TIMEOUT_S  # how long a cell waits for every node
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S  # silence after which a node is lost

    def __post_init__(self) -> None:
        if not self.heartbeat_timeout_s > 0 or not self.rdzv_timeout_s > 0:
            raise ValueError("--rdzv-timeout and --heartbeat-timeout must be > 0 seconds")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank {self.node_rank} outside 0..{self.nnodes - 1}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} outside 1..65535")

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError([f"--rdzv-endpoint {text!r}: expected HOST:PORT, e.g. node0:29500"])
    return host.strip("[]"), int(port)


def from_flags(nnodes: int | None, node_rank: int | None, endpoint: str | None,
               rdzv_timeout_s: float = DEFAULT_RDZV_TIMEOUT_S,
               heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S) -> NodeSpec | None:
    """None when no flag was given; a ConfigError when only some were."""
    given = {"--nnodes": nnodes, "--node-rank": node_rank, "--rdzv-endpoint": endpoint}
    if all(v is None for v in given.values()):
        return None
    if nnodes is not None and nnodes == 1 and endpoint is None:
        return None  # --nnodes 1 alone: one node, as without the flag
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ConfigError([(f"{', '.join(missing)} missing: several nodes need --nnodes, --node-rank "
                            "and --rdzv-endpoint together (or none of them, inside Slurm)")])
    host, port = parse_endpoint(endpoint)  # type: ignore[arg-type]
    try:
        return NodeSpec(int(nnodes), int(node_rank), host, port, "flags", rdzv_timeout_s,  # type: ignore[arg-type]
                        heartbeat_timeout_s)
    except ValueError as exc:
        raise ConfigError([f"--nnodes {nnodes} --node-rank {node_rank} --rdzv-endpoint {endpoint}: {exc}"]) from None


def _scontrol(*args: str) -> str:
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError([f"Slurm: scontrol {' '.join(args)} failed ({exc})"]) from None
    if out.returncode != 0:
        raise ConfigError([f"Slurm: scontrol {' '.join(args)} failed: {out.stderr.strip()}"])
    return out.stdout


def head_address(nodelist: str) -> str:
    """The first node of the step and the address it is reached at (its NodeAddr)."""
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    match = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", first))
    return match.group(1) if match else first


def from_slurm(env: Mapping[str, str] = os.environ, rdzv_timeout_s: float = DEFAULT_RDZV_TIMEOUT_S,
               heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S) -> NodeSpec | None:
    """The node from a Slurm job step (srun); None outside one or in a one-node step.

    Only a step counts: the batch script itself also sees SLURM_NNODES, but runs on one node,
    and a runner started there must not wait for nodes that will never come.
    """
    nnodes = env.get("SLURM_STEP_NUM_NODES")
    if nnodes is None or int(nnodes) <= 1:
        return None
    tasks = env.get("SLURM_STEP_NUM_TASKS", nnodes)
    if tasks != nnodes:
        raise ConfigError([(f"Slurm: the step runs {tasks} tasks on {nnodes} nodes; the runner needs one "
                            "task per node (srun --ntasks-per-node=1), torchrun starts the ranks")])
    port = int(env.get(PORT_ENV) or SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 2000)
    host = head_address(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    return NodeSpec(int(nnodes), int(env["SLURM_NODEID"]), host, port, "slurm", rdzv_timeout_s, heartbeat_timeout_s)


def check_options(torchrun_args: tuple[str, ...]) -> None:
    """The torchrun flags that say how nodes meet are this module's to set."""
    ours = ("--nnodes", "--node-rank", "--node_rank", "--standalone", *_rdzv_flags())
    clash = [a for a in torchrun_args if a.split("=")[0] in ours]
    if clash:
        raise ConfigError([(f"--torchrun-arg {' '.join(clash)}: with several nodes the runner sets these; "
                            "use --nnodes/--node-rank/--rdzv-endpoint (or Slurm) instead")])


def _rdzv_flags() -> tuple[str, ...]:
    return ("--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend", "--rdzv-id",
            "--rdzv_id", "--rdzv-conf", "--rdzv_conf", "--master-addr", "--master_addr", "--master-port",
            "--master_port")


def resolve(nnodes: int | None, node_rank: int | None, endpoint: str | None,
            rdzv_timeout_s: float = DEFAULT_RDZV_TIMEOUT_S,
            heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S) -> NodeSpec | None:
    """The flags win over Slurm; None means one node, the runner as it always was."""
    spec = from_flags(nnodes, node_rank, endpoint, rdzv_timeout_s, heartbeat_timeout_s)
    if spec is not None or nnodes == 1:
        return spec
    return from_slurm(rdzv_timeout_s=rdzv_timeout_s, heartbeat_timeout_s=heartbeat_timeout_s)
