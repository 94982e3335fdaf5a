"""CIFAR-10 from the standard `cifar-10-python.tar.gz` (or its extracted folder).

The archive holds Python pickles (`data_batch_1..5`, `test_batch`,
`batches.meta`). Pickles can run arbitrary code, so they are read with an
unpickler that allows only the numpy globals needed to rebuild an array.
Subsets: `"train"` (50,000 images) and `"test"` (10,000).
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy._core import multiarray

from dpsynth.config import SourceConfig
from dpsynth.data.sources import LabeledImages, check_labels, chw_rows_to_nhwc, local_path
from dpsynth.errors import InputError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
MEMBERS = (*TRAIN_BATCHES, TEST_BATCH, META)

# The only globals an official batch references: numpy's array rebuilders.
# `numpy.core` was renamed `numpy._core` in numpy 2; old pickles use the old name.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    def __init__(self, file: io.BytesIO, where: str) -> None:
        super().__init__(file, encoding="bytes")  # the official files are Python 2 pickles
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise InputError(f"{self.where}: the pickle references {module}.{name}, which a "
                             "CIFAR-10 batch never does; refusing to load it. Re-download "
                             "cifar-10-python.tar.gz from the official site") from None


def unpickle_batch(data: bytes, where: str) -> dict[bytes, Any]:
    """Safely unpickle one batch file's bytes into its dict (bytes keys).

    Raises:
        InputError: the pickle is corrupt, not a dict, or references a forbidden global.
    """
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(data), where).load()
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(f"{where}: not a readable CIFAR-10 pickle ({err!r}); re-download "
                         "cifar-10-python.tar.gz") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: holds a {type(obj).__name__}, expected a dict; re-download "
                         "cifar-10-python.tar.gz")
    return obj


def _read_members(path: Path) -> dict[str, bytes]:
    """The bytes of every member in `MEMBERS`, from the tarball or folder at `path`."""
    if path.is_dir():
        folder = path / FOLDER if (path / FOLDER).is_dir() else path
        missing = [m for m in MEMBERS if not (folder / m).is_file()]
        if missing:
            raise InputError(f"{folder}: missing {missing}; point the path at the extracted "
                             f"{FOLDER} folder or at cifar-10-python.tar.gz")
        return {m: (folder / m).read_bytes() for m in MEMBERS}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one sequential pass: no seeking back in the gzip stream
                name = member.name.removeprefix("./")
                folder, _, base = name.rpartition("/")
                if folder == FOLDER and base in MEMBERS and member.isfile():
                    f = tar.extractfile(member)
                    if f is not None:
                        found[base] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        detail = " ".join(str(err).split())  # tarfile lists each method on its own line
        raise InputError(f"{path}: corrupt or truncated archive ({detail}); re-download "
                         "cifar-10-python.tar.gz") from None
    missing = [f"{FOLDER}/{m}" for m in MEMBERS if m not in found]
    if missing:
        raise InputError(f"{path}: archive has no member(s) {missing}; is it the official "
                         "cifar-10-python.tar.gz? Re-download it")
    return found


def _batch(raw: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels int64) of one unpickled batch."""
    batch = unpickle_batch(raw, where)
    for key in (b"data", b"labels"):
        if key not in batch:
            raise InputError(f"{where}: batch has no {key.decode()!r} field; re-download "
                             "cifar-10-python.tar.gz")
    data = np.asarray(batch[b"data"])
    images = chw_rows_to_nhwc(data, f"{where}: field 'data'")
    labels = check_labels(np.asarray(batch[b"labels"]), num_classes, f"{where}: field 'labels'")
    if len(labels) != len(images):
        raise InputError(f"{where}: {len(images)} images but {len(labels)} labels; "
                         "re-download cifar-10-python.tar.gz")
    return images, labels


class Cifar10Source:
    """Reads `cifar-10-python.tar.gz` or an extracted `cifar-10-batches-py` folder."""

    def load(self, spec: SourceConfig) -> dict[str, LabeledImages]:
        """Return `{"train": ..., "test": ...}` with (32, 32, 3) images."""
        path = local_path(spec)
        members = _read_members(path)
        meta = unpickle_batch(members[META], f"{path}:{META}")
        names = meta.get(b"label_names")
        if not isinstance(names, list) or not names:
            raise InputError(f"{path}:{META}: no 'label_names' list; re-download "
                             "cifar-10-python.tar.gz")
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        subsets = {"train": TRAIN_BATCHES, "test": (TEST_BATCH,)}
        out: dict[str, LabeledImages] = {}
        for subset, batch_names in subsets.items():
            parts = [_batch(members[b], f"{path}:{FOLDER}/{b}", len(classes))
                     for b in batch_names]
            out[subset] = LabeledImages(np.concatenate([p[0] for p in parts]),
                                        np.concatenate([p[1] for p in parts]), classes,
                                        source=f"cifar10:{path}[{subset}]")
        return out
