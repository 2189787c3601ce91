"""--run-name: a run folder named by the caller (a Slurm job's id), refused once it holds a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import main as cli
from bench.sweep.runner import RunRefused, named_run_dir


def test_named_folder_created_reused_when_empty_refused_when_it_holds_a_run(tmp_path: Path) -> None:
    path = named_run_dir(tmp_path / "results", "nightly-42")
    assert path == tmp_path / "results" / "nightly-42" and path.is_dir()
    assert named_run_dir(tmp_path / "results", "nightly-42") == path  # a start cut short before prepare()
    (path / "cells.json").write_text("[]")
    with pytest.raises(RunRefused, match=f"already holds a run; continue it with --resume {path}"):
        named_run_dir(tmp_path / "results", "nightly-42")
    for bad in ("", "a/b", ".hidden", ".."):
        with pytest.raises(RunRefused, match="expected a folder name"):
            named_run_dir(tmp_path, bad)


def test_run_name_with_resume_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--resume", str(tmp_path), "--run-name", "x"]) == 2
    assert "--run-name: names a new run folder" in capsys.readouterr().err
