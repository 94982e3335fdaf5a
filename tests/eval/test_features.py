"""Streamed feature statistics and the Inception-v3 extractor (dpsynth.eval.features)."""

from __future__ import annotations

import builtins
import hashlib
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from moto import mock_aws
from safetensors.torch import save_file

from dpsynth.errors import InputError
from dpsynth.eval.features import (FeatureStats, InceptionExtractor, StreamingStats,
                                   extract_stats, read_weights_bytes, subsample_indices)
from dpsynth.io.shards import write_dataset


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    """[300, 12] features with a mean far from 0 next to their spread: the case where
    sum(x x^T) - N mu mu^T would lose digits."""
    rng = np.random.default_rng(0)
    return (1e4 + rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))).astype(np.float32)


def streamed(features: np.ndarray, batch_size: int, max_features: int = 50,
             seed: int = 0) -> FeatureStats:
    acc = StreamingStats(features.shape[1], len(features), max_features, seed)
    for lo in range(0, len(features), batch_size):
        acc.update(torch.from_numpy(features[lo:lo + batch_size]))
    return acc.result()


@pytest.mark.parametrize("batch_size", [1, 7, 64, 300])
def test_streaming_stats_equal_numpy_for_any_batch_size(features: np.ndarray,
                                                        batch_size: int) -> None:
    stats = streamed(features, batch_size)
    x = features.astype(np.float64)
    assert stats.count == 300
    np.testing.assert_allclose(stats.mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    # the subsample does not depend on the batch size either
    np.testing.assert_array_equal(stats.sample, streamed(features, 300).sample)


def test_subsample_is_bounded_uniform_and_seeded(features: np.ndarray) -> None:
    stats = streamed(features, 64, max_features=50, seed=3)
    keep = subsample_indices(300, 50, seed=3)
    assert stats.sample.shape == (50, 12) and stats.sample.dtype == np.float32
    np.testing.assert_array_equal(stats.sample, features[keep])
    assert len(set(keep.tolist())) == 50 and np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(keep, subsample_indices(300, 50, seed=3))
    assert not np.array_equal(keep, subsample_indices(300, 50, seed=4))
    np.testing.assert_array_equal(subsample_indices(30, 50, seed=3), np.arange(30))  # all kept
    # uniform: over many seeds every index is kept about max/total = 1/6 of the time
    hits = np.bincount(np.concatenate([subsample_indices(300, 50, s) for s in range(600)]),
                       minlength=300) / 600
    assert abs(hits.mean() - 1 / 6) < 1e-9 and hits.min() > 0.08 and hits.max() < 0.26


def test_streaming_stats_refuse_a_wrong_count(features: np.ndarray) -> None:
    acc = StreamingStats(12, 10, 5, 0)
    with pytest.raises(ValueError, match="more features"):
        acc.update(features[:11])
    acc.update(features[:4])
    with pytest.raises(ValueError, match="announced 10"):
        acc.result()
    with pytest.raises(ValueError, match=r"expected \(n, 12\)"):
        acc.update(features[:2, :3])


def test_feature_stats_npz_roundtrip(features: np.ndarray, tmp_path: Path) -> None:
    stats = streamed(features, 64)
    path = tmp_path / "s.npz"
    path.write_bytes(stats.to_npz({"acc": 0.5}))
    back, extras = FeatureStats.from_npz(path)
    assert back.count == stats.count and extras == {"acc": 0.5}
    for name in ("mu", "sigma", "sample"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))


class PixelExtractor:
    """Features = the flattened pixels; counts its calls."""

    name, frechet_name, dim, identity = "pixels", "fd", 64, "pixels"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        self.calls += 1
        return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))


def test_extract_stats_streams_every_shard(digits: tuple[np.ndarray, np.ndarray],
                                           tmp_path: Path) -> None:
    images, labels = digits[0][:250], digits[1][:250]
    write_dataset(tmp_path, images, labels, [str(k) for k in range(10)], "test", shard_size=100)
    seen: list[np.ndarray] = []
    ext = PixelExtractor()
    stats = extract_stats(tmp_path, ext, batch_size=32, max_features=40, seed=1,
                          on_batch=lambda f, y: seen.append(y))
    x = images.reshape(250, -1).astype(np.float64)
    assert ext.calls == 4 + 4 + 2  # 100 / 32 -> 4 batches per full shard, 50 / 32 -> 2
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(np.concatenate(seen), labels)
    np.testing.assert_array_equal(stats.sample, x[subsample_indices(250, 40, 1)])


# --------------------------------------------------------------------------- Inception


def test_inception_loads_pth_and_safetensors_alike(inception_weights: Path, tmp_path: Path,
                                                   digits: tuple[np.ndarray, np.ndarray]) -> None:
    state = torch.load(inception_weights, weights_only=True)
    st_path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, st_path)
    pth = InceptionExtractor.from_file(str(inception_weights))
    st = InceptionExtractor.from_file(str(st_path))
    assert pth.identity == f"inception:{hashlib.sha256(inception_weights.read_bytes()).hexdigest()}"
    assert (pth.name, pth.frechet_name, pth.dim) == ("inception", "fid", 2048)
    gray = digits[0][:2]
    feats = pth(gray)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    # grayscale is repeated to RGB, and both files give the same network
    torch.testing.assert_close(pth(np.repeat(gray, 3, axis=-1)), feats, rtol=0, atol=0)
    torch.testing.assert_close(st(gray), feats, rtol=0, atol=0)


def test_missing_weights_file_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"fid.inception_weights=.*not found.*"
                       r"weights-inception-2015-12-05-6726825d\.pth.*set fid.inception_weights"):
        InceptionExtractor.from_file(str(tmp_path / "nope.pth"))


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    weights, marker = tmp_path / "evil.pth", tmp_path / "marker"
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, weights)
    control = tmp_path / "control"  # the payload is live: an unsafe load runs it
    torch.save({"w": Payload(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control.read_text() == "pwned"

    with pytest.raises(InputError, match="not a plain weights file, refused"):
        InceptionExtractor.from_file(str(weights))
    assert not marker.exists()


def test_weights_that_are_not_a_flat_state_dict_are_refused(tmp_path: Path) -> None:
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, nested)
    with pytest.raises(InputError, match="flat dict of name -> tensor"):
        InceptionExtractor.from_file(str(nested))
    wrong = tmp_path / "wrong.pth"
    torch.save({"w": torch.zeros(1)}, wrong)
    with pytest.raises(InputError, match="not Inception-v3 FID weights.*Missing key"):
        InceptionExtractor.from_file(str(wrong))


def test_weights_from_s3_are_read_with_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")  # moto's fake credentials, never real ones
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bucket")
        s3.put_object(Bucket="bucket", Key="dir/w.pth", Body=b"weights")
        assert read_weights_bytes("s3://bucket/dir/w.pth") == b"weights"
        with pytest.raises(InputError, match="s3://bucket/missing.*cannot read it"):
            read_weights_bytes("s3://bucket/missing")
