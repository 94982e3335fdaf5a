"""The embedded digits source."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from dpsynth.config import SourceConfig
from dpsynth.data.digits import DigitsSource


def test_digits_layout_and_scaling() -> None:
    subsets = DigitsSource().load(SourceConfig())
    assert list(subsets) == ["all"]
    data = subsets["all"]
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.classes == tuple("0123456789")
    np.testing.assert_array_equal(data.labels, load_digits().target)
    # First digit's top row is 0 0 5 13 9 1 0 0 (of 16): round(v * 255 / 16).
    np.testing.assert_array_equal(data.images[0, 0, :, 0], [0, 0, 80, 207, 143, 16, 0, 0])
    assert data.images.max() == 255 and data.images.min() == 0
    assert np.bincount(data.labels).min() >= 170  # every class well represented
