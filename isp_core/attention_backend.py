"""Which local attention kernel runs, and why: flash-attn when it can (installed, importable,
CUDA, fp16/bf16), PyTorch SDPA otherwise, or what `run.attention` asks for.

Only a missing flash-attn is quiet; one that is installed but fails to import is reported
(a warning, and the reason in every record), never silently replaced by SDPA.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

ATTENTION_BACKENDS = ("auto", "flash", "sdpa")


def _import_flash() -> tuple[Optional[Callable], Optional[Callable], Optional[str], str]:
    """(flash_attn_func, flash_attn_varlen_func, version, why not) from importing flash-attn.

    Only a missing package is quiet: an installed flash-attn that fails to import (the
    undefined-symbol ImportError a torch upgrade causes, a CUDA mismatch) is a broken install
    the user must hear about, not a silent fall back to SDPA.
    """
    try:
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ModuleNotFoundError as err:
        if err.name != "flash_attn":
            return None, None, None, _broken(err)
        return None, None, None, "flash-attn is not installed"
    except Exception as err:  # noqa: BLE001 - any failure of an installed package is reported
        return None, None, None, _broken(err)
    return flash_attn_func, flash_attn_varlen_func, getattr(flash_attn, "__version__", "unknown"), ""


def _broken(err: BaseException) -> str:
    why = f"flash-attn is installed but failed to import: {type(err).__name__}: {err}"
    warnings.warn(why + " (attention falls back to SDPA unless run.attention is flash)", RuntimeWarning,
                  stacklevel=3)
    return why


flash_attn_func, flash_attn_varlen_func, FLASH_VERSION, FLASH_MISSING = _import_flash()



@dataclass(frozen=True)
class AttentionBackend:
    """The kernel `local_attention` will run for a device and dtype, and why."""

    name: str    # "flash" or "sdpa"
    reason: str  # why this one (when it is sdpa: why not flash)

    def as_record(self) -> dict[str, Optional[str]]:
        """For env.json and every record; the installed flash-attn version even when unused."""
        return {"backend": self.name, "reason": self.reason, "flash_attn_version": FLASH_VERSION}


def _why_not_flash(device: torch.device, dtype: torch.dtype) -> str:
    if flash_attn_func is None:
        return FLASH_MISSING
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, the model is on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, the model computes in {str(dtype).removeprefix('torch.')}"
    return ""


def attention_backend(requested: str, device: torch.device | str, dtype: torch.dtype) -> AttentionBackend:
    """Which kernel runs for `requested` (auto | flash | sdpa) on `device` in `dtype`, and why.

    `flash` raises RuntimeError when flash-attn cannot run there: a cell asking for flash
    must fail rather than measure SDPA under flash's name.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {requested!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
    if requested == "sdpa":
        return AttentionBackend("sdpa", "requested (run.attention: sdpa)")
    why_not = _why_not_flash(torch.device(device), dtype)
    if not why_not:
        return AttentionBackend("flash", f"flash-attn {FLASH_VERSION} ({requested})")
    if requested == "flash":
        raise RuntimeError(f"run.attention is flash but flash-attn cannot run: {why_not}")
    return AttentionBackend("sdpa", why_not)


def use_flash(q: torch.Tensor, backend: str) -> bool:
    if backend == "sdpa":
        return False
    why_not = _why_not_flash(q.device, q.dtype)
    if why_not and backend == "flash":
        raise RuntimeError(f"attention backend flash cannot run: {why_not}")
    return not why_not
