"""Fixtures for the DP-SGD tests: a tiny seeded UNet (8x8x1, 3 classes, 45k
parameters) with every layer type of the real model, its denoising loss, and
a small labelled "private" split."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from diffusers import UNet2DModel

from dpsynth.config import DiffusionConfig, ModelConfig
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.unet import UNetSpec, build_unet

NUM_CLASSES = 3
# (8, 16) channels with 4 groups keeps GroupNorm meaningful; level 1 (and the mid
# block) has self-attention, so conv, linear, GroupNorm, embedding and attention
# layers are all exercised.
TINY_MODEL = ModelConfig(block_out_channels=(8, 16), norm_num_groups=4, attention_levels=(1,))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run single-threaded: on a shared 2-core machine, two intra-op threads make
    the tiny convolutions ~100x slower (thread contention), not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dp_spec() -> UNetSpec:
    return UNetSpec(image_size=8, channels=1, num_classes=NUM_CLASSES, model=TINY_MODEL)


@pytest.fixture
def dp_net(dp_spec: UNetSpec) -> UNet2DModel:
    """The seeded tiny UNet, diffusers' default (SDPA) attention processor."""
    torch.manual_seed(0)
    return build_unet(dp_spec).eval()


@pytest.fixture
def dp_loss(dp_spec: UNetSpec) -> DenoisingLoss:
    """The real denoising loss; label dropout > 0 so the null label is exercised."""
    return DenoisingLoss.from_config(DiffusionConfig(num_train_timesteps=50, label_dropout=0.2),
                                     dp_spec.null_label)


@pytest.fixture
def private_split() -> tuple[torch.Tensor, torch.Tensor]:
    """16 images [16, 1, 8, 8] in [-1, 1] and their labels [16]."""
    g = torch.Generator().manual_seed(123)
    return (torch.rand(16, 1, 8, 8, generator=g) * 2 - 1,
            torch.randint(0, NUM_CLASSES, (16,), generator=g))
