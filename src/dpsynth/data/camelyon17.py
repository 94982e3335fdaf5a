"""Camelyon17 tumour patches in the WILDS layout (Koh et al. 2021).

`metadata.csv` lists one patch per row (`patient, node, x_coord, y_coord,
tumor, slide, center, split`); the patches are PNG files under `patches/`.
Labels are `tumor` (classes "normal", "tumor"); hospitals are `center`.
WILDS's official split trains on centers 0-2 and tests on center 4 (center 3
is its validation hospital and is not used). With `hospitals` set, exactly
those centers are returned as one subset, `"all"`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsynth.config import SourceConfig
from dpsynth.data.sources import LabeledImages, decode_images, local_path
from dpsynth.errors import InputError

CLASSES = ("normal", "tumor")
COLUMNS = ("patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split")
TRAIN_CENTERS = (0, 1, 2)
TEST_CENTER = 4


@dataclass(frozen=True)
class Patch:
    """One metadata row: where the patch file is, its label and its hospital."""

    file: Path
    tumor: int
    center: int


def patch_path(root: Path, patient: int, node: int, x: int, y: int) -> Path:
    """The WILDS file name of one patch."""
    folder = f"patient_{patient:03d}_node_{node}"
    return root / "patches" / folder / f"patch_{folder}_x_{x}_y_{y}.png"


def _int(value: str | None, where: str, column: str) -> int:
    try:
        number = float(value or "")
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise InputError(f"{where}: column {column!r} is {value!r}, expected an integer; fix "
                         "metadata.csv (re-download the WILDS camelyon17 archive)")
    return int(number)


def read_metadata(root: Path) -> list[Patch]:
    """Parse `root/metadata.csv` into patches.

    Raises:
        InputError: the file or a column is missing, or a value is not an integer.
    """
    path = root / "metadata.csv"
    if not path.is_file():
        raise InputError(f"{path}: not found; the camelyon17 path must be the WILDS folder "
                         "holding metadata.csv and patches/")
    patches = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing column(s) {missing} (has "
                                 f"{reader.fieldnames}); expected the WILDS camelyon17 "
                                 "metadata.csv")
            for line, row in enumerate(reader, start=2):
                where = f"{path} line {line}"
                ints = {c: _int(row[c], where, c) for c in
                        ("patient", "node", "x_coord", "y_coord", "tumor", "center")}
                if ints["tumor"] not in (0, 1):
                    raise InputError(f"{where}: column 'tumor' is {ints['tumor']}, expected 0 "
                                     "or 1; fix metadata.csv")
                patches.append(Patch(patch_path(root, ints["patient"], ints["node"],
                                                ints["x_coord"], ints["y_coord"]),
                                     ints["tumor"], ints["center"]))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: unreadable ({err}); re-download it") from None
    if not patches:
        raise InputError(f"{path}: has no rows; re-download the WILDS camelyon17 archive")
    return patches


def _subset(patches: list[Patch], name: str, source: str) -> LabeledImages:
    absent = next((p.file for p in patches if not p.file.is_file()), None)
    if absent is not None:  # check every file up front: fail before minutes of decoding
        raise InputError(f"{absent}: patch listed in metadata.csv is missing; restore the "
                         "patches/ folder (re-extract the WILDS archive)")
    images = decode_images([p.file for p in patches], desc=f"camelyon17 {name}")
    labels = np.array([p.tumor for p in patches], np.int64)
    return LabeledImages(images, labels, CLASSES, source)


class Camelyon17Source:
    """Reads the WILDS camelyon17 folder."""

    def load(self, spec: SourceConfig) -> dict[str, LabeledImages]:
        """Return `"train"`/`"test"` (WILDS hospitals), or `"all"` for `spec.hospitals`."""
        root = local_path(spec)
        patches = read_metadata(root)
        if spec.hospitals is not None:
            present = {p.center for p in patches}
            absent = sorted(set(spec.hospitals) - present)
            if absent:
                raise InputError(f"{root / 'metadata.csv'}: no patches from hospital(s) "
                                 f"{absent} (centers present: {sorted(present)}); fix "
                                 "data.*.hospitals")
            chosen = [p for p in patches if p.center in spec.hospitals]
            label = ",".join(str(h) for h in sorted(set(spec.hospitals)))
            return {"all": _subset(chosen, "all", f"camelyon17:{root}[hospitals {label}]")}
        subsets = {"train": [p for p in patches if p.center in TRAIN_CENTERS],
                   "test": [p for p in patches if p.center == TEST_CENTER]}
        for name, chosen in subsets.items():
            if not chosen:
                raise InputError(f"{root / 'metadata.csv'}: no patches for the WILDS {name} "
                                 "hospitals (train: centers 0-2, test: center 4); set "
                                 "data.*.hospitals to the centers you have")
        return {name: _subset(chosen, name, f"camelyon17:{root}[{name}]")
                for name, chosen in subsets.items()}
