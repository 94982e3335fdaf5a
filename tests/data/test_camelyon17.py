"""Camelyon17 patches in the WILDS layout."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from raw_formats import camelyon_rows, write_camelyon17

from dpsynth.config import Config, DataConfig, SourceConfig
from dpsynth.data.camelyon17 import CLASSES, Camelyon17Source, patch_path
from dpsynth.errors import InputError
from dpsynth.io.shards import read_dataset
from dpsynth.stages import prepare
from dpsynth.tracking import NullTracker


def spec(path: Path, hospitals: tuple[int, ...] | None = None) -> SourceConfig:
    return SourceConfig(kind="camelyon17", path=str(path), hospitals=hospitals)


def test_wilds_split_by_hospital(camelyon_dir: Path) -> None:
    subsets = Camelyon17Source().load(spec(camelyon_dir))
    assert set(subsets) == {"train", "test"}
    train, test = subsets["train"], subsets["test"]
    assert train.classes == CLASSES == ("normal", "tumor")
    assert train.images.shape == (12, 12, 12, 3) and test.images.shape == (4, 12, 12, 3)
    # Patches are filled with (center * 40, tumor * 200, patient): centers 0-2 / 4.
    assert set(train.images[:, 0, 0, 0]) == {0, 40, 80} and set(test.images[:, 0, 0, 0]) == {160}
    np.testing.assert_array_equal(train.images[:, 5, 5, 1], train.labels * 200)
    np.testing.assert_array_equal(test.labels, [0, 1, 0, 1])


def test_hospitals_select_centers(camelyon_dir: Path) -> None:
    subsets = Camelyon17Source().load(spec(camelyon_dir, hospitals=(3, 1)))
    assert list(subsets) == ["all"]
    assert set(subsets["all"].images[:, 0, 0, 0]) == {40, 120}
    assert subsets["all"].source == f"camelyon17:{camelyon_dir}[hospitals 1,3]"


def test_patch_path_is_the_wilds_name(tmp_path: Path) -> None:
    assert patch_path(tmp_path, 4, 1, 3328, 21792) == (
        tmp_path / "patches/patient_004_node_1/patch_patient_004_node_1_x_3328_y_21792.png")


def test_missing_metadata_and_column(tmp_path: Path,
                                     prepare_fails: Callable[..., InputError]) -> None:
    prepare_fails(spec(tmp_path), match="metadata.csv: not found")
    root = write_camelyon17(tmp_path / "c", columns=("patient", "node", "x_coord", "y_coord",
                                                     "slide", "center", "split"))
    prepare_fails(spec(root), match=r"metadata.csv: missing column\(s\) \['tumor'\]")


def test_missing_patch_and_bad_values(tmp_path: Path, camelyon_dir: Path,
                                      prepare_fails: Callable[..., InputError]) -> None:
    gone = patch_path(camelyon_dir, 2, 1, 101, 201)
    gone.unlink()
    prepare_fails(spec(camelyon_dir), match=f"{gone.name}: patch listed in metadata.csv is "
                                            "missing")
    rows = camelyon_rows()
    rows[3]["tumor"] = 2
    prepare_fails(spec(write_camelyon17(tmp_path / "t", rows)),
                  match="line 5: column 'tumor' is 2, expected 0 or 1")
    rows = camelyon_rows()
    rows[0]["tumor"] = 0.5  # type: ignore[assignment]
    prepare_fails(spec(write_camelyon17(tmp_path / "x", rows)),
                  match="line 2: column 'tumor' is '0.5', expected an integer")


def test_absent_hospital_and_absent_wilds_test_center(
        tmp_path: Path, camelyon_dir: Path, prepare_fails: Callable[..., InputError]) -> None:
    prepare_fails(spec(camelyon_dir, hospitals=(0, 7)), match=r"hospital\(s\) \[7\]")
    rows = [r for r in camelyon_rows() if r["center"] != 4]
    prepare_fails(spec(write_camelyon17(tmp_path / "no4", rows)),
                  match="no patches for the WILDS test hospitals")


def test_corrupt_patch(camelyon_dir: Path, prepare_fails: Callable[..., InputError]) -> None:
    patch_path(camelyon_dir, 0, 1, 101, 200).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    prepare_fails(spec(camelyon_dir), match="patch_patient_000_node_1_x_101_y_200.png: not a "
                                            "readable PNG/JPEG image")


def test_prepare_with_hospital_test_set(camelyon_dir: Path, tmp_path: Path) -> None:
    cfg = Config(data=DataConfig(private=spec(camelyon_dir, hospitals=(0, 1, 2)), public=None,
                                 test=spec(camelyon_dir, hospitals=(4,)), image_size=8,
                                 channels=3, fractions={"public": 0.25, "private": 0.75,
                                                        "test": 0.0}))  # public: carved
    result = prepare.run(cfg, out_dir=tmp_path / "out", tracker=NullTracker())
    assert result.test.count == 4 and result.public.count + result.private.count == 12
    images, labels, _ = read_dataset(tmp_path / "out" / "test")
    assert images.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(images[:, 3, 3, 1], labels * 200)  # constant patches survive
