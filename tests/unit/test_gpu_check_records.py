"""gpu_check's record checks on CPU: good records pass, and records broken in each way the
checks exist for fail with the right row and reason (bench/gpu_check/record_checks.py).

A good record is assembled by the real assemble_metrics from a Measurement; the CUDA-only parts
(NVML summaries, max_memory_allocated, a memory snapshot, kernel traces) are written in the
shapes the worker writes them (the snapshot in the shape torch.cuda.memory._snapshot documents;
the NCCL trace is HolisticTraceAnalysis' real one in tests/fixtures/hta)."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.config.cell import CellConfig
from bench.config.schema import DataConfig, ModelConfig, ParallelConfig
from bench.gpu_check import record_checks as rc
from bench.gpu_check.device import no_gpu_decision
from bench.gpu_check.rows import FAIL, NA, OK, Check, document, summary_line
from bench.gpu_check.sweeps import TRAINING, cell_runs, checks_for, main_checks, rows_for
from bench.metrics.assemble import assemble_metrics
from bench.metrics.measurement import Measurement, RankMeasurement
from bench.results.records import SCHEMA_VERSION, append_record

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hta"
GiB = 1 << 30
FLASH = "void flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, 0, 0, bfloat16_t>, 0, 1, 0, 0>(Flash_fwd_params)"
SDPA_FLASH = "void pytorch_flash::flash_fwd_kernel<pytorch_flash::Flash_fwd_kernel_traits<64, 128>>(Flash_fwd_params)"


def snapshot(resident: int, activations: list[int], steps: int = 3) -> dict[str, Any]:
    """Allocator state and trace as torch.cuda.memory._snapshot() gives them: `resident` bytes
    allocated before recording began (not in the trace), then per step every activation
    allocated and freed again (requested sizes, as the allocator's trace records them)."""
    events, addr = [], 1 << 20
    for _ in range(steps):
        for i, size in enumerate(activations):
            events.append({"action": "alloc", "addr": addr + i * (64 << 20), "size": size, "stream": 0, "frames": []})
        for i, size in reversed(list(enumerate(activations))):
            events.append({"action": "free_requested", "addr": addr + i * (64 << 20), "size": size, "stream": 0})
            events.append({"action": "free_completed", "addr": addr + i * (64 << 20), "size": size, "stream": 0})
    blocks = [{"address": 0, "size": resident, "requested_size": resident, "state": "active_allocated", "frames": []},
              {"address": resident, "size": 1 << 30, "requested_size": 0, "state": "inactive", "frames": []}]
    segment = {"device": 0, "address": 0, "total_size": resident + (1 << 30), "allocated_size": resident,
               "active_size": resident, "stream": 0, "segment_type": "large", "blocks": blocks}
    return {"segments": [segment], "device_traces": [events]}


def nvml_rank(energy_j: float = 900.0, power_w: float = 450.0, window_s: float = 2.0,
              source: str = "counter") -> dict[str, Any]:
    return {"available": True, "interval_ms": 50.0, "window_s": window_s, "num_samples": 41,
            "power_mean_w": power_w, "power_max_w": power_w * 1.1, "energy_j": energy_j, "energy_source": source,
            "energy_per_step_j": energy_j / 12, "energy_per_token_j": energy_j / 12 / 256,
            "unsupported": {} if source == "counter" else {"energy_mj": "Not Supported"}}


def write_trace(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": [{"ph": "X", "cat": "kernel", "name": n, "ts": i, "dur": 1}
                                   for i, n in enumerate(names)]}, f)


