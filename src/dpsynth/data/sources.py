"""The data-source plug-in point: `LabeledImages`, the `DataSource` protocol and
`load_source`, which picks the reader for a `SourceConfig.kind`.

Every reader returns named subsets: `"train"` and `"test"` where the format has
an official split, else `"all"`. Bad input raises `InputError` naming the file
and the fix (DESIGN.md "Data sources"); nothing here writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from dpsynth.config import SourceConfig
from dpsynth.errors import InputError
from dpsynth.io import cache, s3
from dpsynth.io.shards import check_images


@dataclass(frozen=True)
class LabeledImages:
    """One subset of a raw source, already in dpsynth's in-memory layout.

    Attributes:
        images: uint8, shape (N, H, W, C) with C in {1, 3}.
        labels: int64, shape (N,), values in [0, len(classes)).
        classes: class names; label `i` means `classes[i]`.
        source: where the data came from, e.g.
            `"cifar10:/p/cifar-10-python.tar.gz[train]"`.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        check_images(self.images, self.labels, len(self.classes), where=self.source)
        if self.labels.dtype != np.int64:
            object.__setattr__(self, "labels", self.labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices: np.ndarray, source: str | None = None) -> LabeledImages:
        """The examples at `indices` (same classes), optionally renamed."""
        return LabeledImages(self.images[indices], self.labels[indices], self.classes,
                             self.source if source is None else source)


class DataSource(Protocol):
    """A reader for one raw format."""

    def load(self, spec: SourceConfig) -> dict[str, LabeledImages]:
        """Read the source named by `spec`.

        Args:
            spec: the source's kind, path and options.

        Returns:
            Named subsets: `"train"` and `"test"` where the format has an
            official split, else `"all"`.

        Raises:
            InputError: the input is missing, corrupt or malformed.
        """
        ...


def readers() -> dict[str, DataSource]:
    """The reader of each source kind (the kinds and their descriptions:
    `dpsynth.choices.SOURCE_KINDS`); the only kind -> reader mapping."""
    # Imported here because every format module imports `LabeledImages` from this one.
    from dpsynth.data import camelyon17, cifar10, digits, imagefolder, imagenet32, npz, printed

    return {
        "digits": digits.DigitsSource(),
        "printed-digits": printed.PrintedDigitsSource(),
        "cifar10": cifar10.Cifar10Source(),
        "imagenet32": imagenet32.ImageNet32Source(),
        "camelyon17": camelyon17.Camelyon17Source(),
        "imagefolder": imagefolder.ImageFolderSource(),
        "npz": npz.NpzSource(),
    }


def load_source(spec: SourceConfig) -> dict[str, LabeledImages]:
    """Load `spec` with the reader for `spec.kind`.

    Args:
        spec: which source to read.

    Returns:
        The reader's named subsets (see `DataSource.load`).
    """
    table = readers()
    if spec.kind not in table:
        raise InputError(f"source kind {spec.kind!r} is unknown; use one of {sorted(table)}")
    return table[spec.kind].load(spec)


# --------------------------------------------------------------------------- helpers


def local_path(spec: SourceConfig) -> Path:
    """The existing local file or folder that `spec.path` names; for an `s3://`
    object (a tarball, an npz) or prefix (a folder source), its local copy in the
    storage cache, downloaded first if needed (`dpsynth.io.cache.fetch`).

    Raises:
        InputError: the path is unset or does not exist (locally or in the bucket).
    """
    if not spec.path:
        raise InputError(f"{spec.kind} source needs a path (a file or folder); set data.*.path")
    if s3.is_s3(spec.path):
        return cache.fetch(spec.path)
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: not found; check the {spec.kind} source's path "
                         "(data.private.path / data.public.path / data.test.path)")
    return path


def chw_rows_to_nhwc(data: np.ndarray, where: str) -> np.ndarray:
    """(N, 3*S*S) uint8 rows in channel-major (CHW) order -> (N, S, S, 3).

    The layout of the CIFAR-10 python batches and the downsampled-ImageNet npz
    files: each row holds the red plane, then green, then blue, row-major.
    """
    if data.dtype != np.uint8 or data.ndim != 2:
        raise InputError(f"{where}: 'data' has dtype {data.dtype} and shape {data.shape}; "
                         "expected uint8 rows of shape (N, 3*S*S); re-download the file")
    side = int(round((data.shape[1] / 3) ** 0.5))
    if 3 * side * side != data.shape[1] or side == 0:
        raise InputError(f"{where}: 'data' rows have {data.shape[1]} values, not 3*S*S for a "
                         "square S x S RGB image; re-download the file")
    return np.ascontiguousarray(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))


def check_labels(labels: np.ndarray, num_classes: int, where: str, base: int = 0) -> np.ndarray:
    """Labels as int64 in [0, num_classes), given values in [base, base + num_classes).

    Raises:
        InputError: labels are not integers or out of range.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise InputError(f"{where}: labels have dtype {labels.dtype} and shape {labels.shape}; "
                         "expected a 1-D integer array")
    labels = labels.astype(np.int64) - base
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{where}: labels must be in [{base}, {base + num_classes}), found "
                         f"[{labels.min() + base}, {labels.max() + base}]; fix the labels or "
                         "the class list")
    return labels


def decode_image(path: Path) -> np.ndarray:
    """Decode one PNG/JPEG file to uint8 (H, W, 1) for grey images, else (H, W, 3).

    Raises:
        InputError: the file is missing or not a readable image.
    """
    try:
        with Image.open(path) as img:
            if img.mode in ("I", "I;16"):  # 16-bit grey PNG: 0..65535 -> 0..255
                arr = np.asarray(img, dtype=np.float64) / 257.0
                arr = np.clip(arr, 0, 255).round().astype(np.uint8)
            else:
                arr = np.asarray(img.convert("L" if img.mode in ("1", "L", "F") else "RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found; restore it or remove it from the "
                         "source") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable PNG/JPEG image ({err}); re-export or remove "
                         "it") from None
    return arr[..., None] if arr.ndim == 2 else arr


def decode_images(paths: Sequence[Path], desc: str) -> np.ndarray:
    """Decode equally sized image files into one uint8 (N, H, W, C) array.

    A mix of grey and colour files gives C = 3 (grey ones are repeated).
    Decoding goes into a preallocated array with a tqdm progress bar.

    Raises:
        InputError: a file is unreadable or its size differs from the first one's.
    """
    if not paths:
        raise InputError(f"{desc}: no image files to decode")
    first = decode_image(paths[0])
    out = np.empty((len(paths), *first.shape), np.uint8)
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=None)):
        img = first if i == 0 else decode_image(path)
        if img.shape[:2] != out.shape[1:3]:
            raise InputError(
                f"{path}: image is {img.shape[1]}x{img.shape[0]} (WxH) but {paths[0]} is "
                f"{out.shape[2]}x{out.shape[1]}; all images of one source must share one size "
                "(data.image_size sets the output size, not the input size): resize them first")
        if img.shape[2] != out.shape[3]:
            if out.shape[3] == 1:  # first colour file: promote what we have so far
                out = np.repeat(out, 3, axis=3)
            else:
                img = np.repeat(img, 3, axis=2)
        out[i] = img
    return out
