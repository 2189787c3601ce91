"""Config schema, matrix expansion and validation messages; no torchrun here, all fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.config import STRATEGIES, CellConfig, ConfigError, DataConfig, ModelConfig, ParallelConfig, all_keys
from bench.config.checks import HostLimits
from bench.config.matrix import build, load_config

REPO = Path(__file__).resolve().parents[2]
CPU_HOST = HostLimits(cpu_count=2)  # what a 2-core CI runner can do, no GPU, NVML fine
SMALL = {"model": {"hidden": 64, "layers": 1, "heads": 4, "kv_heads": 2, "vocab": 256, "mlp_hidden": 128},
         "data": {"seq_len": 32, "global_batch": 4, "micro_num": 1},
         "parallel": {"world_size": 2, "sp": 2, "wp": 2}}


def doc(**top: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "t", "base": yaml.safe_load(yaml.safe_dump(SMALL))}
    d.update(top)
    return d


def with_base(section: str, **values: Any) -> dict[str, Any]:
    d = doc()
    d["base"].setdefault(section, {}).update(values)
    return d


def errors(d: dict[str, Any], host: HostLimits | None = CPU_HOST, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(d, "t.yaml", "t", host=host, **kw)
    assert all(m.startswith("t.yaml: ") for m in info.value.messages)
    return info.value.messages


def one_error(d: dict[str, Any], *parts: str, host: HostLimits | None = CPU_HOST) -> str:
    msgs = errors(d, host)
    hits = [m for m in msgs if all(p in m for p in parts)]
    assert hits, f"no message with {parts} in {msgs}"
    return hits[0]


# --- expansion -----------------------------------------------------------------------------

def test_matrix_exclude_include_ids_and_order() -> None:
    d = doc(matrix={"parallel.overlap": [False, True], "parallel.memory_pool": [False, True],
                    "model.checkpoint": [0.0, 0.5], "parallel.world_size": [1, 2]},
            exclude=[{"parallel.overlap": False, "parallel.memory_pool": True}],
            include=[{"parallel.overlap": True, "parallel.memory_pool": True, "model.checkpoint": 1.0},
                     {"parallel.overlap": True, "parallel.memory_pool": False, "model.checkpoint": 0.5,
                      "parallel.world_size": 2}])  # this one repeats a product cell: not added
    d["base"]["parallel"].update(sp="world", wp="world")
    bench = build(d, "t.yaml", "t", host=CPU_HOST)
    assert [c.id for c in bench.cells] == [
        "ov0-mp0-ck0-ws1", "ov0-mp0-ck0-ws2", "ov0-mp0-ck0.5-ws1", "ov0-mp0-ck0.5-ws2",
        "ov1-mp0-ck0-ws1", "ov1-mp0-ck0-ws2", "ov1-mp0-ck0.5-ws1", "ov1-mp0-ck0.5-ws2",
        "ov1-mp1-ck0-ws1", "ov1-mp1-ck0-ws2", "ov1-mp1-ck0.5-ws1", "ov1-mp1-ck0.5-ws2",
        "ov1-mp1-ck1-ws2"]
    last = bench.cells[-1]
    assert last.swept == {"parallel.overlap": True, "parallel.memory_pool": True, "model.checkpoint": 1.0,
                          "parallel.world_size": 2}
    assert last.config.parallel.sp == 2 and bench.cells[0].config.parallel.sp == 1  # "world" resolved


def test_include_only_and_no_matrix_ids() -> None:
    assert [c.id for c in build(doc(), "t.yaml", "t").cells] == ["base"]
    d = doc(include=[{"parallel.sp": 1}, {"parallel.strategy": "isp", "data.global_batch": 8}])
    assert [c.id for c in build(d, "t.yaml", "t").cells] == ["sp2-isp-gb4", "sp1-isp-gb4", "sp2-isp-gb8"]


def test_colliding_abbreviations_fall_back_to_key_names() -> None:
    d = doc(matrix={"model.hidden": [64, 128], "model.heads": [4]})
    assert [c.id for c in build(d, "t.yaml", "t").cells] == ["hidden64-heads4", "hidden128-heads4"]
    d = doc(matrix={"profile.enabled": [False], "nvml.enabled": [False, True]})
    ids = [c.id for c in build(d, "t.yaml", "t").cells]
    assert ids == ["profile_enabled0-nvml_enabled0", "profile_enabled0-nvml_enabled1"]


def test_duplicate_ids_fail_loudly() -> None:
    # Values that print alike give one id to two cells: rejected, never a silent overwrite.
    d = doc(include=[{"model.checkpoint": 0.5}, {"model.checkpoint": 0.50000001}])
    assert any("cell ck0.5: two different cells get this id" in m for m in errors(d))
    assert errors(doc(matrix={"model.checkpoint": [0.5, 0.5]})) == [
        "t.yaml: matrix.model.checkpoint[1]: 0.5 is listed twice; each value makes its own cells"]


def test_cell_config_round_trip_and_derived_sizes() -> None:
    cell = build(doc(), "t.yaml", "t").cells[0].config
    assert CellConfig.from_dict(cell.to_dict()) == cell
    assert cell.tokens_per_step == 4 * 32 and cell.dp == 1 and cell.micro_bsz == 4
    assert isinstance(ModelConfig(checkpoint=1).checkpoint, float)
    assert ParallelConfig(world_size=4, sp="world", wp=2).sp == 4  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="model.layers: got bool True"):
        ModelConfig(layers=True)
    with pytest.raises(ConfigError, match="parallel.sp"):
        CellConfig(parallel=ParallelConfig(world_size=4, sp=3, wp=2))
    with pytest.raises(ConfigError, match="did you mean 'seq_len'"):
        CellConfig.from_dict({"data": {"seqlen": 4}})
    assert issubclass(ConfigError, ValueError) and STRATEGIES == ("isp", "fsdp2", "ddp", "ulysses")


# --- validation: one class of mistake each ---------------------------------------------------

@pytest.mark.parametrize("section, values, parts", [
    ("model", {"hiden": 64}, ("base.model.hiden", "did you mean 'hidden'", "allowed keys")),
    ("model", {"layers": True}, ("base.model.layers", "got bool True", "an int >= 1")),
    ("model", {"checkpoint": 1.5}, ("base.model.checkpoint", "out of range", ">= 0 and <= 1")),
    ("model", {"checkpoint": "half"}, ("base.model.checkpoint", "got str 'half'", "a number")),
    ("run", {"device": "tpu"}, ("base.run.device", "'tpu' is not allowed", "'cpu', 'cuda'")),
    ("run", {"dtype": "fp8"}, ("base.run.dtype", "allowed: 'float32', 'bfloat16', 'float16'")),
    ("run", {"timeout_s": 0}, ("base.run.timeout_s", "out of range", "> 0")),
    ("run", {"measure_steps": 0}, ("base.run.measure_steps", ">= 1")),
    ("parallel", {"strategy": "zero"}, ("base.parallel.strategy", "'zero' is not allowed",
                                        "'isp', 'fsdp2', 'ddp', 'ulysses'")),
    ("parallel", {"overlap": 1}, ("base.parallel.overlap", "got int 1", "true or false")),
    ("parallel", {"sp": "all"}, ("base.parallel.sp", "or 'world'")),
    ("parallel", {"wp_unit": "layer"}, ("base.parallel.wp_unit", "'layer' is not allowed", "'module', 'block'")),
    ("parallel", {"head": "vocab"}, ("base.parallel.head", "allowed: 'vocab_parallel', 'gathered'")),
    ("parallel", {"launch_allgather_before": "w2"}, ("base.parallel.launch_allgather_before",
                                                     "'wo', 'wqkv', 'attn', 'w1'")),
    ("parallel", {"strategy": "ulysses", "wp": 1, "head": "gathered"},
     ("base.parallel.head", "with strategy ulysses: only isp has this option", "allowed: 'vocab_parallel'")),
    ("profile", {"ranks": [0, -1]}, ("base.profile.ranks", "'all' or a list of ints")),
    ("nvml", {"enabled": "yes"}, ("base.nvml.enabled", "'auto', true or false")),
])
def test_field_problems_name_path_and_allowed(section: str, values: dict[str, Any], parts: tuple[str, ...]) -> None:
    one_error(with_base(section, **values), *parts)


@pytest.mark.parametrize("section, values, parts", [
    ("parallel", {"world_size": 4, "sp": 3, "wp": 2}, ("base.parallel.sp", "does not divide world_size=4", "1, 2, 4")),
    ("parallel", {"world_size": 4, "sp": 2, "wp": 3}, ("base.parallel.wp", "divisors of world_size (1, 2, 4)")),
    ("model", {"hidden": 66, "heads": 4, "kv_heads": 2}, ("base.model.hidden", "multiples of 4")),
    ("model", {"heads": 4, "kv_heads": 3}, ("base.model.kv_heads", "divisors of heads (1, 2, 4)")),
    ("model", {"hidden": 96, "heads": 3, "kv_heads": 1}, ("base.parallel.sp", "does not divide heads=3", "1, 3")),
    ("data", {"global_batch": 3, "micro_num": 2}, ("base.data.global_batch", "dp*micro_num=1*2", "multiples of 2")),
    ("data", {"packed": False, "seq_len": 33}, ("base.data.seq_len", "seq_len=33", "sp=2")),
    ("model", {"vocab": 255}, ("base.model.vocab", "vocab=255 is not divisible by wp=2")),
    ("model", {"mlp_hidden": 129}, ("base.model.mlp_hidden", "not divisible by wp=2")),
    ("run", {"backend": "nccl"}, ("base.run.backend", "nccl needs run.device: cuda", "'gloo'")),
    ("profile", {"ranks": [0, 5]}, ("base.profile.ranks", "ranks [5] do not exist", "0..1")),
    ("profile", {"memory_snapshot": True}, ("base.profile.memory_snapshot", "allowed on cpu: false")),
])
def test_cross_field_problems(section: str, values: dict[str, Any], parts: tuple[str, ...]) -> None:
    one_error(with_base(section, **values), *parts)


def test_kv_heads_sp_and_qkv_and_packed_rules() -> None:
    d = with_base("model", hidden=96, heads=6, kv_heads=3, vocab=240)
    d["base"]["parallel"].update(world_size=2, sp=2, wp=2)
    d["base"]["model"].update(heads=6)
    one_error(d, "base.parallel.sp", "kv_heads=3: one must divide the other")
    # (heads + 2*kv_heads) * head_dim = (2 + 2) * 4 = 16 rows: not divisible by wp=32.
    d = with_base("model", hidden=8, heads=2, kv_heads=1, vocab=64, mlp_hidden=32)
    d["base"]["parallel"].update(world_size=32, sp=1, wp=32)
    d["base"]["data"].update(global_batch=32)
    one_error(d, "base.model.heads", "fused QKV", "wp=32", host=HostLimits(cpu_count=64))
    # packed: the row is micro_bsz*seq_len = 4*3 = 12 tokens, which sp=2 splits; unpacked 3 does not.
    ok = with_base("data", seq_len=3)
    ok["base"]["model"].update(vocab=256)
    build(ok, "t.yaml", "t", host=CPU_HOST)
    ok["base"]["data"]["packed"] = False
    one_error(ok, "base.data.seq_len", "seq_len=3")


def test_host_problems() -> None:
    gpu = with_base("run", device="cuda", backend="nccl")
    gpu["base"]["parallel"]["world_size"] = 2
    one_error(gpu, "base.parallel.world_size", "needs 2 GPUs", "allowed: <= 1", host=HostLimits(cuda_devices=1))
    one_error(gpu, "base.run.device", "no GPU", host=HostLimits(cuda_devices=0))
    build(gpu, "t.yaml", "t", host=HostLimits(cuda_devices=1, nnodes=2))  # 2 nodes x 1 GPU
    cpu = doc(matrix={"parallel.world_size": [8]})
    one_error(cpu, "cell ws8 (parallel.world_size)", "only measure contention", "<= 4 per node")
    nvml = with_base("nvml", enabled=True)
    one_error(nvml, "base.nvml.enabled", "NVML cannot start here (no driver)", "'auto' or false",
              host=HostLimits(nvml_error="no driver"))
    build(nvml, "t.yaml", "t", host=None)  # --dry-run skips host checks


def test_matrix_include_exclude_baseline_paths() -> None:
    d = doc(matrix={"parallel.sp": [1, 2, True], "parallel.wrld_size": [2], "model.heads": 4},
            include=[{"model.heads": 0}], exclude=[{"model.vocab": 256}, "x"],
            baseline={"parallel.overlap": False}, matrx={})
    msgs = errors(d)
    expect = [("matrix.parallel.sp[2]", "got bool True"),
              ("matrix.parallel.wrld_size", "did you mean 'world_size'"),
              ("matrix.model.heads", "expected a non-empty list"),
              ("include[0].model.heads", "out of range"),
              ("exclude[0].model.vocab", "not a swept key", "parallel.sp"),
              ("exclude[1]", "expected a mapping"),
              ("baseline.parallel.overlap", "not a swept key"),
              ("t.yaml: matrx:", "did you mean 'matrix'")]
    for parts in expect:
        assert any(all(p in m for p in parts) for m in msgs), (parts, msgs)


def test_all_problems_collected_and_cell_messages_deduplicated() -> None:
    d = doc(matrix={"parallel.overlap": [False, True], "parallel.world_size": [3, 4]})
    d["base"]["model"]["hiden"] = 1
    d["baseline"] = {"model.layers": 1}
    msgs = errors(d)
    assert any("base.model.hiden" in m for m in msgs) and any("baseline.model.layers" in m for m in msgs)
    # world_size 3 breaks sp=2 in two cells (ov0-ws3, ov1-ws3): one line naming both.
    sp = [m for m in msgs if "(parallel.sp)" in m and "world_size=3" in m]
    assert sp == ["t.yaml: cells ov0-ws3, ov1-ws3 (parallel.sp): sp=2 does not divide world_size=3; "
                  "allowed: divisors of world_size (1, 3)"]
    assert len(msgs) == len(set(msgs))


def test_canaries_are_named_cells_that_leave_the_other_ids_alone() -> None:
    plain = build(doc(matrix={"parallel.overlap": [False, True]}), "t.yaml", "t")
    probe = {"run.kind": "collectives", "collectives.max_bytes": "64K"}
    with_canaries = build(doc(matrix={"parallel.overlap": [False, True]},
                              canaries={"ws2-busbw": probe, "ws2-same": None}), "t.yaml", "t")
    ids = [c.id for c in with_canaries.cells]
    assert ids == ["ws2-busbw", "ws2-same", *[c.id for c in plain.cells]]  # canaries first, the rest unchanged
    assert with_canaries.swept_keys == plain.swept_keys == ("parallel.overlap",)
    busbw, same = with_canaries.cells[:2]
    assert busbw.config.run.canary and busbw.config.run.kind == "collectives"
    assert busbw.config.collectives.max_bytes == 64 * 1024
    assert same.config.run.canary and same.config.run.kind == "training"
    assert not any(c.config.run.canary for c in with_canaries.cells[2:])
    assert busbw.swept == same.swept == {}  # a canary sweeps nothing: no baseline, no speed-up


def test_canary_problems_name_the_entry() -> None:
    msgs = errors(doc(canaries={"bad id": {}, "c1": {"run.canary": False}, "c2": {"run.kindd": "x"}, "c3": [1]}))
    for parts in [("canaries.bad id", "not a safe cell id"),
                  ("canaries.c1.run.canary", "a cell under canaries is a canary (allowed: true)"),
                  ("canaries.c2.run.kindd", "did you mean 'kind'"),
                  ("canaries.c3", "expected a mapping of dotted keys")]:
        assert any(all(p in m for p in parts) for m in msgs), (parts, msgs)
    assert any("expected a mapping of cell ids" in m for m in errors(doc(canaries=["x"])))
    clash = errors(doc(matrix={"parallel.overlap": [False, True]}, canaries={"ov0": {}}))
    assert "t.yaml: canaries.ov0: a matrix or include cell has this id too; rename the canary" in clash, clash


# --- overrides, filter ----------------------------------------------------------------------

def test_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc(matrix={"parallel.overlap": [False, True], "parallel.world_size": [1, 2]},
                                       include=[{"parallel.world_size": 2, "data.seed": 3}])))
    path.write_text(path.read_text().replace("sp: 2", "sp: world").replace("wp: 2", "wp: world"))
    bench = load_config(path, ["parallel.world_size=1", "data.micro_num=2", "name=renamed"])
    assert bench.name == "renamed" and bench.doc["matrix"]["parallel.world_size"] == [1]
    assert {c.config.parallel.world_size for c in bench.cells} == {1}
    assert {c.config.data.micro_num for c in bench.cells} == {2}
    bench = load_config(path, ["matrix.parallel.world_size=[2]", "matrix.parallel.overlap=[]"])
    assert [c.id for c in bench.cells] == ["ws2-s0", "ws2-s3"]
    with pytest.raises(ConfigError) as info:
        load_config(path, ["parallel.wrld_size=2", "oops", "matrix.model.x=[1]"])
    msgs = info.value.messages
    assert any("--set parallel.wrld_size" in m and "did you mean 'world_size'" in m for m in msgs)
    assert any("--set oops" in m and "key=value" in m for m in msgs)
    assert any("--set matrix.model.x" in m for m in msgs)


def test_filter_regex_substring_and_no_match(tmp_path: Path) -> None:
    d = doc(matrix={"parallel.overlap": [False, True], "model.checkpoint": [0.0, 0.5]})
    assert [c.id for c in build(d, "t.yaml", "t", cell_filter="ov1").cells] == ["ov1-ck0", "ov1-ck0.5"]
    assert [c.id for c in build(d, "t.yaml", "t", cell_filter=r"ck0\.5$").cells] == ["ov0-ck0.5", "ov1-ck0.5"]
    assert any("--filter (: matches no cell" in m for m in errors(d, cell_filter="("))  # no regex: substring
    one = errors(d, cell_filter="ws9")
    assert one == ["t.yaml: --filter ws9: matches no cell; cells: ov0-ck0, ov0-ck0.5, ov1-ck0, ov1-ck0.5"]


# --- shipped configs ------------------------------------------------------------------------

def test_default_config_is_shipped_twice_and_valid() -> None:
    assert (REPO / "bench" / "default.yaml").read_text() == (REPO / "configs" / "cpu-default.yaml").read_text()
    bench = load_config(None, host=CPU_HOST)
    assert bench.name == "cpu-default" and len(bench.cells) == 8
    swept = set(bench.swept_keys)
    assert {"parallel.overlap", "parallel.memory_pool", "model.checkpoint", "parallel.world_size"} <= swept
    assert {c.config.parallel.world_size for c in bench.cells} == {1, 2}
    assert all(c.config.run.device == "cpu" and c.config.run.backend == "gloo" for c in bench.cells)


def test_gpu_configs_valid_on_their_hosts() -> None:
    nightly = load_config(REPO / "configs" / "gpu-nightly-8.yaml", host=HostLimits(cuda_devices=8))
    assert {(c.config.parallel.sp, c.config.parallel.wp) for c in nightly.cells} >= {(8, 8), (8, 1), (4, 8), (2, 8)}
    assert all(c.config.parallel.world_size == 8 and c.config.data.seq_len == 32768 for c in nightly.cells)
    assert [c.id for c in nightly.cells if c.config.run.canary] == ["ws8-collectives"]
    single = load_config(REPO / "configs" / "gpu-single.yaml", host=HostLimits(cuda_devices=1))
    assert all(c.config.parallel.world_size == 1 and c.config.run.backend == "nccl" for c in single.cells)
    with pytest.raises(ConfigError, match="needs 8 GPUs"):
        load_config(REPO / "configs" / "gpu-nightly-8.yaml", host=HostLimits(cuda_devices=4))


def test_every_key_documented() -> None:
    text = (REPO / "docs" / "config.md").read_text()
    missing = [k for k in all_keys() if f"`{k.split('.')[1]}`" not in text]
    assert not missing
    assert DataConfig().packed is True


# --- the command line, as a user runs it ----------------------------------------------------

def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "run_bench.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_config_exit_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    d = doc(matrix={"parallel.world_size": [2, 4]})
    d["base"]["model"]["hiden"] = 64
    d["base"]["parallel"]["sp"] = 4
    bad.write_text(yaml.safe_dump(d))
    out = run_cli(str(bad), "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.splitlines()
    assert f"{bad}: base.model.hiden: unknown key; did you mean 'hidden'?" in lines[0]
    assert any(line.startswith(f"{bad}: cell ws2 (parallel.sp): sp=4 does not divide world_size=2; "
                               "allowed: divisors of world_size (1, 2)") for line in lines)
    assert not (tmp_path / "r").exists()  # nothing ran

    missing = run_cli(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "nope.yaml: cannot read: No such file or directory" in missing.stderr

    garbled = tmp_path / "garbled.yaml"
    garbled.write_text("base: [unclosed\n")
    out = run_cli(str(garbled))
    assert out.returncode == 2 and "not valid YAML" in out.stderr and "Traceback" not in out.stderr


def test_cli_dry_run_filter_and_set(tmp_path: Path) -> None:
    out = run_cli("--dry-run", "--filter", "ov1-mp1", "--set", "matrix.model.checkpoint=[0.0, 0.5]")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["cell", "parallel.overlap", "parallel.memory_pool", "model.checkpoint",
                                    "parallel.world_size"]
    assert [line.split()[0] for line in lines[2:-1]] == ["ov1-mp1-ck0-ws2", "ov1-mp1-ck0.5-ws2"]
    assert "2 cell(s)" in lines[-1]
    bad = run_cli("--dry-run", "--set", "parallel.world_size=true", "--set", "matrix.parallel.sp=[1, 0]")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        "bench/default.yaml: --set parallel.world_size: got bool True; allowed: an int >= 1",
        "bench/default.yaml: --set matrix.parallel.sp: int 0 is out of range; allowed: an int >= 1 or 'world'"]


def test_isp_variants_config_pairs_each_variant_with_ulysses() -> None:
    cfg = load_config(REPO / "configs" / "isp-variants-cpu.yaml")
    cells = {(c.config.parallel.world_size, c.config.parallel.strategy, c.config.parallel.wp_unit,
              c.config.parallel.head) for c in cfg.cells}
    for ws in (2, 4):
        assert (ws, "ulysses", "module", "vocab_parallel") in cells
        assert {(ws, "isp", u, h) for u in ("module", "block") for h in ("vocab_parallel", "gathered")} <= cells
    # a gathered head does not split the vocabulary over sp: only wp must divide it
    ok = build(doc(base={**SMALL, "model": {**SMALL["model"], "vocab": 66},
                         "parallel": {"world_size": 4, "sp": 4, "wp": 2, "head": "gathered"}}), "t.yaml", "t")
    assert ok.cells[0].config.parallel.head == "gathered"
