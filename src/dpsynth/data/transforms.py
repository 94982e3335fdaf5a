"""Bring images to the configured format: square `image_size` x `image_size`,
`channels` channels, uint8 NHWC.

Works on batches with torch (bilinear, anti-aliased when shrinking), not PIL
loops. Non-square images are centre-cropped to a square first, so nothing is
stretched. Grey -> RGB repeats the channel; RGB -> grey is ITU-R BT.601 luma.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights for R, G, B (as in PIL's convert("L")).
LUMA_601 = (0.299, 0.587, 0.114)
BATCH = 1024  # images per interpolate call: bounds the float32 working memory


def centre_crop(images: np.ndarray) -> np.ndarray:
    """Crop (N, H, W, C) to (N, S, S, C) with S = min(H, W), keeping the centre."""
    h, w = images.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[:, top:top + side, left:left + side]


def _convert(batch: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """(B, C, S, S) float -> (B, channels, image_size, image_size) float, unrounded."""
    if batch.shape[1] == 3 and channels == 1:  # before resizing: a third of the work
        weights = torch.tensor(LUMA_601, dtype=batch.dtype).view(1, 3, 1, 1)
        batch = (batch * weights).sum(dim=1, keepdim=True)
    if batch.shape[-1] != image_size:
        batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=batch.shape[-1] > image_size)
    if batch.shape[1] == 1 and channels == 3:
        batch = batch.expand(-1, 3, -1, -1)
    return batch


def to_format(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Resize and convert images to the pipeline's format.

    Args:
        images: uint8, shape (N, H, W, C) with C in {1, 3}.
        image_size: output height and width.
        channels: output channels, 1 or 3.

    Returns:
        uint8, shape (N, image_size, image_size, channels), rounded and clipped.

    Raises:
        ValueError: bad `images` layout or `channels`.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images: dtype {images.dtype}, shape {images.shape}; expected uint8 "
                         "(N, H, W, C) with C in {1, 3}")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: must be 1 or 3")
    images = centre_crop(images)
    if images.shape[1] == image_size and images.shape[-1] == channels:
        return np.ascontiguousarray(images)
    out = np.empty((len(images), image_size, image_size, channels), np.uint8)
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + BATCH]))
            batch = _convert(chunk.permute(0, 3, 1, 2).float(), image_size, channels)
            out[start:start + BATCH] = (batch.round().clamp(0, 255).to(torch.uint8)
                                        .permute(0, 2, 3, 1).numpy())
    return out
