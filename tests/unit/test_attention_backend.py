"""Which attention kernel runs, and why: a broken flash-attn is reported, never silently SDPA."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from isp_core.attention import attention_backend, local_attention
from isp_core.model import LlamaConfig


def _import_with_fake_flash(tmp_path: Path, init_body: str) -> subprocess.CompletedProcess:
    """Import isp_core.attention in a fresh process whose path holds a flash_attn package
    with `init_body` as its __init__ (a real package on disk, not a patched module)."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(init_body))
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import torch\n"
            "from isp_core import attention_backend as a\n"
            "print('RESULT', a.FLASH_VERSION, '|', a.attention_backend('auto', 'cpu', torch.bfloat16).reason)\n")
    repo = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": f"{tmp_path}:{repo}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_flash_abi_error_is_reported_not_swallowed(tmp_path: Path) -> None:
    # What a torch upgrade does to a compiled flash-attn: an ImportError that is not "missing".
    done = _import_with_fake_flash(tmp_path, """
        raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
    """)
    assert done.returncode == 0, done.stderr
    assert "failed to import: ImportError: flash_attn_2_cuda.so: undefined symbol" in done.stdout
    assert "RuntimeWarning" in done.stderr and "undefined symbol" in done.stderr


def test_flash_other_error_is_reported_not_fatal(tmp_path: Path) -> None:
    done = _import_with_fake_flash(tmp_path, """
        raise OSError("libcudart.so.12: cannot open shared object file")
    """)
    assert done.returncode == 0, done.stderr
    assert "failed to import: OSError: libcudart.so.12" in done.stdout


def test_missing_flash_is_quiet(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['flash_attn'] = None\n"  # None in sys.modules: import finds nothing
            "import warnings; warnings.simplefilter('error')\n"
            "import torch\nfrom isp_core import attention_backend as a\n"
            "print('RESULT', a.FLASH_VERSION, '|', a.FLASH_MISSING)\n")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "RESULT None |" in done.stdout


def test_backend_choice_and_reason_on_cpu() -> None:
    choice = attention_backend("auto", "cpu", torch.bfloat16)
    assert choice.name == "sdpa" and choice.reason  # never empty: the record says why not flash
    assert attention_backend("sdpa", "cpu", torch.float32).reason.startswith("requested")
    with pytest.raises(RuntimeError, match="run.attention is flash but flash-attn cannot run"):
        attention_backend("flash", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="allowed: auto, flash, sdpa"):
        attention_backend("xformers", "cpu", torch.float32)
    assert set(choice.as_record()) == {"backend", "reason", "flash_attn_version"}


def test_flash_backend_fails_the_call_instead_of_running_sdpa() -> None:
    q = torch.randn(1, 8, 4, 8)
    kv = torch.randn(1, 8, 2, 8)
    with pytest.raises(RuntimeError, match="attention backend flash cannot run"):
        local_attention(q, kv, kv, backend="flash")
    sdpa = local_attention(q, kv, kv, backend="sdpa")
    assert torch.equal(sdpa, local_attention(q, kv, kv, backend="auto"))


def test_model_config_names_allowed_backends() -> None:
    assert LlamaConfig(attention="sdpa").attention == "sdpa"
    with pytest.raises(ValueError, match="allowed: auto, flash, sdpa"):
        LlamaConfig(attention="fa3")

