"""Resizing and channel conversion to the configured image format."""

from __future__ import annotations

import numpy as np
import pytest

from dpsynth.data import transforms
from dpsynth.data.transforms import centre_crop, to_format


@pytest.mark.parametrize("size", [3, 8, 16, 37])
def test_constant_image_stays_constant(size: int) -> None:
    images = np.full((2, 11, 11, 3), (17, 128, 250), np.uint8)
    out = to_format(images, size, 3)
    assert out.shape == (2, size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to([17, 128, 250], out.shape))


def test_rgb_to_grey_is_bt601_luma() -> None:
    images = np.zeros((3, 4, 4, 3), np.uint8)
    images[0, ..., 0] = 255  # pure red
    images[1, ..., 1] = 255  # pure green
    images[2] = 255  # white stays white
    out = to_format(images, 4, 1)
    assert out.shape == (3, 4, 4, 1)
    assert out[0, 0, 0, 0] == round(0.299 * 255) == 76
    assert out[1, 0, 0, 0] == round(0.587 * 255) == 150
    assert out[2, 0, 0, 0] == 255


def test_grey_to_rgb_repeats() -> None:
    images = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    out = to_format(images, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], images[..., 0])


def test_same_format_is_unchanged() -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_format(images, 6, 3), images)


def test_non_square_is_centre_cropped() -> None:
    images = np.zeros((1, 4, 8, 1), np.uint8)
    images[:, :, 2:6] = 100  # the centre 4x4 block
    assert centre_crop(images).shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(to_format(images, 4, 1), 100)
    tall = np.transpose(images, (0, 2, 1, 3))
    np.testing.assert_array_equal(to_format(tall, 2, 1), 100)


def test_downsizing_is_antialiased() -> None:
    # One lit column in four: plain 4x bilinear shrinking samples between columns
    # 1-2, 5-6, ... and sees only black; the anti-aliased filter keeps the mean
    # brightness (255 / 4 ~ 64; the edges differ as the filter is clamped there).
    stripes = np.zeros((1, 16, 16, 1), np.uint8)
    stripes[:, :, ::4] = 255
    out = to_format(stripes, 4, 1)
    np.testing.assert_array_equal(out[0, :, :, 0], np.tile([73, 64, 64, 46], (4, 1)))


def test_batches_match_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(1).integers(0, 256, (7, 9, 9, 3), dtype=np.uint8)
    whole = to_format(images, 5, 1)
    monkeypatch.setattr(transforms, "BATCH", 2)
    np.testing.assert_array_equal(to_format(images, 5, 1), whole)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="dtype float32"):
        to_format(np.zeros((1, 4, 4, 3), np.float32), 4, 3)
    with pytest.raises(ValueError, match="channels=2"):
        to_format(np.zeros((1, 4, 4, 3), np.uint8), 4, 2)