def good_main(run_dir: Path) -> rc.CellRun:
    """The main cell as a healthy GPU would record it."""
    config = CellConfig(model=ModelConfig(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, mlp_hidden=128),
                        data=DataConfig(seq_len=64, global_batch=2, micro_num=2),
                        parallel=ParallelConfig(world_size=1, sp=1, wp=1))
    peak = 4 * GiB + 100 * (1 << 20)
    rank = RankMeasurement([5.1, 5.0, 4.9], {}, {"peak_allocated_bytes": peak + 3 * (1 << 20),
                                                 "peak_reserved_bytes": 6 * GiB, "alloc_retries": 0},
                           nvml=nvml_rank(), profile={"traces": ["traces/base/rank0.json.gz"], "active_steps": 2,
                                                       "memory_snapshot": "traces/base/rank0_memory.pickle"})
    attention = {"backend": "flash", "reason": "flash-attn 2.7.4 (auto)", "flash_attn_version": "2.7.4"}
    m = Measurement([0.2, 0.21, 0.2], 3, [rank], loss_reference=[5.1, 5.0, 4.9], attention=attention)
    metrics = assemble_metrics(config, m, torch.device("cpu"))
    metrics["traces"] = rank.profile["traces"]  # assembled beside the trace figures, which need a real trace
    metrics["nvml"] = {"available": True, "per_rank": [rank.nvml]}
    write_trace(run_dir / "traces" / "base" / "rank0.json.gz", [FLASH, "sm90_xmma_gemm_bf16bf16", FLASH])
    with open(run_dir / "traces" / "base" / "rank0_memory.pickle", "wb") as f:
        pickle.dump(snapshot(4 * GiB, [1 << 20] * 100), f)
    record = {"cell": "base", "status": "ok", "config": config.to_dict(), "metrics": metrics, "error": None}
    return rc.CellRun("base", record, run_dir, "", "run_bench.py configs/gpu-check-main.yaml")


def altered(c: rc.CellRun, **metrics: Any) -> rc.CellRun:
    record = json.loads(json.dumps(c.record))
    record["metrics"].update(metrics)
    return rc.CellRun(c.cell, record, c.run_dir, c.output_tail, c.command)


def rows(c: rc.CellRun, gemm: float, limit_w: float = 700.0) -> dict[str, Check]:
    return {r.name: r for r in rows_for(c, main_checks(gemm, limit_w))}


@pytest.fixture
def main_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> rc.CellRun:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # paths in the record are the run folder's, not the cwd's
    return good_main(tmp_path / "run")


def test_a_good_main_cell_passes_every_check(main_cell: rc.CellRun) -> None:
    gemm = 2 * main_cell.metrics["tflops_per_rank"]  # the cell at half the GEMM rate
    got = rows(main_cell, gemm)
    assert {name: r.status for name, r in got.items()} == {name: OK for name in got}, got
    assert len(got) == 1 + len(main_checks(gemm, 700.0))
    # 3 steps of 100 activations over 4 GiB resident; the record's peak 3 MiB above it (block rounding)
    assert "300 alloc events, replayed peak 4.10 GiB vs max_memory_allocated 4.10 GiB (0.1%)" in \
        got["snapshot events = max_memory_allocated"].detail
    assert "2 flash-attn, 0 PyTorch SDPA-flash of 3 kernels" in got["trace holds flash-attn kernels"].detail


def test_tflops_outside_the_gemm_bounds(main_cell: rc.CellRun) -> None:
    t = main_cell.metrics["tflops_per_rank"]
    slow = rows(main_cell, gemm=t / 0.1)["TFLOP/s per rank within GEMM bounds"]
    assert slow.status == FAIL and "allowed" in slow.detail and "0.2 x GEMM" in slow.detail
    assert "outside the kernels" in slow.fix
    fast = rows(main_cell, gemm=0.9 * t)["TFLOP/s per rank within GEMM bounds"]
    assert fast.status == FAIL and "faster than a plain GEMM" in fast.fix
    none = rows(main_cell, gemm=None)["TFLOP/s per rank within GEMM bounds"]  # type: ignore[arg-type]
    assert none.status == FAIL and "no GEMM rate" in none.detail


