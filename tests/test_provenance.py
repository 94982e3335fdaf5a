"""Every stage folder records what made it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import dpsynth
from dpsynth import provenance


def test_run_info_files(tmp_path: Path) -> None:
    provenance.write_run_info(tmp_path, "pretrain", {"seed": 3, "pretrain": {"steps": 5}})
    assert json.loads((tmp_path / "params.json").read_text()) == {
        "seed": 3, "pretrain": {"steps": 5}}
    version = json.loads((tmp_path / "version.json").read_text())
    assert version["stage"] == "pretrain" and version["dpsynth"] == dpsynth.__version__


def test_git_commit_marks_dirty_trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert provenance.git_commit() is None  # not a repository
    run = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f").write_text("1")
    run("add", "f")
    run("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    clean = provenance.git_commit()
    assert clean is not None and len(clean) == 40
    (tmp_path / "f").write_text("2")
    assert provenance.git_commit() == clean + "-dirty"
