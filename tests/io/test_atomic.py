"""Atomic outputs: a target is either the old complete folder or the new complete one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dpsynth.io.atomic import atomic_dir, atomic_write_bytes, atomic_write_json


class Boom(Exception):
    pass


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_publishes_on_success(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out"  # parents are created
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())  # starts empty
        assert tmp.parent == target.parent  # same filesystem: the rename is atomic
        assert tmp != target and not target.exists()  # nothing visible while building
        (tmp / "x.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "y.txt").write_text("deep")
    assert (target / "x.txt").read_text() == "new"
    assert (target / "sub" / "y.txt").read_text() == "deep"
    assert siblings(target) == ["out"]  # no temp or old folder left


def test_replaces_an_existing_target_entirely(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    (target / "x.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert (target / "x.txt").read_text() == "old"  # old output intact meanwhile
        (tmp / "x.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["x.txt"]  # stale file gone
    assert (target / "x.txt").read_text() == "new"
    assert siblings(target) == ["out"]


def test_exception_leaves_old_target_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "x.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "x.txt").write_text("half")
            raise Boom
    assert (target / "x.txt").read_text() == "old"
    assert siblings(target) == ["out"]


def test_exception_without_old_target_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # BaseException too (Ctrl-C mid-stage)
        with atomic_dir(target) as tmp:
            (tmp / "x.txt").write_text("half")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_temp_folders_are_unique(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as a, atomic_dir(target) as b:
        assert a != b
        (a / "who").write_text("a")
        (b / "who").write_text("b")
    # the outer context exits last, so its output wins
    assert (target / "who").read_text() == "a"
    assert siblings(target) == ["out"]


def test_atomic_write_json_round_trips_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.json"
    atomic_write_json(path, {"b": 1, "a": [1.5, None, "x"]})
    text = path.read_text()
    assert json.loads(text) == {"b": 1, "a": [1.5, None, "x"]}
    assert text.endswith("\n") and text.index('"b"') < text.index('"a"')  # key order kept
    atomic_write_json(path, {"c": 2})
    assert json.loads(path.read_text()) == {"c": 2}
    assert siblings(path) == ["m.json"]


def test_atomic_write_json_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not JSON-able
    assert json.loads(path.read_text()) == {"ok": True}
    assert siblings(path) == ["m.json"]


def test_atomic_write_bytes_cleans_up_when_rename_fails(tmp_path: Path) -> None:
    path = tmp_path / "dir-in-the-way"
    path.mkdir()
    (path / "f").write_text("x")
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"data")  # cannot replace a non-empty folder by a file
    assert siblings(path) == ["dir-in-the-way"]


def test_atomic_write_bytes_exact(tmp_path: Path) -> None:
    data = bytes(range(256)) * 3
    atomic_write_bytes(tmp_path / "b.bin", data)
    assert (tmp_path / "b.bin").read_bytes() == data


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # gone (a reuse within this test is vanishingly unlikely)


def test_a_killed_writers_leftovers_go_with_the_next_publish(tmp_path: Path) -> None:
    """A SIGKILL runs no cleanup: its temp/old folders stay until the next successful
    publish of the same target, which removes those whose writer process is gone,
    and leaves a live writer's, another host's and unrelated folders alone."""
    from dpsynth.io import atomic

    target = tmp_path / "out"
    host, dead, live = atomic._HOST, _dead_pid(), os.getppid()
    killed = [tmp_path / f".out.tmp-0123abcd-{dead}-{host}",
              tmp_path / f".out.old-0123abcd-{dead}-{host}"]
    kept = [tmp_path / f".out.tmp-4567abcd-{live}-{host}",  # a writer still running
            tmp_path / f".out.tmp-89abcdef-{dead}-{'0' * 8}",  # another machine's
            tmp_path / ".other.tmp-0123abcd-1-x"]
    for folder in killed + kept:
        folder.mkdir()
        (folder / "half.bin").write_bytes(b"half")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"
    assert not any(p.exists() for p in killed)
    assert all(p.exists() for p in kept)
