"""Image datasets on disk: uint8 NHWC `.npz` shards (`images`, `labels`) plus a
`manifest.json` with a sha256 per shard (DESIGN.md "Artifacts"). Readers verify
every hash, so a tampered or truncated shard is never used."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dpsynth.errors import InputError
from dpsynth.io.atomic import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    file: str
    count: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The `manifest.json` schema: `{"count", "shape": [H, W, C], "classes",
    "source", "shards": [{"file", "count", "sha256"}]}`, and `"role"` (`public`,
    `private` or `test`) in the splits `prepare` writes: what the stages that must
    not read the private split check (`dpsynth.data.roles`). Other outputs (the
    synthetic set) have no role, and no such key."""

    count: int
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    source: str
    shards: tuple[ShardInfo, ...]
    role: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["classes"] = list(self.classes)
        if self.role is None:
            del d["role"]
        return d

    @property
    def content_hash(self) -> str:
        """sha256 of the shard hashes, shape and classes: identifies the data."""
        h = hashlib.sha256()
        h.update(json.dumps([list(self.shape), list(self.classes)]).encode())
        for s in self.shards:
            h.update(s.sha256.encode())
        return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_images(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise `InputError` unless images are uint8 NHWC and labels int in range."""
    if images.dtype != np.uint8:
        raise InputError(f"{where}: images have dtype {images.dtype}, expected uint8")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise InputError(f"{where}: images have shape {images.shape}, expected (N, H, W, C) "
                         "with C in {1, 3}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise InputError(f"{where}: labels have shape {labels.shape}, expected ({len(images)},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{where}: labels have dtype {labels.dtype}, expected integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{where}: labels must be in [0, {num_classes}), "
                         f"found range [{labels.min()}, {labels.max()}]")


def encode_shard(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The bytes of one shard file (uncompressed npz: fast, hash-stable)."""
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels.astype(np.int64))
    return buf.getvalue()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> ShardInfo:
    """Atomically write one shard file and return its manifest entry."""
    data = encode_shard(images, labels)
    atomic_write_bytes(path, data)
    return ShardInfo(file=path.name, count=len(images), sha256=hashlib.sha256(data).hexdigest())


def write_dataset(out_dir: str | Path, images: np.ndarray, labels: np.ndarray,
                  classes: Sequence[str], source: str, shard_size: int = 10_000,
                  role: str | None = None) -> Manifest:
    """Write `images` (uint8 NHWC) and `labels` as shards + manifest into `out_dir`;
    `role` is the split's (`prepare`'s splits), recorded in the manifest.

    `out_dir` should itself be inside an `atomic_dir`; the manifest is written last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_images(images, labels, len(classes), where=str(out_dir))
    shards = [write_shard(out_dir / shard_name(i), images[start:start + shard_size],
                          labels[start:start + shard_size])
              for i, start in enumerate(range(0, max(len(images), 1), shard_size))]
    manifest = Manifest(count=len(images), shape=tuple(images.shape[1:]),  # type: ignore[arg-type]
                        classes=tuple(classes), source=source, shards=tuple(shards), role=role)
    write_manifest(out_dir, manifest)
    return manifest


def write_manifest(out_dir: str | Path, manifest: Manifest) -> None:
    atomic_write_json(Path(out_dir) / MANIFEST, manifest.to_json())


def read_manifest(data_dir: str | Path) -> Manifest:
    """Read and schema-check `data_dir/manifest.json`."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: no manifest; is {data_dir} the output of a dpsynth stage "
                         "(e.g. artifacts/prepare/private)?")
    try:
        raw = json.loads(path.read_text())
        if len(raw["shape"]) != 3:
            raise ValueError(f"shape={raw['shape']!r} must be [H, W, C]")
        return Manifest(
            count=int(raw["count"]), shape=tuple(int(v) for v in raw["shape"]),  # type: ignore[arg-type]
            classes=tuple(str(c) for c in raw["classes"]), source=str(raw["source"]),
            shards=tuple(ShardInfo(file=str(s["file"]), count=int(s["count"]),
                                   sha256=str(s["sha256"])) for s in raw["shards"]),
            role=None if raw.get("role") is None else str(raw["role"]))
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a valid manifest ({err!r}); re-run the stage that "
                         "wrote it") from None


def load_shard(path: Path, expected_sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one shard, verifying its sha256 when given."""
    if not path.is_file():
        raise InputError(f"{path}: shard listed in the manifest is missing")
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise InputError(f"{path}: sha256 does not match the manifest (tampered or truncated "
                         "shard); re-run the stage that wrote it")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return z["images"], z["labels"]
    except Exception as err:  # noqa: BLE001 - any decode failure is a bad file
        raise InputError(f"{path}: not a readable shard ({err})") from None


def iter_shards(data_dir: str | Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(images, labels)` shard by shard, each hash-verified (flat memory)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    for info in manifest.shards:
        path = data_dir / info.file
        images, labels = load_shard(path, info.sha256)
        if len(images) != info.count:
            raise InputError(f"{path}: holds {len(images)} images, manifest "
                             f"says {info.count}")
        # a matching hash only says the file is unchanged; check its content too
        try:
            check_images(images, labels, len(manifest.classes), where=str(path))
        except InputError as err:
            raise InputError(f"{err}; re-run the stage that wrote it") from None
        if images.shape[1:] != manifest.shape:
            raise InputError(f"{path}: images have shape (H, W, C)={images.shape[1:]}, "
                             f"manifest says {manifest.shape}; re-run the stage that wrote it")
        yield images, labels


def verify_dataset(data_dir: str | Path) -> Manifest:
    """Check every shard of a dataset (hash and content) without keeping them in
    memory: for stages that must refuse a bad input before writing anything but
    read it only later, in the middle of their work.

    Raises:
        InputError: a missing manifest or shard, a hash mismatch, bad content.
    """
    for _ in iter_shards(data_dir):
        pass
    return read_manifest(data_dir)


def read_dataset(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray, Manifest]:
    """Load a whole dataset into memory, verifying every shard's hash."""
    manifest = read_manifest(data_dir)
    parts = list(iter_shards(data_dir))
    h, w, c = manifest.shape
    images = (np.concatenate([p[0] for p in parts]) if parts
              else np.zeros((0, h, w, c), np.uint8))
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0,), np.int64)
    check_images(images, labels, len(manifest.classes), where=str(data_dir))
    return images, labels, manifest
