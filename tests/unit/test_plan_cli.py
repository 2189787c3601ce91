"""`plan` from the command line: it plans any world size and rejects bad hardware files clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.cli.plan import main

ROOT = Path(__file__).resolve().parents[2]
H100 = ROOT / "configs" / "hardware" / "h100-sxm-8.yaml"


def _bad_hardware(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(H100.read_text())
    edit(doc)
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("edit,key,allowed", [
    (lambda d: d["device"].pop("memory_gib"), "device.memory_gib", "a number"),
    (lambda d: d["links"]["intra"].update(busbw_gbps="fast"), "links.intra.busbw_gbps", "a number"),
    (lambda d: d["compute"]["efficiency"].update(matmul=1.5), "compute.efficiency.matmul", "<= 1"),
    (lambda d: d["device"].update(memroy=3), "device.memroy", "allowed keys"),
    (lambda d: d["compute"]["peak_tflops"].update(int8=1), "compute.peak_tflops.int8", "bfloat16"),
])
def test_bad_hardware_file_exits_2_naming_file_and_key(tmp_path, capsys, edit, key, allowed):
    path = _bad_hardware(tmp_path, edit)
    assert main(["--hardware", str(path), "--no-peers"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and key in err and allowed in err


def test_missing_hardware_file_exits_2(tmp_path, capsys):
    assert main(["--hardware", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_plans_the_default_sweep_with_its_peers_ranked(capsys):
    assert main(["--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cells = out["ranking"]
    assert {c["strategy"] for c in cells} == {"isp", "fsdp2", "ddp", "ulysses"}
    fitting = [c["tokens_per_s"] for c in cells if c["fits"]]
    assert fitting == sorted(fitting, reverse=True)
    isp = next(c for c in cells if c["cell"] == "ov1-mp1-ck0-ws2")
    assert isp["comm"]["weight"]["all_gather"]["calls"] > 0 and isp["memory_bytes"]["activations"] > 0


def test_plans_a_7b_model_on_1024_gpus_and_marks_what_does_not_fit(capsys):
    sets = ["model.hidden=4096", "model.layers=32", "model.heads=32", "model.kv_heads=8", "model.vocab=92544",
            "model.mlp_hidden=14336", "model.checkpoint=1.0", "data.seq_len=32768", "data.global_batch=256",
            "data.micro_num=1", "parallel.sp=8", "parallel.wp=64", "run.dtype=bfloat16", "run.device=cuda",
            "run.backend=nccl"]
    args = ["--world", "1024", "--no-peers", "--format", "json", "--hardware", str(H100)]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    cells = json.loads(capsys.readouterr().out)["ranking"]
    assert cells and all(c["world_size"] == 1024 for c in cells)
    assert all(c["comm"]["weight"]["all_gather"]["link"].startswith("inter") for c in cells)  # wp=64 spans 8 nodes
    assert all(c["comm"]["sequence"]["all_to_all"]["link"] == "intra link" for c in cells)  # sp=8 stays in a node
    assert all(0 < c["mfu"] < 1 for c in cells)
    # Same model without recompute at 256K tokens per sequence on 8 ranks: far beyond 80 GB.
    too_big = ["--set", "data.seq_len=262144", "--set", "model.checkpoint=0.0", "--set", "data.global_batch=128"]
    assert main(args + [a for s in sets for a in ("--set", s)] + too_big) == 0
    assert not any(c["fits"] for c in json.loads(capsys.readouterr().out)["ranking"])


def test_plan_starts_no_process_and_never_asks_for_devices(monkeypatch, capsys):
    import subprocess

    import torch

    def forbidden(*_a, **_k):
        raise AssertionError("plan must not probe devices or start processes")

    for target, name in ((torch.cuda, "is_available"), (torch.cuda, "device_count"),
                         (torch.cuda, "get_device_name"), (subprocess, "Popen")):
        monkeypatch.setattr(target, name, forbidden)
    args = ["--world", "64", "--no-peers", "--format", "json", "--set", "run.device=cuda", "--set", "run.backend=nccl",
            "--set", "run.dtype=bfloat16", "--set", "data.global_batch=64", "--set", "parallel.sp=8",
            "--set", "parallel.wp=8", "--set", "model.heads=8", "--set", "model.kv_heads=4"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["ranking"]


def test_shipped_hardware_files_and_plan_configs_load():
    from bench.config.matrix import load_config
    from bench.plan.hardware import load_hardware

    for path in sorted((ROOT / "configs" / "hardware").glob("*.yaml")):
        hw = load_hardware(path)
        assert hw.gpus_per_node == 8 and hw.inter is not None and hw.peak("bfloat16") > 0
    assert len(load_config(ROOT / "configs" / "layouts-cpu.yaml", host=None).cells) == 6
    assert len(load_config(ROOT / "configs" / "plan-7b-256k.yaml", host=None).cells) == 8
