"""A dataset in one `.npz` file, or a dpsynth shard folder (with `manifest.json`).

The file holds `images` uint8 (N, H, W, C) or (N, H, W), `labels` integers
in [0, num_classes), and optionally `classes` (strings; default "0".."max").
It is read with `allow_pickle=False`. One subset, `"all"`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from dpsynth.config import SourceConfig
from dpsynth.data.sources import LabeledImages, check_labels, local_path
from dpsynth.errors import InputError
from dpsynth.io.shards import MANIFEST, read_dataset


def _images(images: np.ndarray, path: Path) -> np.ndarray:
    where = f"{path}: field 'images'"
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        bad = "NaN" if np.isnan(images).any() else "inf"
        raise InputError(f"{where}: contains {bad} pixel values; clean the data and store it "
                         "as uint8 0..255")
    if images.dtype != np.uint8:
        raise InputError(f"{where}: dtype {images.dtype}, expected uint8 0..255; convert it "
                         "(e.g. (x * 255).round().clip(0, 255).astype(np.uint8))")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise InputError(f"{where}: shape {images.shape}, expected (N, H, W, C) with C in "
                         "{1, 3} or (N, H, W)")
    return images


def read_npz(path: Path) -> LabeledImages:
    """Read and validate one `.npz` dataset file.

    Raises:
        InputError: corrupt file, a missing array, wrong dtype or shape, labels out of range.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise InputError(f"{path}: no {missing} array(s) (has {z.files}); save it with "
                                 "np.savez(path, images=..., labels=..., classes=...)")
            images, labels = z["images"], z["labels"]
            classes = z["classes"] if "classes" in z.files else None
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable .npz without pickled objects ({err}); "
                         "re-save it with np.savez and plain arrays") from None
    images = _images(images, path)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # column vectors are common
        labels = labels[:, 0]
    if not np.issubdtype(labels.dtype, np.integer):
        nan = np.issubdtype(labels.dtype, np.floating) and np.isnan(labels).any()
        raise InputError(f"{path}: field 'labels' has dtype {labels.dtype}"
                         f"{' with NaN' if nan else ''}; store integer class indices")
    if classes is None:
        names = tuple(str(i) for i in range(int(labels.max()) + 1 if labels.size else 1))
    else:
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise InputError(f"{path}: field 'classes' has dtype {classes.dtype} and shape "
                             f"{classes.shape}; store a 1-D array of class-name strings")
        names = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist())
    labels = check_labels(labels, len(names), f"{path}: field 'labels'")
    if len(labels) != len(images):
        raise InputError(f"{path}: {len(images)} images but {len(labels)} labels; they must "
                         "match one to one")
    return LabeledImages(images, labels, names, f"npz:{path}[all]")


class NpzSource:
    """Reads one `.npz` file or a dpsynth shard folder."""

    def load(self, spec: SourceConfig) -> dict[str, LabeledImages]:
        """Return `{"all": ...}`."""
        path = local_path(spec)
        if path.is_dir():
            if not (path / MANIFEST).is_file():
                raise InputError(f"{path}: folder has no {MANIFEST}; the npz path must be a "
                                 ".npz file or a dpsynth shard folder")
            images, labels, manifest = read_dataset(path)
            return {"all": LabeledImages(images, labels, manifest.classes, f"npz:{path}[all]")}
        return {"all": read_npz(path)}
