"""Class-per-folder PNG/JPEG trees."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from raw_formats import write_imagefolder
from PIL import Image

from dpsynth.config import Config, DataConfig, SourceConfig
from dpsynth.data.imagefolder import ImageFolderSource
from dpsynth.errors import InputError
from dpsynth.stages import prepare
from dpsynth.tracking import NullTracker


def spec(path: Path) -> SourceConfig:
    return SourceConfig(kind="imagefolder", path=str(path))


def test_png_and_jpeg_classes_sorted(imagefolder_dir: Path) -> None:
    (imagefolder_dir / "cat" / "notes.txt").write_text("ignored")
    (imagefolder_dir / ".cache").mkdir()  # hidden folders are not classes
    subsets = ImageFolderSource().load(spec(imagefolder_dir))
    data = subsets["all"]
    assert list(subsets) == ["all"] and data.classes == ("cat", "dog")
    assert data.images.shape == (6, 10, 10, 3)
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(data.images[:3, 4, 4, 0], [0, 10, 20])  # PNG: lossless
    assert np.abs(data.images[3:].astype(int) - 200).max() <= 2  # JPEG: near 200


def test_train_test_layout(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "r" / "train", per_class=2)
    write_imagefolder(tmp_path / "r" / "test", per_class=1, size=(6, 6))
    subsets = ImageFolderSource().load(spec(tmp_path / "r"))
    assert set(subsets) == {"train", "test"}
    assert subsets["train"].images.shape == (4, 10, 10, 3)
    assert subsets["test"].images.shape == (2, 6, 6, 3)
    assert subsets["test"].source == f"imagefolder:{tmp_path / 'r'}[test]"


def test_train_test_with_different_classes(tmp_path: Path,
                                           prepare_fails: Callable[..., InputError]) -> None:
    write_imagefolder(tmp_path / "r" / "train")
    write_imagefolder(tmp_path / "r" / "test")
    shutil.rmtree(tmp_path / "r" / "test" / "dog")
    (tmp_path / "r" / "test" / "cow").mkdir()
    prepare_fails(spec(tmp_path / "r"), match=r"train/ has classes \['cat', 'dog'\] but test/ "
                                              r"has \['cat', 'cow'\]")


def test_grey_images_give_one_channel(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "g" / name).mkdir(parents=True)
        Image.fromarray(np.full((5, 5), 9, np.uint8)).save(tmp_path / "g" / name / "x.png")
    data = ImageFolderSource().load(spec(tmp_path / "g"))["all"]
    assert data.images.shape == (2, 5, 5, 1) and data.images.max() == 9


def test_empty_class_folder(imagefolder_dir: Path,
                            prepare_fails: Callable[..., InputError]) -> None:
    (imagefolder_dir / "emu").mkdir()
    (imagefolder_dir / "emu" / "readme.txt").write_text("no images")
    prepare_fails(spec(imagefolder_dir), match="emu: class folder has no .png/.jpg/.jpeg images")


def test_differing_sizes(imagefolder_dir: Path,
                         prepare_fails: Callable[..., InputError]) -> None:
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(imagefolder_dir / "dog" / "d1.jpg")
    prepare_fails(spec(imagefolder_dir), match=r"dog/d1.jpg: image is 10x12 .*/cat/c0.png is "
                                               r"10x10; all images of one source must share")


def test_no_class_folders_and_not_a_folder(tmp_path: Path,
                                           prepare_fails: Callable[..., InputError]) -> None:
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    prepare_fails(spec(tmp_path / "flat"), match="flat: no class folders")
    prepare_fails(spec(tmp_path / "flat" / "a.png"), match="must be a folder of class folders")


def test_prepare_resizes_and_converts(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "r", per_class=10, size=(16, 16))
    cfg = Config(data=DataConfig(private=spec(root), public=None, image_size=4, channels=1,
                                 fractions={"public": 0.25, "private": 0.55, "test": 0.2}))
    result = prepare.run(cfg, out_dir=tmp_path / "out", tracker=NullTracker())
    assert result.private.shape == (4, 4, 1) and result.private.classes == ("cat", "dog")
    assert result.public.count + result.private.count + result.test.count == 20