def test_energy_not_from_the_counter_or_disagreeing_with_power(main_cell: rc.CellRun) -> None:
    gemm = 2 * main_cell.metrics["tflops_per_rank"]
    integral = altered(main_cell, nvml={"available": True, "per_rank": [nvml_rank(source="power_integral")]})
    row = rows(integral, gemm)["energy from the NVML counter"]
    assert row.status == FAIL and "(0, 'power_integral', 'Not Supported')" in row.detail

    off = altered(main_cell, nvml={"available": True, "per_rank": [nvml_rank(energy_j=1400.0)]})
    row = rows(off, gemm)["energy = mean power x time"]
    assert row.status == FAIL and "1400.0 J vs 450 W x 2.00 s = 900.0 J (56%)" in row.detail

    idle = altered(main_cell, nvml={"available": True, "per_rank": [nvml_rank(energy_j=80.0, power_w=40.0)]})
    got = rows(idle, gemm)
    assert got["energy = mean power x time"].status == OK
    assert got["power plausible under load"].status == FAIL
    assert "mean power 40 W; allowed 140..770 W (0.2..1.1 x the 700 W power limit)" in got["power plausible under load"].detail
    assert "fixed band" in rows(idle, gemm, limit_w=None)["power plausible under load"].detail  # type: ignore[arg-type]

    refused = altered(main_cell, nvml={"available": True, "per_rank": [{**nvml_rank(), "power_mean_w": "unsupported"}]})
    assert rows(refused, gemm)["energy = mean power x time"].status == FAIL

    gone = altered(main_cell, nvml={"available": False, "reason": "NVML Shared Library Not Found"})
    got = rows(gone, gemm)
    assert got["NVML sampled the steps"].status == FAIL and got["NVML sampled the steps"].detail == \
        "NVML Shared Library Not Found"
    assert {got[n].status for n in ("energy from the NVML counter", "energy = mean power x time",
                                    "power plausible under load")} == {NA}


def test_sdpa_instead_of_flash(main_cell: rc.CellRun) -> None:
    gemm = 2 * main_cell.metrics["tflops_per_rank"]
    sdpa = altered(main_cell, attention={"backend": "sdpa", "reason": "requested (run.attention: sdpa)",
                                         "flash_attn_version": "2.7.4"})
    row = rows(sdpa, gemm)["attention is flash"]
    assert row.status == FAIL and row.detail == "sdpa (requested (run.attention: sdpa)); flash-attn 2.7.4"
    assert rows(sdpa, gemm)["trace holds flash-attn kernels"].status == NA

    write_trace(main_cell.run_dir / "traces" / "base" / "rank0.json.gz", [SDPA_FLASH, SDPA_FLASH])
    row = rows(main_cell, gemm)["trace holds flash-attn kernels"]  # says flash, ran PyTorch's own
    assert row.status == FAIL and "0 flash-attn, 2 PyTorch SDPA-flash of 2 kernels" in row.detail

    missing = altered(main_cell, attention={"backend": "sdpa", "reason": "flash-attn is not installed",
                                            "flash_attn_version": None})
    assert rows(missing, gemm)["attention is flash"].status == NA
    broken = altered(main_cell, attention={"backend": "sdpa", "flash_attn_version": None, "reason":
                                           "flash-attn is installed but failed to import: ImportError: undefined symbol"})
    row = rows(broken, gemm)["attention is flash"]
    assert row.status == FAIL and row.priority == 0 and "undefined symbol" in row.detail


def test_snapshot_missing_unreadable_or_disagreeing(main_cell: rc.CellRun) -> None:
    gemm = 2 * main_cell.metrics["tflops_per_rank"]
    name = "snapshot events = max_memory_allocated"
    row = rows(altered(main_cell, memory_snapshots=None), gemm)[name]
    assert row.status == FAIL and "names no memory snapshot" in row.detail
    row = rows(altered(main_cell, memory_snapshots=["traces/base/gone.pickle"]), gemm)[name]
    assert row.status == FAIL and "FileNotFoundError" in row.detail and "gone.pickle" in row.detail
    bigger = [{**main_cell.metrics["memory_per_rank"][0], "peak_allocated_bytes": 6 * GiB}]
    row = rows(altered(main_cell, memory_per_rank=bigger), gemm)[name]
    assert row.status == FAIL and "replayed peak 4.10 GiB vs max_memory_allocated 6.00 GiB (31.7%)" in row.detail
    with open(main_cell.run_dir / "traces" / "base" / "rank0_memory.pickle", "wb") as f:
        pickle.dump(snapshot(4 * GiB + 100 * (1 << 20), [], steps=0), f)  # right end state, no events
    row = rows(main_cell, gemm)[name]
    assert row.status == FAIL and "0 alloc events" in row.detail


