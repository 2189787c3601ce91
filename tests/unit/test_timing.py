"""bench.worker.timing: percentiles against numpy, the CPU step timer, and the 2-rank MAX reduction."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bench.worker.timing import StepTimer, percentile, reduce_max_across_ranks, summarize

REPO = Path(__file__).resolve().parents[2]


def test_summarize_hand_worked():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    # sorted 1,2,3,4: pos(p10) = 3 * 0.1 = 0.3 -> 1 + 0.3 * (2 - 1) = 1.3
    assert s["median"] == pytest.approx(2.5)
    assert s["p10"] == pytest.approx(1.3)
    assert s["p90"] == pytest.approx(3.7)
    assert s["mean"] == pytest.approx(2.5)
    assert s["stdev"] == pytest.approx((5.0 / 3.0) ** 0.5)  # sum sq dev 5, n - 1 = 3
    assert (s["min"], s["max"]) == (1.0, 4.0)
    assert s["samples"] == [4.0, 1.0, 3.0, 2.0]  # measurement order kept


@pytest.mark.parametrize("n", [1, 2, 3, 10, 57])
def test_percentiles_match_numpy(n):
    rng = random.Random(n)
    xs = [rng.uniform(0.0, 5.0) for _ in range(n)]
    s = summarize(xs)
    for key, q in (("p10", 10), ("median", 50), ("p90", 90)):
        assert s[key] == pytest.approx(float(np.percentile(xs, q)))
    assert s["stdev"] == pytest.approx(float(np.std(xs, ddof=1)) if n > 1 else 0.0)


def test_single_sample_and_errors():
    s = summarize([0.25])
    assert s["median"] == s["p10"] == s["p90"] == 0.25 and s["stdev"] == 0.0
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_cpu_step_timer_without_dist():
    timer = StepTimer("cpu")
    for _ in range(2):
        with timer.step():
            time.sleep(0.02)
    assert len(timer.samples) == 2
    assert all(0.02 <= t < 0.5 for t in timer.samples)
    assert reduce_max_across_ranks([1.0, 2.0]) == [1.0, 2.0]
    timer.reset()
    assert timer.samples == []


SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch.distributed as dist
    from bench.worker.timing import StepTimer, reduce_max_across_ranks

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    timer = StepTimer("cpu")
    with timer.step():
        time.sleep(0.05 if rank == 1 else 0.0)  # rank 1 is the straggler
    maxed = reduce_max_across_ranks([rank + 1.0, 10.0 - rank])
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"samples": timer.samples, "maxed": maxed}, f)
    dist.destroy_process_group()
    """
)


def test_two_rank_barrier_timer_and_max(tmp_path):
    script = tmp_path / "timer_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # The closing barrier waits for the straggler: rank 1 sleeps 50 ms, and rank 0, which does
    # nothing, still sees most of it (less only by how late the OS let it out of the opening
    # barrier: up to a few ms on a loaded machine; without the closing barrier it would be ~0).
    assert results[1]["samples"][0] >= 0.05
    assert results[0]["samples"][0] >= 0.025
    for res in results:
        assert res["maxed"] == [2.0, 10.0]
