"""Image shards + manifest: exact round trip, the schema, and every way a
dataset on disk can be bad (each must stop with an `InputError` naming the file)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from dpsynth.errors import InputError
from dpsynth.io.shards import (MANIFEST, encode_shard, iter_shards, read_dataset, read_manifest,
                               sha256_file, shard_name, write_dataset)

CLASSES = ("zero", "one", "two")


def make_data(n: int = 25, shape: tuple[int, int, int] = (4, 5, 3),
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            rng.integers(0, len(CLASSES), n).astype(np.int64))


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    images, labels = make_data()
    out = tmp_path / "ds"
    write_dataset(out, images, labels, CLASSES, source="test", shard_size=10)
    return out, images, labels


def rewrite_manifest(data_dir: Path, **changes: object) -> None:
    raw = json.loads((data_dir / MANIFEST).read_text())
    raw.update(changes)
    (data_dir / MANIFEST).write_text(json.dumps(raw))


def put_shard(data_dir: Path, index: int, payload: bytes, count: int) -> None:
    """Replace shard `index` by `payload` and make the manifest agree (a well-hashed
    shard whose content is bad)."""
    (data_dir / shard_name(index)).write_bytes(payload)
    raw = json.loads((data_dir / MANIFEST).read_text())
    raw["shards"][index] = {"file": shard_name(index), "count": count,
                            "sha256": hashlib.sha256(payload).hexdigest()}
    (data_dir / MANIFEST).write_text(json.dumps(raw))


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_round_trip_is_exact_across_shards(dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, images, labels = dataset
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST, shard_name(0), shard_name(1), shard_name(2)]
    got_images, got_labels, manifest = read_dataset(out)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.int64
    assert manifest.count == 25
    assert manifest.shape == (4, 5, 3)
    assert manifest.classes == CLASSES
    assert manifest.source == "test"
    assert [s.count for s in manifest.shards] == [10, 10, 5]


def test_manifest_schema_is_exactly_the_documented_one(
        dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, _, _ = dataset
    raw = json.loads((out / MANIFEST).read_text())
    assert set(raw) == {"count", "shape", "classes", "source", "shards"}
    assert raw["count"] == 25 and raw["shape"] == [4, 5, 3]
    assert raw["classes"] == list(CLASSES) and raw["source"] == "test"
    for i, entry in enumerate(raw["shards"]):
        assert set(entry) == {"file", "count", "sha256"}
        assert entry["file"] == shard_name(i)
        data = (out / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["sha256"] == sha256_file(out / entry["file"])
    assert json.loads(json.dumps(read_manifest(out).to_json())) == raw


def test_shard_files_are_plain_npz_with_images_and_labels(
        dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, images, labels = dataset
    with np.load(out / shard_name(1), allow_pickle=False) as z:
        assert sorted(z.files) == ["images", "labels"]
        np.testing.assert_array_equal(z["images"], images[10:20])
        np.testing.assert_array_equal(z["labels"], labels[10:20])


def test_labels_are_stored_as_int64(tmp_path: Path) -> None:
    images, labels = make_data(n=4)
    write_dataset(tmp_path, images, labels.astype(np.uint8), CLASSES, "t")
    _, got, _ = read_dataset(tmp_path)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, labels)


def test_empty_dataset_round_trips(tmp_path: Path) -> None:
    images = np.zeros((0, 8, 8, 1), np.uint8)
    manifest = write_dataset(tmp_path, images, np.zeros((0,), np.int64), CLASSES, "t")
    assert manifest.count == 0
    got_images, got_labels, _ = read_dataset(tmp_path)
    assert got_images.shape == (0, 8, 8, 1) and got_labels.shape == (0,)


def test_iter_shards_streams_one_shard_at_a_time(
        dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, images, labels = dataset
    it = iter_shards(out)
    first_images, first_labels = next(it)
    np.testing.assert_array_equal(first_images, images[:10])
    np.testing.assert_array_equal(first_labels, labels[:10])
    # a lazy generator: a later shard is only read (and verified) when reached
    (out / shard_name(2)).unlink()
    second_images, _ = next(it)
    np.testing.assert_array_equal(second_images, images[10:20])
    with pytest.raises(InputError, match="missing"):
        next(it)


def test_content_hash_is_stable_and_tracks_the_data(tmp_path: Path) -> None:
    images, labels = make_data()
    a = write_dataset(tmp_path / "a", images, labels, CLASSES, "src-a", shard_size=10)
    b = write_dataset(tmp_path / "b", images, labels, CLASSES, "src-b", shard_size=10)
    assert len(a.content_hash) == 64
    assert a.content_hash == b.content_hash  # same data; `source` is only a label
    assert a.content_hash == read_manifest(tmp_path / "a").content_hash
    assert encode_shard(images, labels) == encode_shard(images.copy(), labels.copy())
    changed = images.copy()
    changed[3, 0, 0, 0] ^= 1
    c = write_dataset(tmp_path / "c", changed, labels, CLASSES, "src-a", shard_size=10)
    relabelled = labels.copy()
    relabelled[0] = (relabelled[0] + 1) % len(CLASSES)
    d = write_dataset(tmp_path / "d", images, relabelled, CLASSES, "src-a", shard_size=10)
    e = write_dataset(tmp_path / "e", images, labels, ("a", "b", "c"), "src-a", shard_size=10)
    assert len({a.content_hash, c.content_hash, d.content_hash, e.content_hash}) == 4


def test_tampered_shard_is_refused(dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, _, _ = dataset
    path = out / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x01  # one bit inside the pixel data
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256") as info:
        read_dataset(out)
    assert shard_name(1) in str(info.value)


def test_truncated_shard_is_refused(dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, _, _ = dataset
    path = out / shard_name(0)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match=f"{shard_name(0)}: sha256"):
        read_dataset(out)


def test_missing_shard_is_named(dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, _, _ = dataset
    (out / shard_name(2)).unlink()
    with pytest.raises(InputError, match=f"{shard_name(2)}: shard listed in the manifest is "
                                         "missing"):
        read_dataset(out)


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no manifest"):
        read_dataset(tmp_path)


@pytest.mark.parametrize("text", [
    "{not json",
    "[]",
    '{"count": 1}',
    '{"count": "x", "shape": [1, 1, 1], "classes": [], "source": "", "shards": []}',
    '{"count": 1, "shape": [8, 8], "classes": ["a"], "source": "", "shards": []}',
    '{"count": 1, "shape": [8, 8, 1], "classes": ["a"], "source": "", "shards": [{"file": "x"}]}',
])
def test_bad_manifest_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(InputError, match=f"{MANIFEST}: not a valid manifest"):
        read_manifest(tmp_path)


def test_shard_count_mismatch_is_refused(dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, _, _ = dataset
    raw = json.loads((out / MANIFEST).read_text())
    raw["shards"][0]["count"] = 9
    (out / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(InputError, match="holds 10 images, manifest says 9"):
        read_dataset(out)


def test_pickled_object_array_is_refused(dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, _, _ = dataset
    evil = np.empty(10, dtype=object)
    evil[:] = [{"x": i} for i in range(10)]
    put_shard(out, 0, npz_bytes(images=evil, labels=np.zeros(10, np.int64)), 10)
    with pytest.raises(InputError, match=f"{shard_name(0)}: not a readable shard"):
        read_dataset(out)


def test_npz_without_images_key_is_refused(dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, _, _ = dataset
    put_shard(out, 0, npz_bytes(pixels=np.zeros((10, 4, 5, 3), np.uint8),
                                labels=np.zeros(10, np.int64)), 10)
    with pytest.raises(InputError, match="not a readable shard"):
        read_dataset(out)


def test_well_hashed_shard_with_bad_labels_is_refused(
        dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, images, _ = dataset
    put_shard(out, 1, encode_shard(images[10:20], np.full(10, 7)), 10)
    with pytest.raises(InputError, match=r"labels must be in \[0, 3\), found range \[7, 7\]"):
        read_dataset(out)
    with pytest.raises(InputError, match=r"labels must be in \[0, 3\)"):
        list(iter_shards(out))  # streaming readers check each shard too


def test_well_hashed_shard_of_another_shape_is_refused(
        dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, _, labels = dataset
    put_shard(out, 1, encode_shard(np.zeros((10, 4, 4, 3), np.uint8), labels[10:20]), 10)
    with pytest.raises(InputError, match=shard_name(1)) as info:
        read_dataset(out)
    assert "(4, 5, 3)" in str(info.value)


def test_well_hashed_shard_of_wrong_dtype_is_refused(
        dataset: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, images, labels = dataset
    put_shard(out, 0, encode_shard(images[:10].astype(np.float32), labels[:10]), 10)
    with pytest.raises(InputError, match="dtype float32, expected uint8"):
        read_dataset(out)


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int64), "dtype float32, expected uint8"),
    (np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64), r"shape \(2, 4, 4\)"),
    (np.zeros((2, 4, 4, 2), np.uint8), np.zeros(2, np.int64), r"shape \(2, 4, 4, 2\)"),
    (np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int64), r"labels have shape \(3,\)"),
    (np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.float32), "labels have dtype float32"),
    (np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 3]), r"found range \[0, 3\]"),
    (np.zeros((2, 4, 4, 1), np.uint8), np.array([-1, 0]), r"found range \[-1, 0\]"),
])
def test_write_refuses_bad_arrays_and_writes_nothing(tmp_path: Path, images: np.ndarray,
                                                     labels: np.ndarray, match: str) -> None:
    out = tmp_path / "ds"
    with pytest.raises(InputError, match=match) as info:
        write_dataset(out, images, labels, CLASSES, "t")
    assert str(out) in str(info.value)
    assert not out.exists() or not any(out.iterdir())
