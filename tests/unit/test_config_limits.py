"""Hostile sweep files (bench/config/limits.py): each refused with one line naming the file, the
key and the limit, before anything expands or prints the value. Times are not asserted here
(the commands answer in well under a second: docs/config.md has the times measured)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.cli.main import main
from bench.config.limits import MAX_CELLS, MAX_NAME, MAX_VALUES
from bench.config.matrix import load_config
from bench.config.schema import ConfigError


def alias_bomb(levels: int = 9, fan: int = 9, key: str = "hidden") -> str:
    """`levels` anchors, each a list of `fan` aliases of the one before: fan^levels strings."""
    lines = ["name: bomb", "base:", "  model:", "    l0: &l0 [" + ", ".join(["lol"] * fan) + "]"]
    for level in range(1, levels - 1):
        lines.append(f"    l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * fan) + "]")
    lines.append(f"    {key}: [" + ", ".join([f"*l{levels - 2}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def refused(path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The stderr lines of `run_bench.py PATH --dry-run ARGS`, which must exit 2."""
    assert main([str(path), "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


def test_alias_bomb_is_measured_before_anything_prints_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    (line,) = refused(bomb, capsys=capsys)
    assert line.startswith(f"{bomb}: base.model.hidden: expands to ")
    assert line.endswith(f"allowed: at most {MAX_VALUES:,} values") and len(line) < 300
    expanded = int(line.split("expands to ")[1].split()[0].replace(",", ""))
    assert expanded > 9 ** 9  # every string of the 9 x 9 bomb, and the lists holding them

    selfish = tmp_path / "selfish.yaml"
    selfish.write_text("name: loop\nbase: &b {model: {hidden: *b}}\n")
    (line,) = refused(selfish, capsys=capsys)
    assert line.startswith(f"{selfish}: ") and "contains itself" in line

    deep = tmp_path / "deep.yaml"
    deep.write_text("name: deep\nbase: " + "[" * 200 + "]" * 200 + "\n")
    (line,) = refused(deep, capsys=capsys)
    assert "nested more than 32 levels deep; allowed: at most 32" in line


def test_alias_bomb_in_a_set_value(capsys: pytest.CaptureFixture[str]) -> None:
    value = "[" + ", ".join(["x"] * 9) + "]"
    for level in range(8):  # each level a list of nine of the one before: one anchor, eight aliases
        value = f"[&l{level} {value}, " + ", ".join([f"*l{level}"] * 8) + "]"
    assert main(["--dry-run", "--set", f"matrix.model.layers={value}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("bench/default.yaml: --set matrix.model.layers: expands to ") and len(line) < 300


def test_matrix_bound_checked_before_expansion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    huge = tmp_path / "huge.yaml"
    huge.write_text(yaml.safe_dump({"name": "huge", "matrix": {"data.seed": list(range(1000)),
                                                                "model.layers": list(range(1, 121)),
                                                                "data.micro_num": list(range(1, 13))}}, sort_keys=False))
    (line,) = refused(huge, capsys=capsys)
    assert line == (f"{huge}: matrix: 1,440,000 cells (1000 x 120 x 12 values before exclude); allowed: at most "
                    f"{MAX_CELLS:,} cells (raise the bound with run_bench.py --max-cells N)")

    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"name": "small", "matrix": {"data.seed": [0, 1, 2, 3], "model.layers": [1, 2]},
                                     "include": [{"data.seed": 9}]}))
    (line,) = refused(small, "--max-cells", "8", capsys=capsys)
    assert "9 cells (4 x 2 values before exclude plus 1 include entries); allowed: at most 8 cells" in line
    assert main([str(small), "--dry-run", "--max-cells", "9"]) == 0
    assert "9 cell(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(small), "--dry-run", "--max-cells", "0"])
    assert "expected an int >= 1" in capsys.readouterr().err
    assert len(load_config(small, max_cells=9).cells) == 9


def test_name_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = tmp_path / "long.yaml"
    long.write_text("name: " + "a" * (10 << 20) + "\n")
    (line,) = refused(long, capsys=capsys)
    assert line == (f"{long}: name: 10,485,760 characters; allowed: at most {MAX_NAME} (it names the results "
                    "folder, whose name the file system caps at 255 bytes)")
    with pytest.raises(ConfigError) as exc:
        load_config(long, ["name=" + "b" * (MAX_NAME + 1)])
    assert exc.value.messages == [f"{long}: name: {MAX_NAME + 1:,} characters; allowed: at most {MAX_NAME} (it "
                                  "names the results folder, whose name the file system caps at 255 bytes)"]
    assert load_config(long, ["name=" + "b" * MAX_NAME]).name == "b" * MAX_NAME


def test_long_bad_values_are_shown_clipped(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "base": {"run": {"attention": "x" * 1_000_000}}}))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    (line,) = exc.value.messages
    assert line.startswith(f"{path}: base.run.attention: str 'xxx") and "(1,000,002 characters)" in line
    assert len(line) < 300 and line.endswith("allowed: 'auto', 'flash', 'sdpa'")


def test_every_command_refuses_before_importing_torch_or_scipy(tmp_path: Path) -> None:
    """`CONFIG`, `plan CONFIG` and `nightly CONFIG` answer a hostile file before the imports that
    take seconds (torch about 2 s, scipy.stats about 0.8 s here; docs/config.md has the times)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    probe = ("import sys\nfrom bench.cli.main import main\ncode = main(sys.argv[1:])\n"
             "print(code, sorted(m for m in ('torch', 'scipy.stats') if m in sys.modules))\n")
    repo = Path(__file__).resolve().parents[2]
    for command in ([str(bomb)], ["plan", str(bomb)], ["nightly", str(bomb), "--db", str(tmp_path / "h.sqlite")]):
        out = subprocess.run([sys.executable, "-c", probe, *command], cwd=repo, capture_output=True, text=True,
                             timeout=120)
        assert out.stdout.split("\n")[-2] == "2 []", (command, out.stdout, out.stderr)
        assert "expands to" in out.stderr and "Traceback" not in out.stderr
