"""Single-file `.npz` datasets and dpsynth shard folders."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from dpsynth.config import SourceConfig
from dpsynth.data.npz import NpzSource
from dpsynth.errors import InputError
from dpsynth.io.shards import write_dataset


def spec(path: Path) -> SourceConfig:
    return SourceConfig(kind="npz", path=str(path))


def test_nhwc_with_classes(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([2, 0, 1], np.int32),
             classes=np.array(["x", "y", "z"]))
    data = NpzSource().load(spec(tmp_path / "d.npz"))["all"]
    np.testing.assert_array_equal(data.images, images)
    assert data.labels.dtype == np.int64 and data.classes == ("x", "y", "z")
    assert data.source == f"npz:{tmp_path / 'd.npz'}[all]"


def test_nhw_without_classes(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.ones((4, 5, 6), np.uint8),
             labels=np.array([[0], [3], [1], [1]]))
    data = NpzSource().load(spec(tmp_path / "d.npz"))["all"]
    assert data.images.shape == (4, 5, 6, 1) and data.classes == ("0", "1", "2", "3")
    np.testing.assert_array_equal(data.labels, [0, 3, 1, 1])


def test_shard_folder(tmp_path: Path) -> None:
    images = np.full((5, 3, 3, 1), 7, np.uint8)
    write_dataset(tmp_path / "shards", images, np.arange(5) % 2, ("a", "b"), "t", shard_size=2)
    data = NpzSource().load(spec(tmp_path / "shards"))["all"]
    np.testing.assert_array_equal(data.images, images)
    assert data.classes == ("a", "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: folder has no manifest.json"):
        NpzSource().load(spec(tmp_path / "empty"))


GOOD_IMAGES = np.zeros((2, 4, 4, 3), np.uint8)


@pytest.mark.parametrize("arrays, match", [
    ({"images": GOOD_IMAGES.astype(np.float32), "labels": [0, 1]},
     r"field 'images': dtype float32, expected uint8"),
    ({"images": np.full((2, 4, 4), np.nan), "labels": [0, 1]}, "field 'images': contains NaN"),
    ({"images": np.zeros((2, 4, 4, 2), np.uint8), "labels": [0, 1]},
     r"field 'images': shape \(2, 4, 4, 2\), expected \(N, H, W, C\)"),
    ({"images": GOOD_IMAGES, "labels": [0, 3], "classes": np.array(["a", "b"])},
     r"field 'labels': labels must be in \[0, 2\), found \[0, 3\]"),
    ({"images": GOOD_IMAGES, "labels": [-1, 0]}, r"field 'labels': labels must be in"),
    ({"images": GOOD_IMAGES, "labels": [0.0, np.nan]},
     "field 'labels' has dtype float64 with NaN"),
    ({"images": GOOD_IMAGES, "labels": [0, 1, 1]}, "2 images but 3 labels"),
    ({"images": GOOD_IMAGES}, r"no \['labels'\] array"),
    ({"images": GOOD_IMAGES, "labels": [0, 1], "classes": np.array([1, 2])},
     "field 'classes' has dtype int64"),
    ({"images": GOOD_IMAGES, "labels": np.array([0, None], dtype=object)},
     "not a readable .npz without pickled objects"),
])
def test_bad_arrays(tmp_path: Path, arrays: dict[str, object], match: str,
                    prepare_fails: Callable[..., InputError]) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    prepare_fails(spec(tmp_path / "bad.npz"), match=f"bad.npz: {match}")


def test_corrupt_and_missing_file(tmp_path: Path,
                                  prepare_fails: Callable[..., InputError]) -> None:
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 truncated zip")
    prepare_fails(spec(tmp_path / "c.npz"), match="c.npz: not a readable .npz")
    prepare_fails(spec(tmp_path / "gone.npz"), match=r"data.private \(npz\): .*gone.npz: not "
                                                     "found")
