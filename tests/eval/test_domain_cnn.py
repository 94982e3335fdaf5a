"""The domain CNN feature extractor (dpsynth.eval.domain_cnn)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsynth.config import DomainCnnConfig
from dpsynth.errors import InputError
from dpsynth.eval.domain_cnn import (DomainCnn, DomainCnnExtractor, load_domain_cnn,
                                     save_domain_cnn, to_input, train_domain_cnn)

TINY = DomainCnnConfig(steps=40, batch_size=32, width=8, feature_dim=16)


def train(digits: tuple[np.ndarray, np.ndarray], seed: int,
          cfg: DomainCnnConfig = TINY) -> DomainCnn:
    images, labels = digits
    return train_domain_cnn(cfg, images[:400], labels[:400], num_classes=10, seed=seed)


@pytest.fixture(scope="module")
def net(digits: tuple[np.ndarray, np.ndarray]) -> DomainCnn:
    # module scope runs before the per-test one-thread fixture: set it here too
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(digits, seed=0)
    finally:
        torch.set_num_threads(before)


def test_same_seed_gives_bit_identical_weights(digits: tuple[np.ndarray, np.ndarray],
                                               net: DomainCnn) -> None:
    rng_before = torch.get_rng_state()
    again, other = train(digits, seed=0), train(digits, seed=1)
    a, b, c = net.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched


def test_architecture_and_shapes(net: DomainCnn, digits: tuple[np.ndarray, np.ndarray]) -> None:
    convs = [m for m in net.body if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [8, 16, 32]  # w, 2w, 4w
    assert [m.stride for m in convs] == [(1, 1), (2, 2), (2, 2)]  # 2 downsamplings
    x = to_input(digits[0][:5])
    assert x.shape == (5, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert net.embed(x).shape == (5, 16) and net(x).shape == (5, 10)


def test_it_learns_the_classes(digits: tuple[np.ndarray, np.ndarray]) -> None:
    net = train(digits, seed=0, cfg=DomainCnnConfig(steps=150, batch_size=64, width=8,
                                                    feature_dim=16, lr=3e-3))
    images, labels = digits
    with torch.no_grad():
        pred = net(to_input(images[1000:1500])).argmax(1).numpy()
    assert (pred == labels[1000:1500]).mean() > 0.8  # held-out digits; chance is 0.1


def test_save_load_roundtrip_without_pickle(net: DomainCnn, tmp_path: Path,
                                            digits: tuple[np.ndarray, np.ndarray]) -> None:
    sha = save_domain_cnn(tmp_path, net, extra={"split": "public"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert sha == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "config.json").read_text())["split"] == "public"
    back, raw, sha_back = load_domain_cnn(tmp_path)
    assert sha_back == sha and raw["domain_cnn"]["feature_dim"] == 16
    x = to_input(digits[0][:8])
    with torch.no_grad():
        torch.testing.assert_close(back.embed(x), net.embed(x), rtol=0, atol=0)
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(InputError, match="not a domain CNN folder"):
        load_domain_cnn(tmp_path)


def test_extractor_contract(net: DomainCnn, digits: tuple[np.ndarray, np.ndarray]) -> None:
    ext = DomainCnnExtractor(net, "digits", "abc")
    assert (ext.name, ext.frechet_name, ext.dim, ext.identity) == (
        "digits_cnn", "fd", 16, "domain-cnn:abc")
    images = digits[0][:6]
    feats = ext(images)
    assert feats.shape == (6, 16) and feats.dtype == torch.float32
    # features of an image do not depend on its batch (GroupNorm, eval mode)
    torch.testing.assert_close(ext(images[:1]), feats[:1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ext.predict(feats), net(to_input(images)).argmax(1))


def test_empty_public_split_is_refused() -> None:
    with pytest.raises(InputError, match="public split is empty"):
        train_domain_cnn(TINY, np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int64),
                         num_classes=10, seed=0)
