"""Collectives cells (nccl-tests style) and the communication roofline.

Unit-sized: bandwidth formulas against hand-worked nccl-tests numbers, size rounding, the
check's tolerance, the floor, the table against its JSON, the roofline's interpolation and
matching, config messages. Real: two run_bench.py runs through torchrun and gloo (three
launches): a world-2 collectives cell beside a training cell that gets its roofline (exit 0),
and a corrupted world-4 cell under an unreachable floor (exit 1).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bench.cli import main as cli
from bench.config.schema import ELEMENT_SIZE
from bench.metrics import collectives_spec as spec
from bench.worker.collectives import CORRUPT_ENV, count_wrong, make_row, pattern, pattern_sum
from bench.config import COLLECTIVE_OPS, CellConfig, CollectivesConfig, ConfigError
from bench.config.checks import HostLimits
from bench.sweep.launch import judged_result
from bench.config.matrix import Cell, build, load_config
from bench.metrics.roofline import Curve, curves_from_records, find_curve, load_curves, roofline
from bench.metrics.assemble import roofline_metrics
from bench.metrics.roofline import LINKS_FILE, curves_from_json, curves_to_json
from bench.sweep.launch import CellPaths
from bench.sweep.runner import write_cell_inputs

REPO = Path(__file__).resolve().parents[2]
TRAIN = {"model": {"hidden": 64, "layers": 1, "heads": 4, "kv_heads": 2, "vocab": 256, "mlp_hidden": 128},
         "data": {"seq_len": 32, "global_batch": 4, "micro_num": 1},
         "parallel": {"world_size": 2, "sp": 2, "wp": 2},
         "run": {"warmup_steps": 1, "measure_steps": 2, "timeout_s": 120},
         "profile": {"enabled": True, "wait": 0, "warmup": 1, "active": 2},
         "nvml": {"enabled": False}}
TINY = {"min_bytes": "256", "max_bytes": "16K", "factor": 4, "warmup_iters": 1, "iters": 3}


# --- formulas: nccl-tests' PERFORMANCE.md, worked by hand ------------------------------------

@pytest.mark.parametrize("op, n, dtype, count, seconds, algbw, busbw", [
    # all_reduce of 1e9 B on 8 ranks in 10 ms: algbw 100 GB/s, busbw 100 * 2*7/8 = 175 GB/s
    ("all_reduce", 8, "float32", 250_000_000, 0.010, 100.0, 175.0),
    # all_gather, 8 ranks, 256 MiB full output in 2 ms: 268435456 B / 2 ms = 134.217728, x 7/8
    ("all_gather", 8, "float32", 1 << 26, 0.002, 134.217728, 117.440512),
    # reduce_scatter, 4 ranks, 256 MiB full input (bf16, 2^27 elements) in 4 ms: 67.108864, x 3/4
    ("reduce_scatter", 4, "bfloat16", 1 << 27, 0.004, 67.108864, 50.331648),
    # all_to_all, 2 ranks, 2 MiB send buffer (half) in 100 us: 20.97152, x 1/2
    ("all_to_all", 2, "float16", 1 << 20, 100e-6, 20.97152, 10.48576),
])
def test_row_bandwidths_match_nccl_tests(op: str, n: int, dtype: str, count: int, seconds: float,
                                         algbw: float, busbw: float) -> None:
    row = make_row(op, count, dtype, n, [seconds * 0.5, seconds, seconds * 1.5], wrong=0)
    assert row["size_bytes"] == count * ELEMENT_SIZE[dtype]
    assert row["time_us"] == pytest.approx(seconds * 1e6)  # the mean of the samples
    assert row["algbw_gbps"] == pytest.approx(algbw) and row["busbw_gbps"] == pytest.approx(busbw)
    assert row["min_us"] == pytest.approx(seconds * 0.5e6) and row["max_us"] == pytest.approx(seconds * 1.5e6)
    assert row["p99_us"] == pytest.approx(seconds * 1e6 * (1.0 + 0.5 * 0.98))  # pos 1.98 of 0..2
    assert row["type"] == {"float32": "float", "bfloat16": "bfloat16", "float16": "half"}[dtype]
    assert row["redop"] == {"all_reduce": "sum", "reduce_scatter": "avg"}.get(op, "none")


def test_sizes_round_to_whole_chunks() -> None:
    assert spec.message_sizes(1024, 4 << 20, 2)[-1] == 4 << 20 and len(spec.message_sizes(1024, 4 << 20, 2)) == 13
    assert spec.message_sizes(1000, 5000, 4) == [1000, 4000]
    assert spec.element_count("all_gather", 1000, 3, 4) == 249  # 250 elements, down to a multiple of 3
    assert spec.element_count("all_reduce", 1000, 3, 4) == 250
    assert spec.element_count("all_to_all", 4, 8, 2) == 8  # at least one element per rank
    # 8 B and 16 B both round up to 8 elements on 8 ranks: measured once
    assert spec.sweep_counts("reduce_scatter", 8, 64, 2, 8, 2) == [8, 16, 32]


def test_pattern_and_check_tolerance() -> None:
    cpu = torch.device("cpu")
    assert pattern(2, 10, 4, cpu).tolist() == [12.0, 0.0, 1.0, 2.0]
    for n in (1, 5, 13, 30):  # whole cycles of 13 and the rest
        want = sum(pattern(r, 7, 50, cpu) for r in range(n))
        assert torch.equal(pattern_sum(n, 7, 50, cpu), want)
    expected = pattern_sum(3, 0, 64, cpu) / 3  # an average of 3 ranks: inexact in bf16
    result = expected.to(torch.bfloat16)
    assert count_wrong(result, expected, "reduce_scatter", 3) == 0
    result[5] = -1.0
    assert count_wrong(result, expected, "reduce_scatter", 3) == 1
    moved = pattern(1, 0, 8, cpu)
    assert count_wrong(moved.to(torch.float16), moved, "all_gather", 2) == 0
    assert count_wrong(moved.roll(1), moved, "all_to_all", 2) == 8  # data movement must be exact


def table_doc(floor: float | None, wrong: int = 0) -> dict[str, Any]:
    rows = [make_row("all_gather", c, "float32", 2, [t], w) for c, t, w in ((256, 1e-4, 0), (1024, 2e-4, wrong))]
    doc = {"cell": "c", "group": "weight", "group_size": 2, "world_size": 2, "group_ranks": [[0, 1]],
           "dtype": "float32", "device": "cpu", "backend": "gloo", "async_op": False, "warmup_iters": 1,
           "iters": 1, "ops": {"all_gather": {"rows": rows}}}
    return spec.finish(doc, floor)


def test_floor_and_wrong_decide_the_verdict() -> None:
    avg = table_doc(None)["avg_busbw_gbps"]
    assert avg == pytest.approx((1024 / 1e-4 + 4096 / 2e-4) / 2 / 1e9 / 2)  # mean busbw, (n-1)/n = 1/2
    assert table_doc(None)["error"] is None and table_doc(avg * 0.9)["error"] is None
    assert "below min_busbw_gbps" in table_doc(avg * 1.1)["error"]
    bad = table_doc(None, wrong=3)
    assert bad["wrong"] == 3 and bad["error"] == "collectives: 3 wrong element(s) (all_gather at 4096 B: 3)"
    assert "FAILED" in spec.format_table(table_doc(avg * 1.1)) and "0 OK" in spec.format_table(table_doc(None))


def parse_table(text: str) -> dict[str, list[list[str]]]:
    """op -> the data rows of a printed table, split into fields."""
    tables: dict[str, list[list[str]]] = {}
    op = None
    for line in text.splitlines():
        if m := re.fullmatch(r"# (all_gather|reduce_scatter|all_to_all|all_reduce)\b.*", line):
            op = m.group(1)
            tables[op] = []
        elif op and line and not line.startswith("#"):
            tables[op].append(line.split())
    return tables


def assert_table_matches_json(text: str, doc: dict[str, Any]) -> None:
    tables = parse_table(text)
    assert list(tables) == list(doc["ops"])
    for op, rows in tables.items():
        assert len(rows) == len(doc["ops"][op]["rows"])
        for fields, row in zip(rows, doc["ops"][op]["rows"], strict=True):
            want = [str(row["size_bytes"]), str(row["count"]), row["type"], row["redop"], f"{row['time_us']:.2f}",
                    f"{row['algbw_gbps']:.3f}", f"{row['busbw_gbps']:.3f}", str(row["wrong"]),
                    f"{row['min_us']:.2f}", f"{row['max_us']:.2f}", f"{row['p99_us']:.2f}", f"{row['skew_pct']:.1f}"]
            assert fields == want
        assert f"Avg bus bandwidth    : {doc['ops'][op]['avg_busbw_gbps']:.6g} GB/s ({op})" in text
    assert f"Avg bus bandwidth    : {doc['avg_busbw_gbps']:.6g} GB/s (all ops)" in text


# --- the roofline ----------------------------------------------------------------------------

def curve(sizes: list[int], times: list[float], groups: Any = ((0, 1),), op: str = "all_gather",
          world: int = 2, source: str = "r/c") -> Curve:
    return Curve(op, "float32", "cpu", "gloo", world, tuple(tuple(g) for g in groups), tuple(sizes),
                 tuple(times), source)


def test_curve_interpolates_log_log_and_clamps() -> None:
    c = curve([1000, 4000, 16000], [1e-4, 1e-4, 4e-4])
    assert c.time_s(4000) == pytest.approx(1e-4) and c.time_s(10) == 1e-4  # latency floor below
    assert c.time_s(8000) == pytest.approx(2e-4)  # time ~ size^1 between 4000 and 16000: halfway in log
    assert c.time_s(2000) == pytest.approx(1e-4)
    assert c.time_s(32000) == pytest.approx(8e-4)  # above: the largest size's bandwidth
    sqrt = curve([100, 10000], [1e-5, 1e-3])  # a power law t ~ size is reproduced exactly
    assert sqrt.time_s(1000) == pytest.approx(1e-4)


def training_cell(world: int = 4, sp: int = 2, wp: int = 2) -> CellConfig:
    return CellConfig.from_dict({**TRAIN, "parallel": {"world_size": world, "sp": sp, "wp": wp}})


def test_roofline_per_group_totals_and_matching() -> None:
    cell = training_cell()  # weight groups [[0,1],[2,3]], weight_data [[0,2],[1,3]]
    same = curve([1000, 100000], [1e-4, 1e-3], groups=[[0, 1], [2, 3]], world=4, source="run/wp2")
    other = curve([1000, 100000], [2e-4, 2e-3], groups=[[0, 1]], world=2, source="old/ws2")
    a2a = curve([1000, 100000], [1e-4, 1e-3], groups=[[0, 1], [2, 3]], world=4, op="all_to_all", source="run/wp2")
    assert find_curve([other, same], "all_gather", cell, [[0, 1], [2, 3]]) == (same, "same groups")
    assert find_curve([other], "all_gather", cell, [[0, 2], [1, 3]])[1] == "same size"
    assert find_curve([other, same], "all_gather", cell, [[0, 2], [1, 3]]) == (same, "same size and world")
    assert find_curve([same], "all_gather", cell, [[0, 1, 2, 3]])[0] is None

    metrics = {"comm": {"counted_per_step": {
        "weight": {"all_gather": {"calls": 10, "bytes": 100000}},  # 10 calls of 10 kB
        "sequence": {"all_to_all": {"calls": 4, "bytes": 4000}, "all_reduce": {"calls": 1, "bytes": 8}}}},
        "comm_time_s": {"all_gather": 0.006, "all_to_all": 0.0008, "all_reduce": 0.0, "reduce_scatter": 0.0}}
    roof = roofline(cell, metrics, [same, a2a])
    ag = next(e for e in roof["per_group"] if e["kind"] == "all_gather")
    assert ag["message_bytes"] == 10000 and ag["time_per_call_s"] == pytest.approx(10 ** -3.5)
    assert ag["roofline_s"] == pytest.approx(10 * 10 ** -3.5) and ag["match"] == "same groups"
    assert ag["busbw_gbps"] == pytest.approx(10000 / 10 ** -3.5 / 1e9 / 2)
    assert roof["by_kind"]["all_gather"]["ratio"] == pytest.approx(0.006 / (10 * 10 ** -3.5))
    assert roof["by_kind"]["all_to_all"] == {"roofline_s": pytest.approx(4e-4), "measured_s": 0.0008,
                                             "ratio": pytest.approx(2.0)}
    assert roof["unmatched"] == [{"group": "sequence", "kind": "all_reduce", "group_size": 2, "calls": 1,
                                  "bytes": 8,
                                  "reason": "no all_reduce profile of a 2-rank group in float32 on cpu/gloo"}]
    assert not roof["complete"] and roof["roofline_s"] == pytest.approx(10 * 10 ** -3.5 + 4e-4)
    assert roof["measured_s"] == pytest.approx(0.0068) and roof["ratio"] == pytest.approx(0.0068 / roof["roofline_s"])
    no_trace = roofline(cell, {"comm": metrics["comm"]}, [same])
    assert no_trace["measured_s"] is None and no_trace["by_kind"]["all_gather"]["ratio"] is None
    odd = roofline(cell, {"comm": {"counted_per_step": {"shard": {"all_gather": {"calls": 1, "bytes": 8}}}}}, [same])
    assert odd["per_group"] == [] and odd["unmatched"][0]["reason"].startswith("group 'shard' is not one of")


def test_a_linked_profile_reaches_the_worker_and_its_roofline(tmp_path: Path) -> None:
    """What --link-profile feeds a training cell: curves from another run, handed to its worker in links.json."""
    cell = Cell("t", {}, training_cell(2, 2, 2))
    linked = [curve([1000, 100000], [1e-4, 1e-3], groups=[[0, 1]], source="old/ws2")]
    metrics = {"comm": {"counted_per_step": {"weight": {"all_gather": {"calls": 2, "bytes": 2000}}}}}
    ok = roofline_metrics(cell.config, metrics, linked)
    assert ok["per_group"][0]["profile"] == "old/ws2"
    assert ok["roofline_s"] == pytest.approx(2e-4)
    # The runner hands the curves to the worker beside the cell's config; none without a table.
    paths = CellPaths.under(tmp_path, cell.id)
    write_cell_inputs(paths, cell, linked)
    links = paths.config.parent / LINKS_FILE
    assert curves_from_json(json.loads(links.read_text())) == linked == curves_from_json(curves_to_json(linked))
    write_cell_inputs(paths, cell, [])
    assert not links.exists()  # no table: the worker computes no roofline
    broken = roofline_metrics(cell.config, {"comm": {"counted_per_step": {"weight": 1}}}, linked)
    assert broken["error"].startswith("AttributeError")  # recorded, the sweep goes on


def test_curves_come_from_ok_collectives_records_only() -> None:
    doc = table_doc(None)
    ok = {"cell": "c", "status": "ok", "metrics": {"collectives": doc}}
    training = {"cell": "t", "status": "ok", "metrics": {"tokens_per_s": 1}}
    records = [ok, {**ok, "cell": "d", "status": "failed"}, training]
    (only,) = curves_from_records(records, "run")
    assert only.source == "run/c" and only.sizes == (1024, 4096) and only.times_s == pytest.approx((1e-4, 2e-4))


def test_a_canary_table_is_left_out_of_the_roofline(tmp_path: Path) -> None:
    """A nightly's collectives canary measures a narrow range: the runner's roofline leaves it out
    (it would win ties over --link-profile's full tables); plan --calibrate may still read it."""
    ok = {"cell": "c", "status": "ok", "config": {"run": {"kind": "collectives"}},
          "metrics": {"collectives": table_doc(None)}}
    probe = {**ok, "cell": "probe", "config": {"run": {"kind": "collectives", "canary": True}}}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (ok, probe)))
    assert {c.source for c in load_curves(tmp_path)} == {f"{tmp_path.name}/c", f"{tmp_path.name}/probe"}
    assert {c.source for c in load_curves(tmp_path, canaries=False)} == {f"{tmp_path.name}/c"}


