"""`dpsynth.stages.common`: run fingerprints, work folders, metrics files."""

from __future__ import annotations

import json
from pathlib import Path

from dpsynth.stages.common import fingerprint, work_dir_for, write_metrics


def test_fingerprint_is_pinned() -> None:
    # Pinned: a change here orphans every checkpoint and finished shard users have.
    assert fingerprint({"b": [1, 2], "a": 1}, "x") == "afebeff1c159d044"


def test_fingerprint_ignores_dict_key_order() -> None:
    assert fingerprint({"a": 1, "b": {"c": 2, "d": 3}}) == fingerprint({"b": {"d": 3, "c": 2},
                                                                        "a": 1})


def test_fingerprint_is_sensitive_to_content_and_order() -> None:
    base = fingerprint({"a": 1}, "x")
    variants = [
        fingerprint({"a": 2}, "x"),       # a value
        fingerprint({"a": "1"}, "x"),     # a type
        fingerprint({"a": 1.0}, "x"),     # int vs float (a config edit, a new run)
        fingerprint({"b": 1}, "x"),       # a key
        fingerprint("x", {"a": 1}),       # the order of the parts
        fingerprint({"a": 1}, "x", "y"),  # an extra part
        fingerprint({"a": 1}),            # a missing part
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert fingerprint([1, 2]) != fingerprint([2, 1])  # list order is content


def test_fingerprint_format_and_stability() -> None:
    fp = fingerprint({"a": 1}, Path("/data/x"))  # non-JSON values go through str()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == fingerprint({"a": 1}, "/data/x")
    assert fingerprint((1, 2)) == fingerprint([1, 2])  # tuples and lists serialize alike


def test_work_dir_for_is_a_sibling_of_the_output(tmp_path: Path) -> None:
    assert work_dir_for(tmp_path / "artifacts" / "pretrain") == (
        tmp_path / "artifacts" / ".work" / "pretrain")
    assert work_dir_for("artifacts/sample") == Path("artifacts/.work/sample")
    assert work_dir_for("artifacts/sample/") == Path("artifacts/.work/sample")
    # outside the output folder, so replacing the output never deletes resumable state
    out = tmp_path / "artifacts" / "sample"
    assert out not in work_dir_for(out).parents
    # distinct per stage
    assert work_dir_for(tmp_path / "a") != work_dir_for(tmp_path / "b")


def test_work_dir_for_an_s3_output_is_a_sibling_prefix() -> None:
    # work.publish mirrors it, so a stage retried on another machine resumes
    assert work_dir_for("s3://bucket/runs/7/finetune") == "s3://bucket/runs/7/.work/finetune"
    assert work_dir_for("s3://bucket/sample/") == "s3://bucket/.work/sample"


def test_write_metrics(tmp_path: Path) -> None:
    write_metrics(tmp_path / "new", {"fid": 12.5, "steps": 3, "rate": None})
    assert json.loads((tmp_path / "new" / "metrics.json").read_text()) == {
        "fid": 12.5, "steps": 3, "rate": None}
    write_metrics(tmp_path / "new", {"fid": 1.0})  # replaces, does not merge
    assert json.loads((tmp_path / "new" / "metrics.json").read_text()) == {"fid": 1.0}
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["metrics.json"]
