"""Augmentations (augmentation multiplicity, downstream classifiers): `none` is
the identity, `flip` mirrors about half the images along the width, `crop`
translates by up to H/8 pixels with black fill, `flip_crop` does both; all are
reproducible from the generator."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dpsynth.diffusion.augment import augment

Z = 5.0


def images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1] including both extremes (no image is symmetric)."""
    x = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x[:, :, 0, 0], x[:, :, -1, -1] = -1.0, 1.0
    return x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """img [C, H, W] moved right by dx and down by dy, uncovered pixels black (-1)."""
    out = torch.full_like(img, -1.0)
    h, w = img.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_none_is_the_identity() -> None:
    x = images(5)
    assert torch.equal(augment(x, "none", gen()), x)


def test_flip_mirrors_about_half_along_the_width() -> None:
    n = 2000
    x = images(n)
    out = augment(x, "flip", gen())
    assert out.shape == x.shape
    flipped = (out == torch.flip(x, dims=[-1])).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert (flipped ^ same).all()  # every image is exactly one of the two
    assert abs(flipped.sum().item() - n / 2) < Z * math.sqrt(n / 4)


def test_flip_is_reproducible_from_the_generator() -> None:
    x = images(64)
    assert torch.equal(augment(x, "flip", gen(1)), augment(x, "flip", gen(1)))
    assert not torch.equal(augment(x, "flip", gen(1)), augment(x, "flip", gen(2)))


@pytest.mark.parametrize("kind", ["crop", "flip_crop"])
@pytest.mark.parametrize("size", [8, 16])
def test_crops_are_a_small_translation_with_black_fill(size: int, kind: str) -> None:
    n, max_shift = 400, size // 8
    flips = (False, True) if kind == "flip_crop" else (False,)
    x = images(n, size=size)
    out = augment(x, kind, gen())
    assert out.shape == x.shape
    assert out.min() >= -1 and out.max() <= 1
    seen = Counter()
    for img, src in zip(out, x):
        matches = [(flip, dx, dy)
                   for flip in flips
                   for dx in range(-max_shift, max_shift + 1)
                   for dy in range(-max_shift, max_shift + 1)
                   if torch.allclose(img, shifted(src.flip(-1) if flip else src, dx, dy),
                                     atol=1e-6, rtol=0)]
        assert matches, f"not {' or '.join(map(str, flips))} flip plus a shift of <= H/8 pixels"
        seen[matches[0]] += 1
    # every flip and shift combination occurs ((2 * 1 + 1)^2 or 5^2 shifts, times the flips)
    assert len(seen) == len(flips) * (2 * max_shift + 1) ** 2


@pytest.mark.parametrize("kind", ["crop", "flip_crop"])
def test_crops_are_reproducible_from_the_generator(kind: str) -> None:
    x = images(32)
    assert torch.equal(augment(x, kind, gen(3)), augment(x, kind, gen(3)))
    assert not torch.equal(augment(x, kind, gen(3)), augment(x, kind, gen(4)))