def test_a_failed_cell_shows_its_reason_whole_and_where_to_look(tmp_path: Path) -> None:
    reason = "rank 0 exited with code 1: torch.OutOfMemoryError: CUDA out of memory. " + "x" * 600 + " END"
    record = {"cell": "mp1-ck0", "status": "failed", "config": {"run": {"kind": "training"}}, "metrics": None,
              "error": {"reason": reason, "exit_code": 1, "rank": 0, "log_file": "logs/mp1-ck0/rank0.log"}}
    c = rc.CellRun("mp1-ck0", record, tmp_path, "", "run_bench.py configs/gpu-check-variants.yaml")
    out = rows_for(c, checks_for(c, []))
    assert out[0].status == FAIL and reason in out[0].detail
    assert f"rank log {tmp_path / 'logs/mp1-ck0/rank0.log'}; run folder {tmp_path}" in out[0].detail
    (rest,) = out[1:]  # one row for the checks not made, naming them
    assert rest.status == NA and all(name in rest.detail for name, _, _ in TRAINING)

    coll = {**record, "config": {"run": {"kind": "collectives"}, "parallel": {"world_size": 2}},
            "error": {"reason": "all_gather: 12 wrong elements", "log_file": "logs/c/rank1.log"}}
    c = rc.CellRun("coll", coll, tmp_path, "", "")
    out = rows_for(c, checks_for(c, []))
    assert "all_gather: 12 wrong elements" in out[0].detail and "collectives correct" in out[1].detail


def test_loss_off_its_reference_bytes_off_the_formula(main_cell: rc.CellRun) -> None:
    gemm = 2 * main_cell.metrics["tflops_per_rank"]
    off = altered(main_cell, loss_matches_reference=False, loss_max_rel_diff=0.02, loss_reference=[5.2, 5.1, 5.0])
    row = rows(off, gemm)["loss = reference"]
    assert row.status == FAIL and "2.0e-02 over 3 steps (tolerance 0.0001); cell [5.1, 5.0, 4.9] vs reference" in row.detail
    record = json.loads(json.dumps(main_cell.record))
    del record["metrics"]["loss_matches_reference"]
    record["metrics"]["loss_check_skipped"] = "the one-process reference ran out of device memory: CUDA out of memory"
    row = rows(rc.CellRun("base", record, main_cell.run_dir), gemm)["loss = reference"]
    assert row.status == FAIL and row.detail == ("no reference ran: the one-process reference ran out of device "
                                                 "memory: CUDA out of memory")
    comm = {**main_cell.metrics["comm"], "matches_prediction": False,
            "mismatches": ["weight/all_gather: counted 12 calls, predicted 8"]}
    row = rows(altered(main_cell, comm=comm), gemm)["counted bytes = formula"]
    assert row.status == FAIL and "weight/all_gather: counted 12 calls, predicted 8" in row.detail


def test_one_broken_check_is_one_row(main_cell: rc.CellRun) -> None:
    record = json.loads(json.dumps(main_cell.record))
    del record["metrics"]["comm"]
    got = rows(rc.CellRun("base", record, main_cell.run_dir), 2 * main_cell.metrics["tflops_per_rank"])
    assert got["counted bytes = formula"].status == FAIL and "KeyError: 'comm'" in got["counted bytes = formula"].detail
    assert sum(r.status == FAIL for r in got.values()) == 1


