"""Shared fixtures for the evaluation tests: one torch thread, the 8x8 digits as
uint8, and a randomly initialised Inception-v3 weights file (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared two-core machine: one thread (torch and numpy's BLAS)
    is the fast choice; extra threads only spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 NHWC (N, 8, 8, 1) and int64 labels."""
    d = load_digits()
    return np.round(d.images * 255 / 16).astype(np.uint8)[..., None], d.target.astype(np.int64)


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the layout of the FID Inception-v3 (torchvision's
    Inception3 with 1008 classes and no aux head has the same parameter names)."""
    with torch.random.fork_rng(devices=[]):  # leave the global RNG to the tests
        torch.manual_seed(seed)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                              init_weights=False, num_classes=1008)
    return net.state_dict()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `.pth` file of random Inception-v3 weights saved with plain `torch.save`."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(random_inception_state_dict(), path)
    return path
