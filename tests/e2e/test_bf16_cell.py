"""A bfloat16 CPU cell through run_bench.py/torchrun: its losses are checked against a bfloat16
one-process reference (a verdict, never a skip), and the attention kernel is on record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "name": "bf16",
    "base": {
        "model": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128, "mlp_hidden": 64},
        "data": {"seq_len": 32, "global_batch": 4, "micro_num": 2, "packed": True, "seed": 3},
        "parallel": {"world_size": 2, "sp": 2, "wp": 2, "overlap": True, "memory_pool": False},
        "run": {"dtype": "bfloat16", "warmup_steps": 1, "measure_steps": 3, "timeout_s": 240},
        "profile": {"enabled": False},
    },
}


@pytest.mark.slow
def test_bf16_cell_records_a_loss_verdict_and_its_attention(tmp_path: Path) -> None:
    config = tmp_path / "bf16.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = subprocess.run([sys.executable, str(REPO / "run_bench.py"), str(config), "--results-dir", str(tmp_path / "r")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (tmp_path / "r").iterdir()
    (record,) = map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())
    m = record["metrics"]
    assert "loss_check_skipped" not in m
    assert m["loss_matches_reference"] is True, (m["loss"], m["loss_reference"])
    assert m["loss_rel_tol"] == 5e-3 and 0 <= m["loss_max_rel_diff"] < 5e-3
    assert m["attention"]["backend"] == "sdpa" and m["attention"]["reason"]
    env = json.loads((run_dir / "env.json").read_text())
    assert "flash_attn" in env and (env["flash_attn"] or env["flash_attn_unavailable"])
