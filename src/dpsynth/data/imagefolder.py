"""Class-per-folder images: `root/<class>/*.png|jpg|jpeg`.

Class names are the sorted folder names. If `root/train` and `root/test` both
hold class folders, they are the `"train"` and `"test"` subsets (same class
folders in each); otherwise `root` itself is one subset, `"all"`. All images
of a source must share one size: resizing happens later, in `transforms`, to
the configured `data.image_size`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpsynth.config import SourceConfig
from dpsynth.data.sources import LabeledImages, decode_images, local_path
from dpsynth.errors import InputError

EXTENSIONS = (".png", ".jpg", ".jpeg")


def class_folders(root: Path) -> list[Path]:
    """The visible sub-folders of `root`, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in EXTENSIONS)


def read_tree(root: Path, source: str) -> LabeledImages:
    """Decode every image under `root/<class>/`.

    Raises:
        InputError: no class folders, an empty class folder, or unreadable /
            differently sized images.
    """
    folders = class_folders(root)
    if not folders:
        raise InputError(f"{root}: no class folders; expected root/<class>/*.png|jpg|jpeg")
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        found = _image_files(folder)
        if not found:
            raise InputError(f"{folder}: class folder has no .png/.jpg/.jpeg images; add "
                             "images or remove the folder")
        files += found
        labels += [label] * len(found)
    images = decode_images(files, desc=f"imagefolder {root.name}")
    return LabeledImages(images, np.array(labels, np.int64),
                         tuple(f.name for f in folders), source)


class ImageFolderSource:
    """Reads a class-per-folder image tree."""

    def load(self, spec: SourceConfig) -> dict[str, LabeledImages]:
        """Return `"train"`/`"test"` when `root/train` and `root/test` exist, else `"all"`."""
        root = local_path(spec)
        if not root.is_dir():
            raise InputError(f"{root}: imagefolder path must be a folder of class folders")
        train, test = root / "train", root / "test"
        if train.is_dir() and test.is_dir() and class_folders(train) and class_folders(test):
            train_names = [f.name for f in class_folders(train)]
            test_names = [f.name for f in class_folders(test)]
            if train_names != test_names:
                raise InputError(f"{root}: train/ has classes {train_names} but test/ has "
                                 f"{test_names}; give both the same class folders")
            return {"train": read_tree(train, f"imagefolder:{root}[train]"),
                    "test": read_tree(test, f"imagefolder:{root}[test]")}
        return {"all": read_tree(root, f"imagefolder:{root}[all]")}
