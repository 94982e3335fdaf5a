"""The prepare stage on the embedded digits source (fast) and small npz files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dpsynth.config import Config, DataConfig, SourceConfig
from dpsynth.errors import InputError
from dpsynth.io.shards import read_dataset
from dpsynth.stages import prepare
from dpsynth.tracking import NullTracker

ROLES = ("public", "private", "test")


# The splits carved from one pool (as configs/smoke.yaml): the default experiment's
# public split has a source of its own (printed digits).
CARVED = {"public": 0.25, "private": 0.55, "test": 0.20}


def carved(seed: int = 0, **data: Any) -> Config:
    """A config whose public and test splits are carved from the private pool."""
    return Config(seed=seed, data=DataConfig(**({"public": None, "fractions": CARVED} | data)))


def run(tmp_path: Path, name: str, cfg: Config) -> tuple[prepare.PrepareResult, NullTracker]:
    tracker = NullTracker()
    return prepare.run(cfg, out_dir=tmp_path / name, tracker=tracker), tracker


def row_hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(row.tobytes()).hexdigest() for row in images}


def assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists()
    assert not any(".tmp-" in p.name for p in out_dir.parent.iterdir())


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three default (digits) runs: seed 0 twice, seed 1 once."""
    tmp = tmp_path_factory.mktemp("prepare")
    return {"a": run(tmp, "a", carved(seed=0)), "b": run(tmp, "b", carved(seed=0)),
            "c": run(tmp, "c", carved(seed=1)), "dir": tmp}


def test_digits_splits_verify_and_partition(digits_runs: dict) -> None:
    result, _ = digits_runs["a"]
    data = {role: read_dataset(result.out_dir / role) for role in ROLES}
    assert sum(len(data[r][0]) for r in ROLES) == 1797
    for role in ROLES:
        images, labels, manifest = data[role]
        assert manifest == getattr(result, role)
        assert manifest.role == role  # what the stages that refuse the private split read
        assert images.shape[1:] == (8, 8, 1) and manifest.classes == tuple("0123456789")
        assert set(labels) == set(range(10))  # stratified: every class in every split
        share = len(labels) / 1797
        assert abs(share - CARVED[role]) < 0.01, role
    hashes = [row_hashes(data[r][0]) for r in ROLES]  # the 1797 digits are all distinct
    assert sum(map(len, hashes)) == 1797 and len(set.union(*hashes)) == 1797


def test_same_seed_same_bytes_other_seed_other_split(digits_runs: dict) -> None:
    def shas(result: prepare.PrepareResult) -> list[str]:
        return [s.sha256 for r in ROLES for s in getattr(result, r).shards]

    assert shas(digits_runs["a"][0]) == shas(digits_runs["b"][0])
    assert shas(digits_runs["a"][0]) != shas(digits_runs["c"][0])
    assert digits_runs["a"][0].private.source.endswith("private (stratified, seed 0)")


def test_metrics_and_tracker_hold_no_private_count(digits_runs: dict) -> None:
    result, tracker = digits_runs["a"]
    private_count = result.private.count
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    # public and test are carved out of the private pool: their sizes would reveal
    # the private size (count / fraction), so none is published
    assert metrics == {"image_shape": [8, 8, 1], "num_classes": 10}
    logged = {k: v for m, _ in tracker.metrics for k, v in m.items()}
    assert logged == {"num_classes": 10}
    assert private_count not in logged.values() and private_count not in metrics.values()
    assert tracker.params["seed"] == 0 and tracker.params["data.private.kind"] == "digits"
    assert not any("count" in k for k in tracker.params)
    assert not tracker.artifacts  # never images


def test_empty_split_from_fractions(tmp_path: Path) -> None:
    cfg = carved(fractions={"public": 0.0, "private": 0.8, "test": 0.2})
    with pytest.raises(InputError, match=r"public split is empty: data.fractions.public=0.0 .*"
                                         r"give data.public a source"):
        run(tmp_path, "out", cfg)
    assert_nothing_written(tmp_path / "out")


def write_npz(path: Path, labels: list[int], classes: list[str]) -> SourceConfig:
    images = (np.arange(len(labels))[:, None, None] * np.ones((1, 4, 4))).astype(np.uint8)
    np.savez(path, images=images, labels=np.array(labels), classes=np.array(classes))
    return SourceConfig(kind="npz", path=str(path))


def test_class_absent_from_private(tmp_path: Path) -> None:
    source = write_npz(tmp_path / "d.npz", [0, 1] * 10, ["a", "b", "c"])
    with pytest.raises(InputError, match="class 'c' has no examples in the private split"):
        run(tmp_path, "out", carved(private=source))
    assert_nothing_written(tmp_path / "out")
    # One example of "b": it goes to the role with the largest share, here public.
    source = write_npz(tmp_path / "e.npz", [0] * 10 + [1], ["a", "b"])
    cfg = carved(private=source, fractions={"public": 0.6, "private": 0.2, "test": 0.2})
    with pytest.raises(InputError, match="class 'b' has no examples in the private split"):
        run(tmp_path, "out", cfg)
    assert_nothing_written(tmp_path / "out")


def test_test_source_must_share_private_classes(tmp_path: Path) -> None:
    test = write_npz(tmp_path / "t.npz", [0, 1], ["x", "y"])
    cfg = carved(test=test, image_size=4)
    with pytest.raises(InputError, match=r"data.test: classes \['x', 'y'\] differ"):
        run(tmp_path, "out", cfg)
    assert_nothing_written(tmp_path / "out")


def test_supplied_test_source_and_renormalised_pool(tmp_path: Path) -> None:
    test = write_npz(tmp_path / "t.npz", list(range(10)), [str(d) for d in range(10)])
    result, _ = run(tmp_path, "out", carved(test=test))
    assert result.test.count == 10 and result.test.source == f"npz:{tmp_path / 't.npz'}[all]"
    # a test set from its own source may publish its size; the carved public split may not
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert metrics["test_count"] == 10 and "public_count" not in metrics
    assert result.public.count + result.private.count == 1797  # the whole pool: public+private
    assert abs(result.public.count / 1797 - 0.25 / 0.80) < 0.01


def test_failure_keeps_the_previous_output(tmp_path: Path) -> None:
    first, _ = run(tmp_path, "out", carved())
    bad = carved(private=SourceConfig(kind="npz", path=str(tmp_path / "no")))
    with pytest.raises(InputError, match="no: not found"):
        run(tmp_path, "out", bad)
    _, _, manifest = read_dataset(tmp_path / "out" / "private")
    assert manifest == first.private
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())
