"""run_bench.py nightly CONFIG: the sweep runs through the same path as run_bench.py CONFIG
(real torchrun, the stand-in worker), is recorded, judged, and leaves nightly.md/json behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.results import history

REPO = Path(__file__).resolve().parents[2]
SMALL = {"model": {"hidden": 64, "layers": 1, "heads": 4, "kv_heads": 2, "vocab": 256, "mlp_hidden": 128},
         "data": {"seq_len": 32, "global_batch": 4, "micro_num": 1},
         "parallel": {"world_size": 1, "sp": 1, "wp": 1},
         "run": {"warmup_steps": 0, "measure_steps": 3, "timeout_s": 120}}


@pytest.mark.slow  # one torchrun launch: torch imports twice, about a minute on 2 busy cores
def test_nightly_runs_records_and_judges_a_sweep(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "base": SMALL, "matrix": {}}))
    db = tmp_path / "h.sqlite"
    env = dict(os.environ, ISP_BENCH_WORKER="tests.support.fake_worker", FAKE_WORKER_PLAN="{}")
    out = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "nightly", str(config), "--results-dir",
                          str(tmp_path / "r"), "--db", str(db), "--format", "json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    (run_dir,) = (tmp_path / "r").iterdir()
    assert out.returncode == 3, out.stderr  # the first night has no history to be judged against
    doc = json.loads((run_dir / "nightly.json").read_text())
    assert doc["exit_code"] == 3 and doc["series"]
    assert {s["status"] for s in doc["series"]} == {"too little history"}
    (recorded,) = history.list_runs(db)
    assert recorded["name"] == run_dir.name and recorded["nnodes"] == "1"  # env.json carries the node count
    assert (run_dir / "nightly.md").read_text().startswith(f"# Nightly: {run_dir.name}")
