"""bench.worker.profiling: per-rank gzipped traces from a real 2-rank gloo run, rank selection,
config validation, and the CPU no-op memory snapshot helpers."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.worker.memory import peak_memory, reset_peak
from bench.worker.profiling import (
    Profiler,
    dump_memory_snapshot,
    rank_selected,
    start_memory_history,
    steps_needed,
    stop_memory_history,
)

REPO = Path(__file__).resolve().parents[2]


def settings(**overrides) -> SimpleNamespace:
    base = dict(enabled=True, ranks="all", wait=1, warmup=1, active=2, repeat=1,
                record_shapes=False, with_stack=False, profile_memory=False)
    return SimpleNamespace(**{**base, **overrides})


def test_rank_selection_and_steps():
    assert rank_selected("all", 5) and rank_selected([0, 2], 2) and not rank_selected([0, 2], 1)
    with pytest.raises(ValueError):
        rank_selected("some", 0)
    assert steps_needed(settings(wait=1, warmup=1, active=2, repeat=2)) == 8
    assert steps_needed(settings(repeat=0)) == 4


def test_active_below_two_is_rejected():
    with pytest.raises(ValueError, match="active"):
        Profiler(settings(active=1), cell="c", rank=0)
    with pytest.raises(ValueError, match="active"):  # unselected ranks fail alike
        Profiler(settings(active=1, ranks=[3]), cell="c", rank=0)
    Profiler(settings(active=1, enabled=False), cell="c", rank=0)  # disabled: not validated


def test_unselected_rank_is_a_noop(tmp_path):
    with Profiler(settings(ranks=[1]), cell="c", rank=0, trace_root=tmp_path) as prof:
        for _ in range(4):
            prof.step()
    assert not prof.active and prof.trace_paths == [] and not any(tmp_path.iterdir())


def test_memory_snapshot_helpers_are_noops_on_cpu(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("CPU behaviour only")
    assert start_memory_history(1000) is False
    assert dump_memory_snapshot(tmp_path / "snap.pickle") is None
    stop_memory_history()
    assert not (tmp_path / "snap.pickle").exists()


def _current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024


def test_cpu_peak_memory_is_the_rss_high_water_mark():
    import resource

    reset_peak("cpu")  # no-op: the RSS peak cannot be reset
    lo = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = peak_memory("cpu")
    assert set(peak) == {"peak_rss_bytes"}
    assert lo <= peak["peak_rss_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ballast = bytearray(64 << 20)  # zero-filled, so its pages are resident
    # Units check: the peak (KiB * 1024) is at least the current resident size in
    # bytes, up to the kernel's lazily synced per-thread RSS counters.
    assert peak_memory("cpu")["peak_rss_bytes"] >= 0.95 * _current_rss_bytes() > 64 << 20
    del ballast


SCRIPT = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    from bench.worker.profiling import Profiler, steps_needed

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = sys.argv[1]
    x, a = torch.randn(1 << 12), torch.randn(64, 64)
    gathered = torch.empty(world * x.numel())

    def step():
        work = dist.all_gather_into_tensor(gathered, x, async_op=True)
        a @ a
        work.wait()

    def cfg(**kw):
        base = dict(enabled=True, ranks="all", wait=1, warmup=1, active=2, repeat=1,
                    record_shapes=True, with_stack=False, profile_memory=True)
        return SimpleNamespace(**{**base, **kw})

    for cell, settings in (("repeat2", cfg(repeat=2)), ("only1", cfg(ranks=[1]))):
        with Profiler(settings, cell=cell, rank=rank, trace_root=root) as prof:
            for _ in range(steps_needed(settings)):
                step()
                prof.step()
    dist.destroy_process_group()
    """
)


def test_two_rank_gloo_traces(tmp_path):
    script = tmp_path / "profile_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]

    names = sorted(p.name for p in (tmp_path / "repeat2").iterdir())
    assert names == ["rank0.json.gz", "rank0_1.json.gz", "rank1.json.gz", "rank1_1.json.gz"]
    assert sorted(p.name for p in (tmp_path / "only1").iterdir()) == ["rank1.json.gz"]

    for path in [*(tmp_path / "repeat2").iterdir(), tmp_path / "only1" / "rank1.json.gz"]:
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
        info = trace["distributedInfo"]
        assert info["backend"] == "gloo" and info["world_size"] == 2
        assert info["rank"] == int(path.name[4])
        steps = [e for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")]
        assert len(steps) >= 2
        assert any(e.get("name") == "gloo:all_gather" for e in trace["traceEvents"])
