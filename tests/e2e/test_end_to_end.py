"""The real worker through run_bench.py and torchrun: one tiny sweep over world sizes 1, 2, 4.

Checks what only a whole run shows: every layout trains on the same tokens (equal loss
curves), the counted bytes equal the formula, a profiled cell leaves per-rank traces
that tools can open, labelled with ISP's phases, every record's phase times add up to its
job, and one loss reference, computed in the world-size-1 cell, serves every cell.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.metrics.phases import PHASES

REPO = Path(__file__).resolve().parents[2]

CONFIG = {
    "name": "e2e",
    "base": {
        "model": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128, "mlp_hidden": 64,
                  "checkpoint": 0.5},
        "data": {"seq_len": 32, "global_batch": 4, "micro_num": 1, "packed": True, "seed": 7},
        "parallel": {"world_size": 1, "sp": "world", "wp": "world", "overlap": True, "memory_pool": True},
        "run": {"warmup_steps": 1, "measure_steps": 3, "timeout_s": 240},
        "profile": {"enabled": False},
    },
    "matrix": {"parallel.world_size": [1, 2, 4]},
    "include": [{"parallel.world_size": 2, "profile.enabled": True, "profile.wait": 0, "profile.warmup": 1,
                 "profile.active": 2}],
}

ISP_LABELS = ["isp.all_gather.0.attention.wqkv", "isp.wait.all_gather.1.feed_forward.w2",
              "isp.reduce_scatter.0.feed_forward.w1", "isp.all_to_all.attn.q_kv.0", "isp.all_to_all.attn.q_kv.1",
              "isp.all_to_all.attn.out.0", "isp.all_to_all.attn.out.bwd.0", "isp.all_to_all.head.logits.0",
              "isp.all_gather.embedding", "isp.all_gather.embedding.backward", "isp.pool.acquire.attention.wo",
              "isp.recompute.block0"]
# A CPU hardware file for metrics.plan (figures of no importance: the test checks the wiring).
HARDWARE = {"name": "e2e-cpu", "device": {"memory_gib": 8, "cores": 2},
            "compute": {"achieved": {"matmul_tflops": 0.02, "attention_tflops": 0.01, "elementwise_gbps": 2,
                                     "loss_gbps": 2, "optimizer_gbps": 2}},
            "links": {"gpus_per_node": 4, "intra": {"busbw_gbps": 0.5, "latency_us": 100}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    tmp = tmp_path_factory.mktemp("e2e")
    config = tmp / "e2e.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    (tmp / "hw.yaml").write_text(yaml.safe_dump(HARDWARE))
    out = subprocess.run([sys.executable, str(REPO / "run_bench.py"), str(config), "--results-dir", str(tmp / "r"),
                          "--hardware", str(tmp / "hw.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (tmp / "r").iterdir()
    records = {r["cell"]: r for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())}
    return run_dir, records


def test_loss_curves_equal_across_world_sizes(run: tuple[Path, dict[str, dict]]) -> None:
    _, records = run
    assert {r["status"] for r in records.values()} == {"ok"}
    curves = {r["config"]["parallel"]["world_size"]: r["metrics"]["loss"] for r in records.values()}
    assert set(curves) == {1, 2, 4} and len(curves[1]) == 3
    for world_size in (2, 4):
        assert curves[world_size] == pytest.approx(curves[1], rel=1e-5), world_size
    assert len(set(curves[1])) == 3  # the loss moves: AdamW really stepped


def test_counted_bytes_match_the_formula_and_nvml_is_reported_absent(run: tuple[Path, dict[str, dict]]) -> None:
    _, records = run
    for record in records.values():
        assert record["metrics"]["comm"]["matches_prediction"], record["metrics"]["comm"]["mismatches"]
        assert record["metrics"]["loss_matches_reference"] is True
        nvml = record["metrics"]["nvml"]
        assert nvml["available"] is False and nvml["reason"]  # no GPU here: said, not faked


def test_every_record_carries_its_prediction(run: tuple[Path, dict[str, dict]]) -> None:
    _, records = run
    for record in records.values():
        m = record["metrics"]
        plan = m["plan"]
        assert plan["available"] and plan["hardware"] == "e2e-cpu", plan
        assert plan["step_time_s"]["measured"] == m["step_time_s"]["median"] and plan["step_time_s"]["predicted"] > 0
        assert plan["peak_memory_bytes"]["measured"] == m["peak_memory_bytes"]
        profiled = record["config"]["profile"]["enabled"]
        assert (plan["exposed_comm_s"]["measured"] is not None) == profiled


def test_profiled_cell_writes_labelled_traces(run: tuple[Path, dict[str, dict]]) -> None:
    run_dir, records = run
    (profiled,) = [r for r in records.values() if r["config"]["profile"]["enabled"]]
    traces = sorted((run_dir / "traces" / profiled["cell"]).glob("rank*.json.gz"))
    assert [t.name for t in traces] == ["rank0.json.gz", "rank1.json.gz"]
    for path in traces:
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
        assert trace["distributedInfo"]["world_size"] == 2
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert sum(n.startswith("ProfilerStep#") for n in names) >= 2
        missing = [label for label in ISP_LABELS if label not in names]
        assert not missing, f"{path.name} lacks {missing}"
    overlap = profiled["metrics"]["overlap"]
    assert len(overlap["per_rank"]) == 2 and overlap["per_rank"][0]["comm_s"] > 0


def test_phases_add_up_and_one_reference_serves_every_cell(run: tuple[Path, dict[str, dict]]) -> None:
    run_dir, records = run
    for record in records.values():
        timed = record["metrics"]["phases_s"]
        assert list(timed) == list(PHASES) and all(v >= 0 for v in timed.values())
        assert sum(timed.values()) == pytest.approx(record["wall_s"], abs=0.05)  # the job, phase by phase
        assert timed["measure"] > 0 and timed["launch_to_first_line"] > 0 and 0 <= record["runner_overhead_s"] < 5
        assert (timed["profile"] > 0) == record["config"]["profile"]["enabled"]
    sources = {json.dumps(r["metrics"]["loss_reference_source"], sort_keys=True) for r in records.values()}
    (source,) = map(json.loads, sources)
    host = [c for c, r in records.items() if r["metrics"]["phases_s"]["loss_reference"] > 0]
    assert host == [source["cell"]] and records[host[0]]["config"]["parallel"]["world_size"] == 1
    kept = json.loads((run_dir / source["file"]).read_text())
    assert all(r["metrics"]["loss_reference"] == kept["losses"] for r in records.values())
    summary = (run_dir / "summary.md").read_text()
    assert "## Where the time went" in summary and "timed share: measured steps" in summary