# --- config --------------------------------------------------------------------------------

def test_config_shape_and_messages() -> None:
    c = CellConfig.from_dict({"run": {"kind": "collectives"}, "parallel": {"world_size": 8, "sp": 1, "wp": 8},
                              "collectives": {"ops": ["all_to_all"], "min_bytes": "1K", "max_bytes": "256M"}})
    assert (c.collectives.min_bytes, c.collectives.max_bytes, c.collectives.ops) == (1024, 256 << 20, ("all_to_all",))
    assert CellConfig.from_dict(c.to_dict()) == c  # model/data size rules do not apply (dp=8 > batch)
    cases = [({"ops": ["all_gather", "bcast"]}, "collectives.ops: list ['bcast'] is not allowed; allowed: a non-empty"),
             ({"min_bytes": "1X"}, "collectives.min_bytes: got str '1X'; allowed: an int >= 1 or a string such as"),
             ({"group": "data"}, "collectives.group: str 'data' is not allowed; allowed: 'weight', 'sequence'"),
             ({"iters": 0}, "collectives.iters: int 0 is out of range; allowed: an int >= 1")]
    for values, message in cases:
        with pytest.raises(ConfigError) as info:
            CollectivesConfig(**values)
        assert info.value.messages[0].startswith(message)
    d = {"name": "t", "base": {"parallel": {"world_size": 2, "sp": 1, "wp": 2}, "run": {"kind": "collectives"},
                               "collectives": {"group": "sequence", "min_bytes": "8M", "oops": 1}}}
    with pytest.raises(ConfigError) as info:
        build(d, "t.yaml", "t", host=HostLimits(cpu_count=2))
    text = "\n".join(info.value.messages)
    assert "t.yaml: base.collectives.oops: unknown key" in text
    assert "t.yaml: base.collectives.group: the sequence group has sp=1 rank: nothing is sent" in text
    assert "min_bytes=8388608 > max_bytes=4194304; allowed: <= 4194304" in text


