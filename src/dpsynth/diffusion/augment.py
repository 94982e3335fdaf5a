"""Image augmentations (kornia ops, torch randomness drawn from the caller's
generator so runs are reproducible): for augmentation multiplicity in DP
fine-tuning, and for training the downstream classifiers (`dpsynth.eval`)."""

from __future__ import annotations

from typing import Literal

import kornia.geometry.transform as KT
import torch

# `crop` alone is for data that is not mirror-symmetric (digits, text); the DP
# fine-tuning config offers none|flip|flip_crop, the classifiers none|crop|flip_crop.
AugmentKind = Literal["none", "flip", "crop", "flip_crop"]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of [N, C, H, W] along the width with probability 1/2."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), KT.hflip(x), x)


def random_translate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each image of [N, C, H, W] in [-1, 1] by up to H/8 pixels in x and y,
    black (-1) fill: CIFAR training's pad-4-and-crop-32 (Zagoruyko & Komodakis
    2016, Sec. 3), at any resolution (1 pixel on 8x8 digits)."""
    max_shift = max(1, x.shape[-1] // 8)
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=generator)
    # +1 / -1: kornia pads with zeros, and black is -1 in this range
    return KT.translate(x + 1, shifts.float(), mode="nearest", padding_mode="zeros") - 1


def augment(x: torch.Tensor, kind: AugmentKind, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a batch [N, C, H, W] in [-1, 1].

    `flip`: horizontal flip with probability 1/2 (natural images, not digits).
    `crop`: a random translation by up to H/8 pixels with black fill.
    `flip_crop`: flip, then translate.
    """
    # the flip draws come first, so `flip_crop` draws what it always drew
    if kind in ("flip", "flip_crop"):
        x = random_hflip(x, generator)
    if kind in ("crop", "flip_crop"):
        x = random_translate(x, generator)
    return x
