"""run.reuse_workers through run_bench.py: one world-2 torchrun job serves cell after cell.

One sweep, three jobs: a collectives cell under an unreachable busbw floor fails in the first
job, which must end there; one that runs past its timeout is killed with the second; the two
training cells after them run in a third job, the first of
them in a fresh process (its peak RSS is a figure), the second in the same processes (its
peak RSS is unavailable, with the reason); both train exactly (losses against the shared
reference, counted bytes against the formula) on process groups of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "name": "reuse",
    "base": {"model": {"hidden": 64, "layers": 1, "heads": 4, "kv_heads": 2, "vocab": 256, "mlp_hidden": 128},
             "data": {"seq_len": 32, "global_batch": 4, "micro_num": 1},
             "parallel": {"world_size": 2, "sp": 2, "wp": 2},
             "run": {"warmup_steps": 1, "measure_steps": 2, "timeout_s": 120, "reuse_workers": True},
             "nvml": {"enabled": False}},
    "matrix": {"parallel.overlap": [False, True]},
    "include": [{"run.kind": "collectives", "collectives.ops": ["all_gather"], "collectives.min_bytes": "1K",
                 "collectives.max_bytes": "4K", "collectives.warmup_iters": 1, "collectives.iters": 2,
                 "collectives.min_busbw_gbps": 1.0e6},
                {"run.kind": "collectives", "collectives.ops": ["all_gather"], "collectives.min_bytes": "4M",
                 "collectives.max_bytes": "4M", "collectives.iters": 1000000, "run.timeout_s": 6}],
}


@pytest.mark.slow
def test_one_job_serves_cells_in_turn_and_a_failure_ends_it(tmp_path: Path) -> None:
    config = tmp_path / "reuse.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = subprocess.run([sys.executable, str(REPO / "run_bench.py"), str(config), "--results-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr  # the collectives cell fails its floor
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    (collectives, slow, first, second) = records
    assert collectives["config"]["run"]["kind"] == "collectives" and collectives["status"] == "failed"
    assert "busbw" in collectives["error"]["reason"]
    assert slow["status"] == "timeout" and slow["error"]["reason"] == "timeout after 6s"
    jobs = sorted((run_dir / "pool").iterdir())
    assert [p.name for p in jobs] == ["ws2-cpu-1", "ws2-cpu-2", "ws2-cpu-3"]
    # The first job ran one cell and was ended after its failure (told to stop, if still there).
    assert sorted(p.name for p in jobs[0].glob("done-*")) == ["done-0.rank0", "done-0.rank1"]
    assert all(json.loads(p.read_text()) == {"stop": True} for p in jobs[0].glob("task-*") if p.name != "task-0.json")
    assert not list(jobs[1].glob("done-*"))  # killed in the middle of its one cell
    assert sorted(p.name for p in jobs[2].glob("done-*")) == ["done-0.rank0", "done-0.rank1", "done-1.rank0",
                                                              "done-1.rank1"]
    for record in (first, second):
        m = record["metrics"]
        assert record["status"] == "ok" and m["loss_matches_reference"] and m["comm"]["matches_prediction"]
        assert "task" in (run_dir / "logs" / record["cell"] / "torchrun.log").read_text()
    assert first["metrics"]["loss"] == second["metrics"]["loss"]  # the same tokens, the same training
    assert first["metrics"]["peak_memory_bytes"] > 100 << 20
    assert second["metrics"]["peak_memory_bytes"] is None and "earlier cell" in second["metrics"]["peak_memory_unavailable"]
    # The second cell started no process: far less before its first line than the first cell.
    assert second["metrics"]["phases_s"]["launch_to_first_line"] < first["metrics"]["phases_s"]["launch_to_first_line"] / 2
    for record in (first, second):  # each cell's rank output in its own log, though the processes are shared
        assert "strategy isp" in (run_dir / "logs" / record["cell"] / "rank1.log").read_text()
