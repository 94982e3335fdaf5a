"""Image augmentations for augmentation multiplicity (kornia ops, torch
randomness drawn from the caller's generator so runs are reproducible)."""

from __future__ import annotations

from typing import Literal

import kornia.geometry.transform as KT
import torch

AugmentKind = Literal["none", "flip", "flip_crop"]


def augment(x: torch.Tensor, kind: AugmentKind, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a batch [N, C, H, W] in [-1, 1].

    `flip`: horizontal flip with probability 1/2 (natural images, not digits).
    `flip_crop`: flip, then a random translation by up to H/8 pixels with
    black (-1) fill: CIFAR training's pad-and-crop.
    """
    if kind == "none":
        return x
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), KT.hflip(x), x)
    if kind == "flip_crop":
        h = x.shape[-1]
        max_shift = max(1, h // 8)
        shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=generator)
        x = KT.translate(x + 1, shifts.float(), mode="nearest", padding_mode="zeros") - 1
    return x
