"""Downsampled-ImageNet npz batches."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from raw_formats import write_imagenet32

from dpsynth.config import Config, DataConfig, SourceConfig
from dpsynth.data.imagenet32 import ImageNet32Source
from dpsynth.errors import InputError
from dpsynth.io.shards import read_dataset
from dpsynth.stages import prepare
from dpsynth.tracking import NullTracker


def spec(path: Path) -> SourceConfig:
    return SourceConfig(kind="imagenet32", path=str(path))


def test_reads_train_batches_and_val(imagenet32_dir: Path) -> None:
    subsets = ImageNet32Source().load(spec(imagenet32_dir))
    train, test = subsets["train"], subsets["test"]
    assert train.images.shape == (12, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert len(train.classes) == 1000 and train.classes[999] == "999"
    np.testing.assert_array_equal(test.labels, [0, 999, 499, 1])  # 1-based on disk
    with np.load(imagenet32_dir / "val_data.npz") as z:
        row = z["data"][2]
    np.testing.assert_array_equal(test.images[2, 0, 1], row[[1, 1025, 2049]])
    with np.load(imagenet32_dir / "train_data_batch_2.npz") as z:
        np.testing.assert_array_equal(train.labels[6:], z["labels"] - 1)


def test_other_resolutions_read_the_same_way(tmp_path: Path) -> None:
    subsets = ImageNet32Source().load(spec(write_imagenet32(tmp_path / "in64", side=64)))
    assert subsets["train"].images.shape == (12, 64, 64, 3)


def test_missing_folder_and_missing_batch(tmp_path: Path, imagenet32_dir: Path,
                                          prepare_fails: Callable[..., InputError]) -> None:
    prepare_fails(spec(tmp_path / "nowhere"), match="nowhere: not found", role="public")
    prepare_fails(spec(tmp_path), match=r"no train_data_batch_\*.npz or val_data.npz",
                  role="public")
    (imagenet32_dir / "train_data_batch_3.npz").write_bytes(
        (imagenet32_dir / "train_data_batch_2.npz").read_bytes())
    (imagenet32_dir / "train_data_batch_1.npz").unlink()
    prepare_fails(spec(imagenet32_dir), match="train_data_batch_1.npz is missing", role="public")


@pytest.mark.parametrize("arrays, match", [
    ({"data": np.zeros((2, 3072), np.uint8), "labels": np.array([0, 5])},
     r"field 'labels': labels must be in \[1, 1001\), found \[0, 5\]"),
    ({"data": np.zeros((2, 3072), np.float32), "labels": np.array([1, 5])},
     r"field 'data'.*dtype float32"),
    ({"data": np.zeros((2, 3072), np.uint8)}, r"no \['labels'\] array"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": np.array([1, 2, 3])},
     "2 images but 3 labels"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": np.array([1, None], dtype=object)},
     "corrupt, truncated or pickled npz.*allow_pickle"),
])
def test_bad_val_file(imagenet32_dir: Path, arrays: dict[str, np.ndarray], match: str,
                      prepare_fails: Callable[..., InputError]) -> None:
    np.savez(imagenet32_dir / "val_data.npz", **arrays)
    prepare_fails(spec(imagenet32_dir), match=f"val_data.npz: {match}", role="public")


def test_truncated_batch(imagenet32_dir: Path, prepare_fails: Callable[..., InputError]) -> None:
    path = imagenet32_dir / "train_data_batch_2.npz"
    path.write_bytes(path.read_bytes()[:500])
    prepare_fails(spec(imagenet32_dir), match="train_data_batch_2.npz: corrupt, truncated",
                  role="public")


def test_public_imagenet32_for_private_cifar10(imagenet32_dir: Path, cifar_tarball: Path,
                                               tmp_path: Path) -> None:
    cfg = Config(data=DataConfig(private=SourceConfig(kind="cifar10", path=str(cifar_tarball)),
                                 public=spec(imagenet32_dir), image_size=32, channels=3))
    result = prepare.run(cfg, out_dir=tmp_path / "out", tracker=NullTracker())
    assert len(result.public.classes) == 1000 and result.public.count == 12
    assert result.private.classes[0] == "airplane" and result.test.count == 10
    images, _, _ = read_dataset(tmp_path / "out" / "public")
    np.testing.assert_array_equal(images, ImageNet32Source().load(spec(imagenet32_dir))
                                  ["train"].images)  # 32x32x3 already: unchanged
