"""Downsampled ImageNet (Chrabaszcz et al. 2017) npz batches, for public pre-training.

The folder holds `train_data_batch_1.npz` ... `train_data_batch_10.npz` and
`val_data.npz`, each with `data` (N, 3*S*S) uint8 rows in CHW order and
`labels` in 1..1000 (1-based; converted to 0-based here). S = 32 for
ImageNet32; the same layout at other sizes (16, 64) reads the same way.
Subsets: `"train"` (all train batches) and `"test"` (`val_data.npz`), each
present when its files are.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from dpsynth.config import SourceConfig
from dpsynth.data.sources import LabeledImages, check_labels, chw_rows_to_nhwc, local_path
from dpsynth.errors import InputError

NUM_CLASSES = 1000
CLASSES = tuple(str(i) for i in range(NUM_CLASSES))
VAL_FILE = "val_data.npz"
_TRAIN_FILE = re.compile(r"train_data_batch_(\d+)\.npz")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels 0-based int64) of one npz batch."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("data", "labels") if k not in z.files]
            if missing:
                raise InputError(f"{path}: no {missing} array(s) (has {z.files}); is this a "
                                 "downsampled-ImageNet npz batch? Re-download it")
            data, labels = z["data"], z["labels"]
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: corrupt, truncated or pickled npz ({err}); re-download "
                         "it") from None
    images = chw_rows_to_nhwc(data, f"{path}: field 'data'")
    labels = check_labels(np.asarray(labels).reshape(-1), NUM_CLASSES, f"{path}: field 'labels'",
                          base=1)
    if len(labels) != len(images):
        raise InputError(f"{path}: {len(images)} images but {len(labels)} labels; "
                         "re-download it")
    return images, labels


def _concat(paths: list[Path], source: str) -> LabeledImages:
    parts = [_read_batch(p) for p in paths]
    shapes = {p[0].shape[1:] for p in parts}
    if len(shapes) > 1:
        raise InputError(f"{paths[0].parent}: batches mix image sizes {sorted(shapes)}; keep "
                         "the batches of one resolution in the folder")
    return LabeledImages(np.concatenate([p[0] for p in parts]),
                         np.concatenate([p[1] for p in parts]), CLASSES, source)


class ImageNet32Source:
    """Reads a folder of downsampled-ImageNet npz batches."""

    def load(self, spec: SourceConfig) -> dict[str, LabeledImages]:
        """Return `"train"` and/or `"test"` subsets with 1000 classes ("0".."999")."""
        folder = local_path(spec)
        if not folder.is_dir():
            raise InputError(f"{folder}: imagenet32 path must be the folder holding "
                             f"train_data_batch_*.npz and {VAL_FILE}")
        numbered = sorted((int(m.group(1)), p) for p in folder.iterdir()
                          if (m := _TRAIN_FILE.fullmatch(p.name)))
        if numbered:
            expected = set(range(1, numbered[-1][0] + 1))
            absent = sorted(expected - {n for n, _ in numbered})
            if absent:
                raise InputError(f"{folder}: train_data_batch_{absent[0]}.npz is missing (found "
                                 f"batches {[n for n, _ in numbered]}); download every batch")
        out: dict[str, LabeledImages] = {}
        if numbered:
            out["train"] = _concat([p for _, p in numbered], f"imagenet32:{folder}[train]")
        if (folder / VAL_FILE).is_file():
            out["test"] = _concat([folder / VAL_FILE], f"imagenet32:{folder}[test]")
        if not out:
            raise InputError(f"{folder}: no train_data_batch_*.npz or {VAL_FILE}; point "
                             "the path at the extracted downsampled-ImageNet folder")
        return out
