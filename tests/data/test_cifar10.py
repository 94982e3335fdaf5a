"""CIFAR-10 from the official python tarball, read with a restricted unpickler."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from raw_formats import CIFAR_CLASSES, cifar_images, cifar_members, py2_pickle, write_tarball

from dpsynth.config import Config, DataConfig, SourceConfig
from dpsynth.data.cifar10 import Cifar10Source, unpickle_batch
from dpsynth.errors import InputError
from dpsynth.io.shards import read_dataset
from dpsynth.stages import prepare
from dpsynth.tracking import NullTracker


def spec(path: Path) -> SourceConfig:
    return SourceConfig(kind="cifar10", path=str(path))


def test_reads_the_tarball(cifar_tarball: Path) -> None:
    subsets = Cifar10Source().load(spec(cifar_tarball))
    assert set(subsets) == {"train", "test"}
    train, test = subsets["train"], subsets["test"]
    assert train.images.shape == (10, 32, 32, 3) and test.images.shape == (10, 32, 32, 3)
    assert train.classes == tuple(CIFAR_CLASSES)
    np.testing.assert_array_equal(train.labels, np.arange(10))
    # Rows are CHW: pixel (0, 0) of image 0 is (row[0], row[1024], row[2048]).
    rows, _ = cifar_images(2, offset=0)
    np.testing.assert_array_equal(train.images[0, 0, 0], rows[0, [0, 1024, 2048]])
    np.testing.assert_array_equal(train.images[1, 31, 31], rows[1, [1023, 2047, 3071]])
    assert train.source == f"cifar10:{cifar_tarball}[train]"


def test_reads_the_extracted_folder_or_its_parent(cifar_tarball: Path, tmp_path: Path) -> None:
    with tarfile.open(cifar_tarball) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    from_tar = Cifar10Source().load(spec(cifar_tarball))
    for path in (tmp_path / "x", tmp_path / "x" / "cifar-10-batches-py"):
        from_dir = Cifar10Source().load(spec(path))
        np.testing.assert_array_equal(from_dir["test"].images, from_tar["test"].images)
        np.testing.assert_array_equal(from_dir["train"].labels, from_tar["train"].labels)


def test_missing_file(tmp_path: Path, prepare_fails: Callable[..., InputError]) -> None:
    prepare_fails(spec(tmp_path / "cifar-10-python.tar.gz"),
                  match=r"data.private \(cifar10\): .*cifar-10-python.tar.gz: not found")


def test_truncated_archive(cifar_tarball: Path, prepare_fails: Callable[..., InputError]) -> None:
    data = cifar_tarball.read_bytes()
    cifar_tarball.write_bytes(data[:len(data) // 2])
    prepare_fails(spec(cifar_tarball), match="corrupt or truncated archive.*re-download")


def test_archive_missing_test_batch(tmp_path: Path,
                                    prepare_fails: Callable[..., InputError]) -> None:
    members = cifar_members()
    del members["test_batch"]
    path = write_tarball(tmp_path / "cifar-10-python.tar.gz", members)
    prepare_fails(spec(path), match=r"no member\(s\) \['cifar-10-batches-py/test_batch'\]")


class _RunsACommand:
    """Unpickling this runs a shell command (the attack a pickle allows)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_forbidden_global_is_refused(tmp_path: Path,
                                     prepare_fails: Callable[..., InputError]) -> None:
    marker = tmp_path / "pwned"
    evil = _RunsACommand(marker)
    members = cifar_members()
    members["data_batch_3"] = pickle.dumps({b"data": evil, b"labels": []}, protocol=4)
    path = write_tarball(tmp_path / "cifar-10-python.tar.gz", members)
    err = prepare_fails(spec(path), match=r"data_batch_3: the pickle references "
                                          r"(posix|nt|os)\.system.*refusing")
    assert "re-download" in str(err).lower()
    assert not marker.exists()


def test_unpickler_allows_only_array_globals() -> None:
    batch = unpickle_batch(py2_pickle({b"data": np.arange(3, dtype=np.uint8)}), "b")
    np.testing.assert_array_equal(batch[b"data"], [0, 1, 2])
    with pytest.raises(InputError, match="builtins.eval"):
        unpickle_batch(pickle.dumps({b"f": eval}, protocol=4), "b")
    with pytest.raises(InputError, match="b: holds a list, expected a dict"):
        unpickle_batch(py2_pickle([1, 2]), "b")
    with pytest.raises(InputError, match="b: not a readable CIFAR-10 pickle"):
        unpickle_batch(b"\x80\x02}q\x00", "b")


def test_wrong_shape_and_labels_out_of_range(tmp_path: Path,
                                             prepare_fails: Callable[..., InputError]) -> None:
    members = cifar_members()
    members["data_batch_2"] = py2_pickle({b"data": np.zeros((2, 100), np.uint8),
                                          b"labels": [0, 1]})
    prepare_fails(spec(write_tarball(tmp_path / "a.tar.gz", members)),
                  match=r"data_batch_2: field 'data'.*100 values")
    members = cifar_members()
    members["test_batch"] = py2_pickle({b"data": np.zeros((2, 3072), np.uint8),
                                        b"labels": [0, 10]})
    prepare_fails(spec(write_tarball(tmp_path / "b.tar.gz", members)),
                  match=r"test_batch: field 'labels'.*\[0, 10\)")


def test_prepare_uses_the_official_test_set(cifar_tarball: Path, tmp_path: Path) -> None:
    cfg = Config(data=DataConfig(private=spec(cifar_tarball), public=SourceConfig(),
                                 image_size=16, channels=3))
    result = prepare.run(cfg, out_dir=tmp_path / "out", tracker=NullTracker())
    test_images, test_labels, test_manifest = read_dataset(tmp_path / "out" / "test")
    assert test_manifest.source == f"cifar10:{cifar_tarball}[test]"
    assert test_images.shape == (10, 16, 16, 3)
    _, private_labels, _ = read_dataset(tmp_path / "out" / "private")
    assert sorted(private_labels) == list(range(10))  # the whole train pool: public is digits
    assert result.public.classes == tuple("0123456789")  # public keeps its own label set
    assert result.public.shape == (16, 16, 3)
