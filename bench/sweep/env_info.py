"""env.json: what a run was measured on, so two runs can be told apart before their numbers are.

Keys are flat because comparisons diff them key by key (bench/results/compare.py ENV_KEYS). Anything
that cannot be known is null, with the reason beside it, rather than absent.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    # GIT_OPTIONAL_LOCKS=0: `status` must not rewrite the index of a repo someone is committing in.
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "nccl": None}
    if info["cuda_available"]:
        info["gpu_count"] = torch.cuda.device_count()
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError, TypeError) as exc:
            info["nccl_unavailable"] = str(exc)
    return info


def attention_info() -> dict[str, Any]:
    """flash-attn's version, or why it cannot be imported (missing, or installed but broken);
    each record says which kernel its cell ran (metrics.attention)."""
    from isp_core import attention

    return {"flash_attn": attention.FLASH_VERSION, "flash_attn_unavailable": attention.FLASH_MISSING or None}


def gpu_info() -> dict[str, Any]:
    """Driver and GPU model from NVML; null plus the reason where NVML cannot start."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError or an NVMLError: no driver, no library, no GPU
        return {"driver": None, "gpu": None, "nvml_unavailable": f"{type(exc).__name__}: {exc}"}
    try:
        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        count = pynvml.nvmlDeviceGetCount()
        names = [text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
        return {"driver": text(pynvml.nvmlSystemGetDriverVersion()),
                "gpu": " | ".join(dict.fromkeys(names)) or None, "gpu_names": names}
    finally:
        pynvml.nvmlShutdown()


def collect(command_line: list[str] | None = None) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        **torch_info(),
        **attention_info(),
        **gpu_info(),
        **git_info(),
        "command_line": command_line if command_line is not None else [sys.executable, *sys.argv],
    }
