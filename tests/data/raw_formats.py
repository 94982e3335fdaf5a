"""Tiny datasets in the real on-disk formats (CIFAR-10 python tarball,
downsampled-ImageNet npz, WILDS camelyon17, image folders), for the data tests.

A plain module, not conftest.py, so test files can import its builders by a
name no other test folder uses."""

from __future__ import annotations

import csv
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes `bytes` and `str` as Python 2 `str` (BINSTRING) the way cPickle did for
    the official CIFAR-10 batches, so `encoding="bytes"` gives bytes back."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes | str) -> None:
        raw = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle(obj: object) -> bytes:
    """Pickle like the official CIFAR-10 files: protocol 2, Python 2 strings, numpy
    arrays rebuilt by `numpy.core.multiarray._reconstruct`."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_images(n: int, offset: int) -> tuple[np.ndarray, list[int]]:
    """n distinct (N, 3072) CHW rows and labels cycling through the 10 classes."""
    rows = (np.arange(n * 3072).reshape(n, 3072) + offset * 7919) % 251
    return rows.astype(np.uint8), [(offset + i) % 10 for i in range(n)]


def cifar_members(per_batch: int = 2, test_count: int = 10) -> dict[str, bytes]:
    """member base name -> bytes, for the 5 train batches, test_batch and batches.meta."""
    members = {}
    for b in range(1, 6):
        data, labels = cifar_images(per_batch, offset=(b - 1) * per_batch)
        members[f"data_batch_{b}"] = py2_pickle({
            b"batch_label": b"training batch %d of 5" % b, b"labels": labels, b"data": data,
            b"filenames": [b"img_%d.png" % i for i in range(per_batch)]})
    data, labels = cifar_images(test_count, offset=1000)
    members["test_batch"] = py2_pickle({b"batch_label": b"testing batch 1 of 1",
                                        b"labels": labels, b"data": data,
                                        b"filenames": [b"t_%d.png" % i for i in range(test_count)]})
    members["batches.meta"] = py2_pickle({b"label_names": [c.encode() for c in CIFAR_CLASSES],
                                          b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return members


def write_tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_imagenet32(folder: Path, batches: int = 2, per_batch: int = 6, val: int = 4,
                     side: int = 32) -> Path:
    """Downsampled-ImageNet npz batches: 1-based labels, (N, 3*side*side) CHW rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for b in range(1, batches + 1):
        np.savez(folder / f"train_data_batch_{b}.npz",
                 data=rng.integers(0, 256, (per_batch, 3 * side * side), dtype=np.uint8),
                 labels=rng.integers(1, 1001, per_batch), mean=np.zeros(3 * side * side))
    np.savez(folder / "val_data.npz",
             data=rng.integers(0, 256, (val, 3 * side * side), dtype=np.uint8),
             labels=np.array([1, 1000, 500, 2][:val]))
    return folder


def camelyon_rows() -> list[dict[str, int]]:
    """Two patients per center, 5 centers, 2 tumour + 2 normal patches each."""
    rows = []
    for center in range(5):
        for k in range(4):
            patient = 2 * center + k // 2
            rows.append({"patient": patient, "node": k % 2, "x_coord": 100 + k,
                         "y_coord": 200 + center, "tumor": k % 2, "slide": patient * 5,
                         "center": center, "split": 0})
    return rows


def write_camelyon17(root: Path, rows: list[dict[str, int]] | None = None,
                     columns: tuple[str, ...] | None = None) -> Path:
    """WILDS layout: metadata.csv (leading index column) + patches/*.png (12x12 RGB).

    Each patch is filled with (center * 40, tumor * 200, patient) so tests can
    check which rows were read.
    """
    rows = camelyon_rows() if rows is None else rows
    columns = columns or ("patient", "node", "x_coord", "y_coord", "tumor", "slide",
                          "center", "split")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", *columns])
        for i, row in enumerate(rows):
            writer.writerow([i, *(row[c] for c in columns)])
    for row in rows:
        folder = f"patient_{row['patient']:03d}_node_{row['node']}"
        path = (root / "patches" / folder /
                f"patch_{folder}_x_{row['x_coord']}_y_{row['y_coord']}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        pixel = (row["center"] * 40, row["tumor"] * 200, row["patient"])
        Image.fromarray(np.full((12, 12, 3), pixel, np.uint8)).save(path)
    return root


def write_imagefolder(root: Path, per_class: int = 3,
                      size: tuple[int, int] = (10, 10)) -> Path:
    """root/{cat,dog}/: cat as PNG (value 10*i), dog as JPEG (value 200)."""
    for i in range(per_class):
        (root / "cat").mkdir(parents=True, exist_ok=True)
        (root / "dog").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*size, 3), 10 * i, np.uint8)).save(root / "cat" / f"c{i}.png")
        Image.fromarray(np.full((*size, 3), 200, np.uint8)).save(root / "dog" / f"d{i}.jpg",
                                                                   quality=95)
    return root