def test_shipped_configs_load() -> None:
    cpu = load_config(REPO / "configs" / "collectives-cpu.yaml", host=HostLimits(cpu_count=2))
    assert [c.config.parallel.world_size for c in cpu.cells] == [2, 4]
    assert all(c.config.run.kind == "collectives" and c.config.collectives.max_bytes == 4 << 20 for c in cpu.cells)
    gpu = load_config(REPO / "configs" / "collectives-gpu.yaml", host=HostLimits(cuda_devices=8))
    assert {c.config.collectives.max_bytes for c in gpu.cells} == {256 << 20}
    assert all(c.config.run.backend == "nccl" and c.config.parallel.world_size == 8 for c in gpu.cells)


def test_link_profile_must_hold_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(REPO / "configs" / "collectives-cpu.yaml"), "--link-profile", str(tmp_path)]) == 2
    assert "no ok collectives cell" in capsys.readouterr().err
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"metrics": {"collectives": {}}, "error": "collectives: 1 wrong element(s)"}))
    assert judged_result(result) == ({"collectives": {}}, "collectives: 1 wrong element(s)")
    result.write_text(json.dumps({"metrics": {"x": 1}}))  # a crash's leftovers carry no verdict
    assert judged_result(result) == (None, None)


# --- real runs: run_bench.py, torchrun, gloo ---------------------------------------------------

