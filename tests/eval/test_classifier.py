"""Downstream classifier training: deterministic for a seed, learns real digits
(and cannot learn shuffled labels, so the accuracy test can fail), predict /
accuracy contracts, safetensors + config.json round trip, input checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsynth.config import ClassifierConfig
from dpsynth.errors import InputError
from dpsynth.eval.classifier import (accuracy, load_classifier, predict, read_labelled,
                                     save_classifier, train)
from dpsynth.io.shards import write_dataset

TINY = ClassifierConfig(depth=10, widen=1, epochs=2, batch_size=32, lr=0.05, augment="crop")
# WRN-10-2 as in params.yaml, short: ~3 s on one thread for 1200 digits
DIGITS = ClassifierConfig(depth=10, widen=2, epochs=8, batch_size=64, lr=0.05, augment="crop")
CLASSES = tuple(str(k) for k in range(10))


@pytest.fixture(scope="module")
def digits_split(digits: tuple[np.ndarray, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels): 1200 / 597."""
    images, labels = digits
    perm = np.random.default_rng(0).permutation(len(images))
    return images[perm[:1200]], labels[perm[:1200]], images[perm[1200:]], labels[perm[1200:]]


def test_same_seed_same_weights_and_the_global_rng_is_left_alone(
        digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits[0][:150], digits[1][:150]
    rng_before = torch.get_rng_state()
    a = train(TINY, x, y, num_classes=10, seed=3, device="cpu", progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    b = train(TINY, x, y, num_classes=10, seed=3, device="cpu", progress=False)
    c = train(TINY, x, y, num_classes=10, seed=4, device="cpu", progress=False)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert not a.training  # returned ready to evaluate


def test_augmentation_is_used() -> None:
    # only the augmentation differs; same seed, same data order
    x = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    y = np.arange(64) % 10
    nets = [train(dataclasses.replace(TINY, augment=kind), x, y, num_classes=10,
                  seed=0, device="cpu", progress=False) for kind in ("none", "crop")]
    assert not torch.equal(nets[0].fc.weight, nets[1].fc.weight)


def test_learns_real_digits_and_not_shuffled_labels(
        digits_split: tuple[np.ndarray, ...]) -> None:
    x, y, x_test, y_test = digits_split
    net = train(DIGITS, x, y, num_classes=10, seed=0, device="cpu", progress=False)
    assert accuracy(net, x_test, y_test) > 0.9
    # the same recipe on labels with no relation to the images: chance on held-out data
    shuffled = np.random.default_rng(1).permutation(y)
    net = train(DIGITS, x, shuffled, num_classes=10, seed=0, device="cpu", progress=False)
    assert accuracy(net, x_test, y_test) < 0.2


def test_predict_and_accuracy_agree(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits[0][:100], digits[1][:100]
    net = train(TINY, x, y, num_classes=10, seed=0, device="cpu", progress=False)
    pred = predict(net, digits[0][:1030])  # more than one prediction batch (1024)
    assert pred.shape == (1030,) and pred.dtype == np.int64
    assert pred.min() >= 0 and pred.max() < 10
    np.testing.assert_array_equal(pred[:100], predict(net, x))
    assert accuracy(net, x, y) == pytest.approx(float((pred[:100] == y).mean()))
    assert predict(net, digits[0][:0]).shape == (0,)


def test_save_and_load_round_trip_without_pickle(tmp_path: Path,
                                                 digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits[0][:100], digits[1][:100]
    net = train(TINY, x, y, num_classes=10, seed=0, device="cpu", progress=False)
    save_classifier(net, TINY, num_classes=10, channels=1, image_size=8, out_dir=tmp_path / "m",
                    classes=CLASSES, extra={"rank_config": 2})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                 "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["image_size"] == 8 and meta["channels"] == 1 and meta["num_classes"] == 10
    assert meta["wrn"] == {"depth": 10, "widen": 1, "dropout": 0.0}
    assert meta["classifier"]["augment"] == "crop" and meta["classes"] == list(CLASSES)
    assert meta["rank_config"] == 2
    loaded, loaded_meta = load_classifier(tmp_path / "m")
    assert loaded_meta == meta
    for key, value in net.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(value, loaded.state_dict()[key]), key
    np.testing.assert_array_equal(predict(loaded, digits[0]), predict(net, digits[0]))


def test_load_refuses_a_folder_without_a_classifier(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a classifier config"):
        load_classifier(tmp_path)
    net = train(TINY, np.zeros((4, 8, 8, 1), np.uint8), np.arange(4), num_classes=10, seed=0,
                device="cpu", progress=False)
    save_classifier(net, TINY, num_classes=10, channels=1, image_size=8, out_dir=tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(InputError, match="cannot load weights"):
        load_classifier(tmp_path)


@pytest.mark.parametrize(("images", "labels", "match"), [
    (np.zeros((4, 8, 8, 1), np.float32), np.arange(4), "uint8"),
    (np.zeros((4, 4, 4, 1), np.uint8), np.arange(4), "at least 8x8"),
    (np.zeros((4, 8, 8, 1), np.uint8), np.arange(3), "labels have shape"),
    (np.zeros((1, 8, 8, 1), np.uint8), np.arange(1), "at least 2"),
])
def test_train_refuses_bad_input(images: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(InputError, match=match):
        train(TINY, images, labels, num_classes=10, seed=0, device="cpu", progress=False)


def test_read_labelled_checks_emptiness_classes_and_shape(tmp_path: Path) -> None:
    def write(name: str, n: int, shape: tuple[int, int, int] = (8, 8, 1),
              classes: tuple[str, ...] = CLASSES) -> Path:
        write_dataset(tmp_path / name, np.zeros((n, *shape), np.uint8),
                      np.arange(n) % len(classes), classes, source="test")
        return tmp_path / name

    ref = read_labelled(write("ref", 20), "synthetic set")[2]
    x, y, manifest = read_labelled(write("ok", 10), "real test split", like=(ref, "synthetic"))
    assert x.shape == (10, 8, 8, 1) and y.shape == (10,) and manifest.classes == CLASSES
    with pytest.raises(InputError, match=r"empty.*\(real test split\) holds no images"):
        read_labelled(write("empty", 0), "real test split", like=(ref, "synthetic"))
    with pytest.raises(InputError, match="has classes"):
        read_labelled(write("cls", 5, classes=("a", "b")), "real test split",
                      like=(ref, "synthetic"))
    with pytest.raises(InputError, match=r"shape \(H, W, C\)=\(16, 16, 1\)"):
        read_labelled(write("big", 5, shape=(16, 16, 1)), "real test split",
                      like=(ref, "synthetic"))