def test_pair_cells_need_nccl_kernels_and_correct_collectives(tmp_path: Path) -> None:
    trace = tmp_path / "traces" / "isp" / "rank0.json.gz"
    trace.parent.mkdir(parents=True)
    shutil.copy(FIXTURES / "nccl_allreduce_2ranks.json.gz", trace)
    record = {"status": "ok", "config": {"run": {"kind": "training"}, "parallel": {"world_size": 2}},
              "metrics": {"traces": ["traces/isp/rank0.json.gz"]}}
    c = rc.CellRun("isp", record, tmp_path)
    assert [n for n, _, _ in checks_for(c, [])][-1] == "trace holds NCCL kernels"
    row = rc.nccl_kernels_traced(c)
    assert row.status == OK and row.detail.split()[0] != "0"
    write_trace(trace, [FLASH])
    assert rc.nccl_kernels_traced(c).status == FAIL
    coll = {"collectives": {"ops": {"all_gather": {"rows": [{"wrong": 0, "busbw_gbps": 90.0}] * 3},
                                    "all_to_all": {"rows": [{"wrong": 0, "busbw_gbps": 80.0}, {"wrong": 7, "busbw_gbps": 1.0}]}}}}
    row = rc.collectives_correct(rc.CellRun("c", {"status": "ok", "metrics": coll}, tmp_path))
    assert row.status == FAIL and "{'all_gather': 0, 'all_to_all': 7}" in row.detail


def test_cell_runs_reads_the_run_folder_and_names_cells_without_records(tmp_path: Path) -> None:
    run_dir = tmp_path / "variants" / "20260101-000000_gpu-check-variants"
    run_dir.mkdir(parents=True)
    (run_dir / "cells.json").write_text(json.dumps([{"cell": "a"}, {"cell": "b"}]))
    append_record(run_dir / "results.jsonl", {"schema_version": SCHEMA_VERSION, "cell": "a", "status": "ok",
                                              "metrics": {}})
    a, b = cell_runs(tmp_path / "variants", "(exit 1) ...", "python3 run_bench.py X")
    assert a.record is not None and a.run_dir == run_dir and b.record is None
    row = rc.runs(b)
    assert row.status == FAIL and "the runner's output ends: (exit 1) ..." in row.detail and "--filter '^b$'" in row.fix
    (nothing,) = cell_runs(tmp_path / "none", "(exit 2) bad.yaml: base.x: unknown key", "cmd")
    assert rc.runs(nothing).status == FAIL and "unknown key" in rc.runs(nothing).detail


def test_fix_first_and_the_json_document() -> None:
    rows_ = [Check("bfloat16 GEMM 8192^3", FAIL, "300 TFLOP/s", "", 4, "the GPU runs below half its datasheet"),
             Check("runs", FAIL, "failed: OOM", "main", 1, "read logs/base/rank0.log"),
             Check("loss = reference", NA, "the cell did not run", "main", 2),
             Check("flash-attn runs", OK, "flash-attn 2.7.4", "", 0)]
    assert summary_line(rows_, 123.4) == "fix first: main: runs: read logs/base/rank0.log (1 ok, 2 failed, 1 n/a in 123 s)"
    assert summary_line(rows_[3:], 1.0) == "nothing to fix: 1 ok, 0 failed, 0 n/a in 1 s"
    doc = document("NVIDIA H200", {"matmul_tflops": {"bfloat16": 700.0}, "attention_tflops": {"bfloat16": 300.0}},
                   rows_, 123.4)
    assert doc["schema"] == "isp-bench-gpu-check/1" and doc["elapsed_s"] == 123.4
    assert [c["ok"] for c in doc["checks"]] == [False, False, None, True]
    assert doc["checks"][1] == {"name": "main: runs", "ok": False, "detail": "failed: OOM"}


def test_no_visible_gpu_decision() -> None:
    assert no_gpu_decision("12.4", "2.13.0+cu124", 1, None, None) is None
    code, line = no_gpu_decision(None, "2.13.0+cpu", 0, None, None)  # type: ignore[misc]
    assert code == 0 and line.startswith("bench.gpu_check: nothing was checked: torch 2.13.0+cpu is a CPU build")
    code, line = no_gpu_decision("12.4", "2.13.0+cu124", 0,  # type: ignore[misc]
                                 "RuntimeError: Found no NVIDIA driver on your system.", "")
    assert code == 1 and "built for CUDA 12.4 but sees no GPU: RuntimeError: Found no NVIDIA driver" in line
    assert "CUDA_VISIBLE_DEVICES ''" in line