def run_bench(tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> tuple[Path, Any]:
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, str(REPO / "run_bench.py"), str(path), "--results-dir", str(tmp / "r")],
                         cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=300,
                         check=False)
    (run_dir,) = (tmp / "r").iterdir()
    return run_dir, out


def records(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["cell"]: r for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A training cell listed first, a collectives cell (floor below anything) after it."""
    config = {"name": "mixed", "base": {**TRAIN, "collectives": {**TINY, "min_busbw_gbps": 0.000001}},
              "include": [{"run.kind": "collectives"}]}
    return run_bench(tmp_path_factory.mktemp("mixed"), config)


def test_collectives_cell_end_to_end(mixed_run: tuple[Path, Any]) -> None:
    run_dir, out = mixed_run
    assert out.returncode == 0, out.stdout + out.stderr
    cell = records(run_dir)["collectives"]
    assert cell["status"] == "ok" and cell["error"] is None
    doc = cell["metrics"]["collectives"]
    assert doc == json.loads((run_dir / "collectives" / "collectives.json").read_text())
    assert tuple(doc["ops"]) == COLLECTIVE_OPS
    assert doc["wrong"] == 0 and doc["group_ranks"] == [[0, 1]] and doc["min_busbw_gbps"] == 0.000001
    rows = doc["ops"]["all_gather"]["rows"]
    assert [r["size_bytes"] for r in rows] == [256, 1024, 4096, 16384] and all(len(r["samples_us"]) == 2 for r in rows)  # one per rank
    for op in doc["ops"].values():
        assert op["avg_busbw_gbps"] == pytest.approx(sum(r["busbw_gbps"] for r in op["rows"]) / len(op["rows"]))
    # the runner's copy of the table (collectives cells run first) and rank 0's log agree with the JSON
    assert out.stdout.index("[1/2] collectives") < out.stdout.index("[2/2] training")
    assert_table_matches_json(out.stdout.split("[2/2]")[0], doc)
    assert_table_matches_json((run_dir / "logs" / "collectives" / "rank0.log").read_text(), doc)


def test_training_cell_gets_its_roofline(mixed_run: tuple[Path, Any]) -> None:
    run_dir, _ = mixed_run
    train = records(run_dir)["training"]
    roof = train["metrics"]["roofline"]
    counted = train["metrics"]["comm"]["counted_per_step"]
    assert {(e["group"], e["kind"]) for e in roof["per_group"]} == {(g, k) for g, ks in counted.items() for k in ks}
    assert roof["complete"] and all(e["match"] == "same groups" for e in roof["per_group"])
    assert all(e["profile"] == f"{run_dir.name}/collectives" for e in roof["per_group"])
    for e in roof["per_group"]:
        assert e["message_bytes"] == e["bytes"] / e["calls"] and e["roofline_s"] == e["time_per_call_s"] * e["calls"]
    for kind, k in roof["by_kind"].items():
        assert k["measured_s"] == train["metrics"]["comm_time_s"][kind]
        assert k["ratio"] == pytest.approx(k["measured_s"] / k["roofline_s"])
    assert math.isfinite(roof["ratio"]) and roof["roofline_s"] > 0


def test_corrupted_buffer_and_floor_fail_the_cell(tmp_path: Path) -> None:
    """World 4, weight groups of 2 (two groups at once): the last rank corrupts one element per
    result; the floor is out of reach. The record keeps the table; run_bench exits 1."""
    config = {"name": "bad", "base": {
        "parallel": {"world_size": 4, "sp": 2, "wp": 2}, "run": {"kind": "collectives", "timeout_s": 120},
        "collectives": {**TINY, "max_bytes": "1K", "min_busbw_gbps": 1000.0}}}
    run_dir, out = run_bench(tmp_path, config, {CORRUPT_ENV: "base"})
    assert out.returncode == 1, out.stdout + out.stderr
    record = records(run_dir)["base"]
    doc = record["metrics"]["collectives"]
    rows = [r for op in doc["ops"].values() for r in op["rows"]]
    assert record["status"] == "failed" and doc["group_ranks"] == [[0, 1], [2, 3]]
    assert all(r["wrong"] == 1 for r in rows) and doc["wrong"] == len(rows)  # exactly the flipped element
    reason = record["error"]["reason"]
    assert reason.startswith(f"collectives: {len(rows)} wrong element(s) (all_gather at 256 B: 1;")
    assert "is below min_busbw_gbps 1000" in reason and reason in out.stdout
    assert len(rows) == 8 and "Out of bounds values : 8 FAILED" in out.stdout
    assert "min_busbw_gbps       : 1000 FAILED" in out.stdout
