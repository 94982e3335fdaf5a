"""A tiny seeded UNet (8x8x1, 3 classes, 45k parameters) for fast CPU tests."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from dpsynth.config import ModelConfig
from dpsynth.diffusion.unet import UNetSpec, build_unet

# (8, 16) channels with 4 groups keeps GroupNorm meaningful; level 1 has attention
# so every layer type of the real model is exercised.
TINY_MODEL = ModelConfig(block_out_channels=(8, 16), norm_num_groups=4, attention_levels=(1,))


@pytest.fixture
def tiny_spec() -> UNetSpec:
    return UNetSpec(image_size=8, channels=1, num_classes=3, model=TINY_MODEL)


@pytest.fixture
def tiny_net(tiny_spec: UNetSpec) -> UNet2DModel:
    torch.manual_seed(0)
    return build_unet(tiny_spec).eval()
