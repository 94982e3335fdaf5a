"""`dpsynth fid` end to end on tiny digits data (dpsynth.stages.fid)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from dpsynth.config import Config
from dpsynth.errors import InputError
from dpsynth.io.shards import read_manifest, write_dataset
from dpsynth.stages import fid, prepare
from dpsynth.tracking import NullTracker

CLASSES = tuple(str(k) for k in range(10))
# tiny metric settings: 150 features kept per side (so KID's 1000 is clipped)
FID_SETTINGS = ("fid.batch_size=64", "fid.max_features=150", "fid.kid_subsets=10",
                "fid.domain_cnn.steps=150", "fid.domain_cnn.batch_size=32",
                "fid.domain_cnn.width=8", "fid.domain_cnn.feature_dim=16",
                "fid.domain_cnn.lr=3e-3")
CNN_KEYS = {"fd_digits_cnn", "kid_digits_cnn_mean", "kid_digits_cnn_std",
            "precision_digits_cnn", "recall_digits_cnn", "domain_cnn_real_test_accuracy"}
INCEPTION_KEYS = {"fid_inception", "kid_inception_mean", "kid_inception_std",
                  "precision_inception", "recall_inception"}


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread: None) -> Iterator[None]:
    # numpy's BLAS too (FD's eigvals): on a busy machine extra threads only spin
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return np.round(d.images * 255 / 16).astype(np.uint8)[..., None], d.target.astype(np.int64)


def noisy(images: np.ndarray, std: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, std, images.shape)
    return np.clip(images + noise, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory,
         digits: tuple[np.ndarray, np.ndarray]) -> dict[str, Path]:
    """reference: 300 real digits (2 shards); synthetic: noisy copies of 200 other
    digits at two noise levels; all disjoint from the public split (the first 400)."""
    images, labels = digits
    root = tmp_path_factory.mktemp("fid-data")
    write_dataset(root / "reference", images[1000:1300], labels[1000:1300], CLASSES, "test",
                  shard_size=200)
    for name, std in (("synthetic", 20.0), ("very_noisy", 80.0)):
        write_dataset(root / name, noisy(images[1300:1500], std, seed=0), labels[1300:1500],
                      CLASSES, "synthetic", shard_size=128)
    return {"reference": root / "reference", "synthetic": root / "synthetic",
            "very_noisy": root / "very_noisy"}


def run(cfg: Config, data: dict[str, Path], public: Path, out: Path,
        synthetic: str = "synthetic") -> fid.FidResult:
    return fid.run(cfg, synthetic_dir=data[synthetic], test_dir=data["reference"],
                   public_dir=public, out_dir=out, tracker=NullTracker())


def test_end_to_end_with_the_domain_cnn(make_cfg: Callable[..., Config], data: dict[str, Path],
                                        digits_public_dir: Path, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(*FID_SETTINGS)
    out, tracker = tmp_path / "fid", NullTracker()
    with caplog.at_level(logging.INFO):
        result = fid.run(cfg, synthetic_dir=data["synthetic"], test_dir=data["reference"],
                         public_dir=digits_public_dir, out_dir=out, tracker=tracker)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == CNN_KEYS | {"num_synthetic"}
    assert metrics == result.metrics
    assert not any("fid" in k for k in metrics)  # a CNN's Frechet distance is not FID
    assert metrics["num_synthetic"] == 200  # not the reference size: see fid.py
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["fd_digits_cnn"] > 0 and 0 <= metrics["precision_digits_cnn"] <= 1
    assert metrics["domain_cnn_real_test_accuracy"] > 0.7  # sanity: the CNN knows digits
    assert "subset size 300 clipped to 150" in caplog.text
    assert (result.reference_from_cache, result.domain_cnn_from_cache) == ((), False)

    assert sorted(p.name for p in out.iterdir()) == [
        "extractor", "extractors.json", "metrics.json", "params.json", "version.json"]
    cnn_cfg = json.loads((out / "extractor" / "config.json").read_text())
    assert sorted(p.name for p in (out / "extractor").iterdir()) == [
        "config.json", "model.safetensors"]
    # trained on the public split, by content hash
    assert cnn_cfg["split"] == "public"
    assert cnn_cfg["trained_on"] == read_manifest(digits_public_dir).content_hash
    described = json.loads((out / "extractors.json").read_text())
    assert [(d["name"], d["kid_subset_size"]) for d in described] == [("digits_cnn", 150)]
    assert json.loads((out / "params.json").read_text()) == cfg.section("seed", "data", "fid")
    assert tracker.params["fid.max_features"] == 150
    assert tracker.metrics[-1][0] == pytest.approx(metrics)

    # same inputs again: the CNN and the reference statistics come from the cache
    again = run(cfg, data, digits_public_dir, out)
    assert (again.reference_from_cache, again.domain_cnn_from_cache) == (("digits_cnn",), True)
    assert again.metrics == metrics
    # noisier synthetic data, same reference: cache reused, and the metrics get worse
    worse = run(cfg, data, digits_public_dir, out, synthetic="very_noisy")
    assert worse.reference_from_cache == ("digits_cnn",)
    assert worse.metrics["fd_digits_cnn"] > 2 * metrics["fd_digits_cnn"]
    assert worse.metrics["kid_digits_cnn_mean"] > metrics["kid_digits_cnn_mean"]
    assert worse.metrics["precision_digits_cnn"] < metrics["precision_digits_cnn"]
    # a new seed is another CNN: nothing reused
    reseeded = run(make_cfg(*FID_SETTINGS, "seed=1"), data, digits_public_dir, out)
    assert (reseeded.reference_from_cache, reseeded.domain_cnn_from_cache) == ((), False)


def test_no_accuracy_when_public_classes_differ(make_cfg: Callable[..., Config],
                                                data: dict[str, Path],
                                                digits: tuple[np.ndarray, np.ndarray],
                                                tmp_path: Path) -> None:
    """Public data with its own label set (ImageNet32 for CIFAR-10): the CNN still
    gives features, but its accuracy on the test classes would mean nothing."""
    images, labels = digits
    public = tmp_path / "public"
    write_dataset(public, images[:400], labels[:400] % 5, [f"c{k}" for k in range(5)], "other")
    result = fid.run(make_cfg(*FID_SETTINGS), synthetic_dir=data["synthetic"],
                     test_dir=data["reference"], public_dir=public,
                     out_dir=tmp_path / "fid", tracker=NullTracker())
    assert set(result.metrics) == CNN_KEYS - {"domain_cnn_real_test_accuracy"} | {
        "num_synthetic"}


def random_inception_file(path: Path) -> Path:
    """Random weights with the FID Inception-v3's layout (torchvision's Inception3 with
    1008 classes and no aux head has the same parameter names); nothing downloaded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                              init_weights=False, num_classes=1008)
    torch.save(net.state_dict(), path)
    return path


