"""Contract of the data-source plug-in point and its shared helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpsynth.config import SourceConfig
from dpsynth.data.sources import (LabeledImages, check_labels, chw_rows_to_nhwc, decode_images,
                                  load_source, local_path)
from dpsynth.errors import InputError


@pytest.fixture
def every_source(tmp_path: Path, cifar_tarball: Path, imagenet32_dir: Path, camelyon_dir: Path,
                 imagefolder_dir: Path) -> dict[str, SourceConfig]:
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 5, 5), np.uint8), labels=[0, 1, 1])
    return {
        "digits": SourceConfig(),
        "cifar10": SourceConfig(kind="cifar10", path=str(cifar_tarball)),
        "imagenet32": SourceConfig(kind="imagenet32", path=str(imagenet32_dir)),
        "camelyon17": SourceConfig(kind="camelyon17", path=str(camelyon_dir)),
        "imagefolder": SourceConfig(kind="imagefolder", path=str(imagefolder_dir)),
        "npz": SourceConfig(kind="npz", path=str(tmp_path / "d.npz")),
    }


def test_every_kind_returns_named_valid_subsets(every_source: dict[str, SourceConfig]) -> None:
    expected = {"digits": {"all"}, "cifar10": {"train", "test"}, "imagenet32": {"train", "test"},
                "camelyon17": {"train", "test"}, "imagefolder": {"all"}, "npz": {"all"}}
    for kind, spec in every_source.items():
        subsets = load_source(spec)
        assert set(subsets) == expected[kind], kind
        for name, subset in subsets.items():
            assert isinstance(subset, LabeledImages)
            assert subset.images.dtype == np.uint8 and subset.images.ndim == 4
            assert subset.images.shape[-1] in (1, 3)
            assert subset.labels.dtype == np.int64 and len(subset.labels) == len(subset) > 0
            assert 0 <= subset.labels.min() and subset.labels.max() < len(subset.classes)
            assert subset.source.startswith(f"{kind}:") and subset.source.endswith(f"[{name}]")


def test_labeled_images_validates_and_takes() -> None:
    images = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2, 1)
    data = LabeledImages(images, np.array([0, 1, 0, 1], np.int32), ("a", "b"), "x")
    assert data.labels.dtype == np.int64 and len(data) == 4
    part = data.take(np.array([1, 3]), source="y")
    assert part.source == "y" and part.classes == ("a", "b")
    np.testing.assert_array_equal(part.images, images[[1, 3]])
    with pytest.raises(InputError, match="dtype float32"):
        LabeledImages(images.astype(np.float32), data.labels, ("a", "b"), "x")
    with pytest.raises(InputError, match=r"labels must be in \[0, 2\)"):
        LabeledImages(images, np.array([0, 1, 2, 0]), ("a", "b"), "x")


def test_local_path_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.tar.gz: not found"):
        local_path(SourceConfig(kind="cifar10", path=str(tmp_path / "nope.tar.gz")))
    assert local_path(SourceConfig(kind="npz", path=str(tmp_path))) == tmp_path


def test_every_kind_reads_the_same_from_s3(every_source: dict[str, SourceConfig], s3) -> None:
    """A source on S3 (an object: cifar10 tarball, npz; a prefix: the folder kinds) is
    downloaded to the storage cache and read exactly as its local original."""
    for kind, spec in every_source.items():
        if spec.path is None:
            continue
        local = Path(spec.path)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            key = f"raw/{kind}/{local.name}" + ("" if f == local else f"/{f.relative_to(local)}")
            s3.client.upload_file(str(f), s3.bucket, key)
        remote = SourceConfig(kind=spec.kind, path=s3.uri(f"raw/{kind}/{local.name}"),
                              hospitals=spec.hospitals)
        got, want = load_source(remote), load_source(spec)
        assert set(got) == set(want), kind
        for name in want:
            np.testing.assert_array_equal(got[name].images, want[name].images)
            np.testing.assert_array_equal(got[name].labels, want[name].labels)
            assert got[name].classes == want[name].classes
    with pytest.raises(InputError, match=rf"s3://{s3.bucket}/raw/missing.npz: no object or "
                                         "prefix"):
        local_path(SourceConfig(kind="npz", path=s3.uri("raw/missing.npz")))


def test_chw_rows_to_nhwc_layout() -> None:
    rows = np.concatenate([np.full(4, 1), np.full(4, 2), np.full(4, 3)]).astype(np.uint8)[None]
    out = chw_rows_to_nhwc(rows, "f")
    assert out.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(out[0, 1, 0], [1, 2, 3])
    with pytest.raises(InputError, match="f: 'data' rows have 10 values"):
        chw_rows_to_nhwc(np.zeros((1, 10), np.uint8), "f")
    with pytest.raises(InputError, match="dtype int64"):
        chw_rows_to_nhwc(np.zeros((1, 12), np.int64), "f")


def test_check_labels_base_and_range() -> None:
    np.testing.assert_array_equal(check_labels(np.array([1, 3]), 3, "f", base=1), [0, 2])
    with pytest.raises(InputError, match=r"f: labels must be in \[1, 4\), found \[0, 3\]"):
        check_labels(np.array([0, 3]), 3, "f", base=1)
    with pytest.raises(InputError, match="1-D integer"):
        check_labels(np.array([0.5]), 3, "f")


def test_decode_images_promotes_grey_and_rejects_other_sizes(tmp_path: Path) -> None:
    grey, colour, big = tmp_path / "g.png", tmp_path / "c.png", tmp_path / "b.png"
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(grey)
    Image.fromarray(np.full((4, 4, 3), (1, 2, 3), np.uint8)).save(colour)
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(big)
    assert decode_images([grey], "t").shape == (1, 4, 4, 1)
    out = decode_images([grey, colour], "t")
    assert out.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(out[0, 0, 0], [7, 7, 7])
    np.testing.assert_array_equal(out[1, 0, 0], [1, 2, 3])
    with pytest.raises(InputError, match=r"b.png: image is 4x5 .* share one size"):
        decode_images([colour, big], "t")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png: not a readable PNG/JPEG"):
        decode_images([colour, tmp_path / "bad.png"], "t")


def test_decode_image_modes(tmp_path: Path) -> None:
    Image.fromarray(np.full((2, 2), 65535, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((2, 2, 4), (9, 8, 7, 0), np.uint8)).save(tmp_path / "rgba.png")
    deep = decode_images([tmp_path / "deep.png"], "t")
    assert deep.shape == (1, 2, 2, 1) and deep.max() == deep.min() == 255  # 16-bit -> 8-bit
    np.testing.assert_array_equal(decode_images([tmp_path / "rgba.png"], "t")[0, 0, 0], [9, 8, 7])