def test_both_extractors_on_a_few_images(make_cfg: Callable[..., Config], digits: tuple[
        np.ndarray, np.ndarray], digits_public_dir: Path, tmp_path: Path) -> None:
    """Inception at 299x299 is slow on a CPU: 6 images per side."""
    images, labels = digits
    write_dataset(tmp_path / "ref", images[1000:1006], labels[1000:1006], CLASSES, "test")
    write_dataset(tmp_path / "syn", noisy(images[1100:1106], 20, 0), labels[1100:1106],
                  CLASSES, "synthetic")
    weights = random_inception_file(tmp_path / "inception.pth")
    cfg = make_cfg(*FID_SETTINGS, "fid.extractors=[domain-cnn, inception-v3-compat]",
                   f"fid.inception_weights={weights}", "fid.batch_size=4")
    result = fid.run(cfg, synthetic_dir=tmp_path / "syn", test_dir=tmp_path / "ref",
                     public_dir=digits_public_dir, out_dir=tmp_path / "fid",
                     tracker=NullTracker())
    assert set(result.metrics) == CNN_KEYS | INCEPTION_KEYS | {"num_synthetic"}
    assert all(math.isfinite(v) for v in result.metrics.values())
    described = json.loads((tmp_path / "fid" / "extractors.json").read_text())
    assert [d["name"] for d in described] == ["digits_cnn", "inception"]
    assert described[1]["identity"].startswith("inception:") and described[1]["dim"] == 2048


def _dataset(root: Path, name: str, images: np.ndarray, labels: np.ndarray) -> Path:
    write_dataset(root / name, images, labels, CLASSES, "test")
    return root / name


@pytest.mark.parametrize("case, match", [
    ("no_manifest", r"synthetic_dir=.*no manifest\.json there; pass the output folder of "
                    r"`dpsynth sample`"),
    ("empty", r"synthetic_dir=.*holds no images"),
    ("rgb", r"synthetic_dir=.*\(8, 8, 3\) but test_dir=.*\(8, 8, 1\)"),
    ("too_few", r"synthetic_dir=.*holds 3 images; the metrics need at least 4"),
    ("public_shape", r"public_dir=.*\(4, 4, 1\).*must be trained on images of the evaluated"),
    ("no_public", r"public_dir=.*no manifest\.json there; pass the PUBLIC split"),
    ("private_as_public", r"public_dir=.*is the PRIVATE split.*only be trained on public"),
    ("no_weights", r"fid\.inception_weights=.*not found.*weights-inception-2015-12-05"),
])
def test_bad_input_writes_nothing(case: str, match: str, make_cfg: Callable[..., Config],
                                  data: dict[str, Path], digits_public_dir: Path,
                                  digits: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images, labels = digits[0][:20], digits[1][:20]
    inputs = {"synthetic_dir": data["synthetic"], "test_dir": data["reference"],
              "public_dir": digits_public_dir}
    overrides = list(FID_SETTINGS)
    bad = tmp_path / "bad"
    if case == "no_manifest":
        bad.mkdir()
        inputs["synthetic_dir"] = bad
    elif case == "empty":
        inputs["synthetic_dir"] = _dataset(bad, "empty", images[:0], labels[:0])
    elif case == "rgb":
        inputs["synthetic_dir"] = _dataset(bad, "rgb", np.repeat(images, 3, axis=-1), labels)
    elif case == "too_few":
        inputs["synthetic_dir"] = _dataset(bad, "few", images[:3], labels[:3])
    elif case == "public_shape":
        inputs["public_dir"] = _dataset(bad, "small", images[:, :4, :4], labels)
    elif case == "no_public":
        inputs["public_dir"] = bad / "missing"
    elif case == "private_as_public":  # the real private split of `dpsynth prepare`
        prepare.run(make_cfg(), out_dir=bad / "prepare", tracker=NullTracker())
        inputs["public_dir"] = bad / "prepare" / "private"
    elif case == "no_weights":
        overrides += ["fid.extractors=[inception-v3-compat]",
                      f"fid.inception_weights={tmp_path / 'missing.pth'}"]
    tracker = NullTracker()
    out = tmp_path / "artifacts" / "fid"
    with pytest.raises(InputError, match=match):
        fid.run(make_cfg(*overrides), out_dir=out, tracker=tracker, **inputs)
    assert not (tmp_path / "artifacts").exists()  # no output, no work folder
    assert tracker.params == {} and tracker.metrics == []
